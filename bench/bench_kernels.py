"""Benchmark the C kernels against their numpy twin, in the same run.

Run: ``python bench/bench_kernels.py [--quick]``. Prints one JSON object per line:
first an environment line, then for n = 2, 4, 8 qubits the time per call of
``apply_2q`` and ``measure`` for both backends and the ratio numpy/c, then the
``rng_uniform`` throughput (samples/s) of both.

Method: time.perf_counter around a loop of `reps` calls, `reps` chosen so one loop lasts
>= ~0.1 s (0.02 s with --quick); best of 5 loops (the minimum is the least disturbed by
other load; Python's timeit documentation recommends it). Both backends get the same
state, the same operator and the same qubits (the two ends of the register, so the
2-qubit kernel sees non-adjacent bits for n > 2).

Measurement fairness: each backend measures the SAME buffer over and over (X basis,
r = 0.5). The work of both implementations is independent of the data — each forms the
reduced 1-qubit state and then rewrites every 2x2 block — so repeated collapse costs
exactly what a first collapse costs, and no copy is timed with the kernel.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit, environment_record, per_call_s  # noqa: E402

import numpy as np  # noqa: E402

from emulator.kernels import Basis, get_backend  # noqa: E402

BACKENDS = ("c", "numpy")


def random_state(rng: np.random.Generator, n: int) -> np.ndarray:
    d = 1 << n
    g = rng.normal(size=(d, d)) + 1j * rng.normal(size=(d, d))
    rho = g @ g.conj().T
    return np.ascontiguousarray(rho / np.trace(rho).real)


def random_unitary(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)) + 1j * rng.normal(size=(d, d)))
    return np.ascontiguousarray(q * (np.diag(r) / np.abs(np.diag(r))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter loops (noisier numbers)")
    args = parser.parse_args()
    min_loop_s = 0.02 if args.quick else 0.1
    backends = {name: get_backend(name) for name in BACKENDS}
    emit(environment_record())
    rng = np.random.default_rng(2024)
    for n in (2, 4, 8):
        template = random_state(rng, n)
        u = random_unitary(rng, 4)
        qa, qb = 0, n - 1
        for kernel in ("apply_2q", "measure"):
            times: dict[str, float] = {}
            for name, be in backends.items():
                rho = template.copy()
                if kernel == "apply_2q":
                    call = functools.partial(be.apply_2q, rho, n, qa, qb, u)
                else:
                    call = functools.partial(be.measure, rho, n, qa, Basis.X, 0.5)
                times[name] = per_call_s(call, min_loop_s)
            emit(
                {
                    "bench": kernel,
                    "n_qubits": n,
                    "c_s_per_call": times["c"],
                    "numpy_s_per_call": times["numpy"],
                    "ratio_numpy_over_c": times["numpy"] / times["c"],
                }
            )
    count = 1_000_000
    rates: dict[str, float] = {}
    for name, be in backends.items():
        t = per_call_s(functools.partial(be.rng_uniform, 0x5EED, 1, 0, count), min_loop_s)
        rates[name] = count / t
    emit(
        {
            "bench": "rng_uniform",
            "samples_per_call": count,
            "c_samples_per_s": rates["c"],
            "numpy_samples_per_s": rates["numpy"],
            "ratio_c_over_numpy": rates["c"] / rates["numpy"],
        }
    )


if __name__ == "__main__":
    main()
