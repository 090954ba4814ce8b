"""Benchmark privacy amplification, key verification and message authentication.

Run: ``python bench/bench_pa.py [--quick] [--sizes 100000,1000000,10000000]``. Prints one
JSON object per line: an environment line, then

* ``pa_toeplitz``: Toeplitz hashing of an n-bit key to m = n/2 bits (a typical
  compression after Cascade and the finite-key terms) with the default FFT method and
  with the exact NTT method; throughput in input bits per second (the rate at which
  corrected key is consumed) and output bits per second;
* ``pa_direct_baseline``: the direct O(n·m) matrix product (``toeplitz_hash_reference``)
  at the small size it can handle (n = 4096, m = 2048), measured, and its time at
  n = 10^6 extrapolated by n·m scaling (it would need an 10^6 × 5·10^5 matrix of
  5·10^11 entries, so it cannot be run there). Compare with ``pa_toeplitz`` at n = 4096
  (also printed) and at 10^6;
* ``verification_hash``: tag computation for n-bit keys at ε_cor = 1e-15, bits/s;
* ``authentication``: seal + verify of post-processing messages of 64 B, 1 kB, 64 kB.

Method: time.perf_counter around a loop of calls, repeated until a loop lasts >= 0.2 s
(0.05 s with --quick); best of 3 loops. Inputs are fixed-seed random bits. Single
thread (numpy's pocketfft FFT is single-threaded).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit, environment_record, per_call_s  # noqa: E402

import numpy as np  # noqa: E402

from nodes.qkd.amplification import (  # noqa: E402
    ConvolutionMethod,
    draw_seed,
    toeplitz_hash,
    toeplitz_hash_reference,
)
from nodes.qkd.authentication import Authenticator, DirectionalKeys  # noqa: E402
from nodes.qkd.verification import VerificationHash  # noqa: E402


def bench_pa(rng: np.random.Generator, n: int, min_loop_s: float, with_ntt: bool) -> None:
    m = n // 2
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed = draw_seed(rng, n, m)
    t_fft = per_call_s(lambda: toeplitz_hash(key, seed, m), min_loop_s, loops=3)
    record = {
        "bench": "pa_toeplitz",
        "n_in_bits": n,
        "n_out_bits": m,
        "fft_s_per_block": t_fft,
        "fft_input_bits_per_s": n / t_fft,
        "fft_output_bits_per_s": m / t_fft,
    }
    if with_ntt:
        t_ntt = per_call_s(lambda: toeplitz_hash(key, seed, m, method=ConvolutionMethod.NTT), min_loop_s, loops=1)
        record |= {"ntt_s_per_block": t_ntt, "ntt_input_bits_per_s": n / t_ntt}
    emit(record)


def bench_direct(rng: np.random.Generator, min_loop_s: float) -> None:
    n, m = 4096, 2048
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed = draw_seed(rng, n, m)
    t_direct = per_call_s(lambda: toeplitz_hash_reference(key, seed, m), min_loop_s, loops=3)
    t_fft = per_call_s(lambda: toeplitz_hash(key, seed, m), min_loop_s, loops=3)
    big_n, big_m = 10**6, 10**6 // 2
    emit(
        {
            "bench": "pa_direct_baseline",
            "n_in_bits": n,
            "n_out_bits": m,
            "direct_s_per_block": t_direct,
            "direct_input_bits_per_s": n / t_direct,
            "fft_s_per_block_same_size": t_fft,
            "speedup_fft_over_direct": t_direct / t_fft,
            "direct_s_per_block_at_1e6_extrapolated": t_direct * (big_n * big_m) / (n * m),
            "note": "direct = explicit Toeplitz matrix times key mod 2; 1e6 figure scaled by n*m",
        }
    )


def bench_verification(rng: np.random.Generator, n: int, min_loop_s: float) -> None:
    h = VerificationHash.for_epsilon(n, 1e-15)
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed = h.draw_seed(rng)
    t = per_call_s(lambda: h.tag(key, seed), min_loop_s, loops=3)
    emit(
        {
            "bench": "verification_hash",
            "n_bits": n,
            "eps_cor": 1e-15,
            "tag_bits": h.tag_bits,
            "seed_bytes": h.seed_bytes,
            "s_per_tag": t,
            "bits_per_s": n / t,
        }
    )


def bench_auth(size: int, min_loop_s: float) -> None:
    material = os.urandom(1 << 24)  # throwaway key: 16 MiB, enough for ~500k messages per direction
    alice = Authenticator.from_keys(DirectionalKeys(initiator=True, material=material))
    bob = Authenticator.from_keys(DirectionalKeys(initiator=False, material=material))
    payload = bytes(size)

    def round_trip() -> None:
        seq = alice.next_seal_seq
        bob.verify(payload, seq, alice.seal(payload, seq))

    t = per_call_s(round_trip, min_loop_s, loops=3)
    emit(
        {
            "bench": "authentication",
            "payload_bytes": size,
            "s_per_seal_and_verify": t,
            "messages_per_s": 1 / t,
            "payload_bytes_per_s": size / t,
            "key_bits_per_message": 128,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter loops (noisier numbers)")
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="comma-separated key sizes in bits")
    args = parser.parse_args()
    min_loop_s = 0.05 if args.quick else 0.2
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    emit(environment_record())
    rng = np.random.default_rng(2024)
    bench_direct(rng, min_loop_s)
    bench_pa(rng, 4096, min_loop_s, with_ntt=True)
    for n in sizes:
        bench_pa(rng, n, min_loop_s, with_ntt=n <= 10**6)
    for n in sizes:
        bench_verification(rng, n, min_loop_s)
    for size in (64, 1024, 65536):
        bench_auth(size, min_loop_s)


if __name__ == "__main__":
    main()
