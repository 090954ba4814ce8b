"""Benchmark Cascade reconciliation and its GF(2) kernels, C against numpy, in one run.

Run: ``python bench/bench_cascade.py [--quick]``. Prints one JSON object per line:

1. ``environment``.
2. ``gf2_kernel`` lines: time per call of the parity work on a 10^6-bit key — shuffling
   it (``gf2_gather``), the parities of every block of a pass (``gf2_parities_ranges``,
   blocks of 73 bits = original Cascade at 1 %), the same through the shuffle index
   (``gf2_parities_indexed``), 1000 bit flips, and a Hamming distance — for both
   backends, with the ratio numpy/C.
3. ``cascade`` lines, one per (key length n in {10^4, 10^6}, QBER in 1..8 %, variant in
   {original, opt8}, backend in {c, numpy}): mean reconciliation efficiency
   f = leaked / (n h(Q)) with its standard error, frames with remaining errors, parity
   request rounds, wall time per frame, corrected bits per second and reconciled key
   bits per second (n / wall time). Both ends run in this process through CascadePair
   (no sockets), so the wall time is the protocol's computation alone — on a real link
   every round also costs one round-trip time.

Frames: a uniformly random key with exactly round(Q·n) flipped bits at random positions
(so the frame's actual error rate is Q), and Bob's QBER estimate set to Q. The same
frames (same seeds) go to both backends and both variants.

Method: time.perf_counter around each call; kernels take the best of 5 loops of
``reps`` calls (reps chosen so a loop lasts >= 0.1 s, 0.02 s with --quick), the
minimum being the least disturbed by other load (timeit's advice). Protocol runs are
timed once per frame and averaged over the frames.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit, environment_record, per_call_s  # noqa: E402

import numpy as np  # noqa: E402

from emulator.kernels import get_backend  # noqa: E402
from nodes.qkd.cascade import (  # noqa: E402
    CascadeAlice,
    CascadeBob,
    CascadePair,
    cascade_permutation,
    reconciliation_efficiency,
)

BACKENDS = ("c", "numpy")
VARIANTS = ("original", "opt8")


def make_frame(n: int, qber: float, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(seed)
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    errors = int(round(qber * n))
    bob = alice.copy()
    bob[rng.choice(n, errors, replace=False)] ^= 1
    return alice, bob, errors


def bench_kernels(min_loop_s: float) -> None:
    n, k = 1_000_000, 73
    rng = np.random.default_rng(2024)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    perm = cascade_permutation(7, 0, n)
    starts = np.arange(0, n, k, dtype=np.int64)
    stops = np.minimum(starts + k, n)
    flips = rng.integers(0, n, 1000)
    for kernel in ("gf2_gather", "gf2_parities_ranges", "gf2_parities_indexed", "gf2_flip_bits", "gf2_hamming"):
        times: dict[str, float] = {}
        for name in BACKENDS:
            be = get_backend(name)
            words = be.gf2_pack(bits)
            other = be.gf2_gather(words, n, perm)
            calls = {
                "gf2_gather": functools.partial(be.gf2_gather, words, n, perm),
                "gf2_parities_ranges": functools.partial(be.gf2_parities_ranges, other, n, starts, stops),
                "gf2_parities_indexed": functools.partial(be.gf2_parities_indexed, words, n, perm, starts, stops),
                "gf2_flip_bits": functools.partial(be.gf2_flip_bits, words, n, flips),
                "gf2_hamming": functools.partial(be.gf2_hamming, words, other, n),
            }
            times[name] = per_call_s(calls[kernel], min_loop_s)
        emit(
            {
                "bench": "gf2_kernel",
                "kernel": kernel,
                "n_bits": n,
                "blocks": int(starts.size) if "parities" in kernel else None,
                "c_s_per_call": times["c"],
                "numpy_s_per_call": times["numpy"],
                "ratio_numpy_over_c": times["numpy"] / times["c"],
            }
        )


def bench_protocol(n: int, qbers: list[float], frames: int) -> None:
    for qber in qbers:
        for variant in VARIANTS:
            wall: dict[str, float] = {}
            for name in BACKENDS:
                be = get_backend(name)
                effs, rounds, corrected, failures, elapsed = [], [], 0, 0, 0.0
                for f in range(frames):
                    alice_bits, bob_bits, errors = make_frame(n, qber, 1000 * f + 1)
                    t0 = time.perf_counter()
                    alice = CascadeAlice(alice_bits, backend=be)
                    bob = CascadeBob(bob_bits, qber, np.random.default_rng(f), variant=variant, backend=be)
                    outcome = CascadePair(alice, bob, max_rounds=10**6).run()
                    elapsed += time.perf_counter() - t0
                    effs.append(reconciliation_efficiency(outcome.alice.parity_bits_disclosed, n, errors / n))
                    rounds.append(outcome.rounds)
                    corrected += outcome.bob.bits_corrected
                    failures += not outcome.keys_equal
                f_arr = np.array(effs)
                wall[name] = elapsed / frames
                emit(
                    {
                        "bench": "cascade",
                        "backend": name,
                        "variant": variant,
                        "n_bits": n,
                        "qber": qber,
                        "frames": frames,
                        "efficiency_mean": float(f_arr.mean()),
                        "efficiency_sem": float(f_arr.std(ddof=1) / math.sqrt(frames)) if frames > 1 else None,
                        "frames_with_remaining_errors": failures,
                        "rounds_mean": float(np.mean(rounds)),
                        "wall_s_per_frame": wall[name],
                        "corrected_bits_per_s": corrected / elapsed,
                        "key_bits_per_s": n * frames / elapsed,
                    }
                )
            emit(
                {
                    "bench": "cascade_backends",
                    "variant": variant,
                    "n_bits": n,
                    "qber": qber,
                    "ratio_numpy_over_c": wall["numpy"] / wall["c"],
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer QBERs and frames, shorter loops")
    args = parser.parse_args()
    emit(environment_record())
    bench_kernels(0.02 if args.quick else 0.1)
    qbers = [0.01, 0.05, 0.08] if args.quick else [q / 100 for q in range(1, 9)]
    bench_protocol(10_000, qbers, 5 if args.quick else 20)
    bench_protocol(1_000_000, qbers, 1)


if __name__ == "__main__":
    main()
