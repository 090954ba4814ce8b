"""Benchmark the polynomial hash over GF(2^127 - 1) (QKD authentication and verification),
C kernel against its Python-integer twin, in the same run.

Run: ``python bench/bench_auth.py [--quick]``. Prints one JSON object per line: an
environment line, then

* ``poly127_hash``: ``Backend.poly127_hash`` on 16 KiB and 1 MiB of random bytes for the
  "c" and "numpy" backends — seconds per call, MB/s (10^6 bytes per second), ns per
  15-byte block — and the ratio numpy/c;
* ``auth_round_trip``: ``Authenticator.seal`` + ``verify`` of a 64 B, 16 KiB and 1 MiB
  payload with each backend (what the QKD link session does per message).

Method: time.perf_counter around a loop of calls, repeated until a loop lasts >= 0.2 s
(0.05 s with --quick); best of 3 loops (bench/_common.py). Inputs are fixed-seed random
bytes and a fixed key r; both backends hash the same buffer. Single thread.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit, environment_record, per_call_s  # noqa: E402

import numpy as np  # noqa: E402

from emulator.kernels import POLY127_PRIME, get_backend  # noqa: E402
from nodes.qkd.authentication import Authenticator, DirectionalKeys  # noqa: E402

BACKENDS = ("c", "numpy")
HASH_SIZES = {"16KiB": 1 << 14, "1MiB": 1 << 20}
AUTH_SIZES = (64, 1 << 14, 1 << 20)


def bench_hash(rng: np.random.Generator, label: str, n_bytes: int, min_loop_s: float) -> None:
    data = rng.bytes(n_bytes)
    r = int.from_bytes(rng.bytes(16), "little") % POLY127_PRIME
    record: dict[str, object] = {"bench": "poly127_hash", "size": label, "n_bytes": n_bytes}
    values = {}
    times = {}
    for name in BACKENDS:
        be = get_backend(name)
        values[name] = be.poly127_hash(data, r, n_bytes)
        t = times[name] = per_call_s(lambda be=be: be.poly127_hash(data, r, n_bytes), min_loop_s, loops=3)
        record |= {
            f"{name}_s_per_call": t,
            f"{name}_MB_per_s": n_bytes / t / 1e6,
            f"{name}_ns_per_block": t / -(-n_bytes // 15) * 1e9,
        }
    record["speedup_c_over_numpy"] = times["numpy"] / times["c"]
    record["results_equal"] = values["c"] == values["numpy"]
    emit(record)


def bench_round_trip(size: int, min_loop_s: float) -> None:
    material = os.urandom(1 << 16)  # throwaway key, refilled: 2048 messages per direction
    payload = np.random.default_rng(size).bytes(size)
    record: dict[str, object] = {"bench": "auth_round_trip", "payload_bytes": size}
    times = {}
    for name in BACKENDS:
        be = get_backend(name)
        keys_a = DirectionalKeys(initiator=True, material=material)
        keys_b = DirectionalKeys(initiator=False, material=material)
        alice = Authenticator.from_keys(keys_a, backend=be)
        bob = Authenticator.from_keys(keys_b, backend=be)

        def round_trip(alice: Authenticator = alice, bob: Authenticator = bob,
                       keys_a: DirectionalKeys = keys_a, keys_b: DirectionalKeys = keys_b) -> None:  # fmt: skip
            if keys_a.outbound.bits_available < 256:  # a refill is a bytearray append: negligible
                keys_a.add(material)
                keys_b.add(material)
            seq = alice.next_seal_seq
            bob.verify(payload, seq, alice.seal(payload, seq))

        t = times[name] = per_call_s(round_trip, min_loop_s, loops=3)
        record |= {f"{name}_s_per_seal_and_verify": t, f"{name}_payload_MB_per_s": size / t / 1e6}
    record["speedup_c_over_numpy"] = times["numpy"] / times["c"]
    emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter loops (noisier numbers)")
    args = parser.parse_args()
    min_loop_s = 0.05 if args.quick else 0.2
    emit(environment_record())
    rng = np.random.default_rng(2025)
    for label, n_bytes in HASH_SIZES.items():
        bench_hash(rng, label, n_bytes, min_loop_s)
    for size in AUTH_SIZES:
        bench_round_trip(size, min_loop_s)


if __name__ == "__main__":
    main()
