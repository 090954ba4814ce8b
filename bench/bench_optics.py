"""Benchmark the QKD optical sampler: detected pulses emulated per second, C vs numpy.

Run: ``python bench/bench_optics.py [--quick]``. Prints one JSON object per line: first
an environment line, then for 10 km and 100 km of fibre (GYS parameters of Ma et al.
2005: alpha 0.21 dB/km, eta_Bob 4.5 %, Y0 1.7e-6, e_d 3.3 %; mu = 0.48 / 0.05 / 0 sent
with probabilities 0.8 / 0.1 / 0.1) one line per backend with the detections per second,
the pulses per second this is equivalent to (pulses of the window / wall time), and the
ratio to the pulse rate of a 1 GHz transmitter ("real_time_factor_at_1ghz": > 1 means
faster than the hardware), then a line with the ratio c / numpy.

Method: both backends sample the SAME window (same keys, same parameters, hence the same
detections: the kernels are bit-identical), chunked as the broker does (at most 2**20
detections per call). The window holds ~2 million detections (~400 000 with --quick);
time.perf_counter around the whole window, best of 3 runs (the minimum is the least
disturbed by other load).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit, environment_record  # noqa: E402

import numpy as np  # noqa: E402

from emulator.kernels import (  # noqa: E402
    OpticsCursor,
    OpticsParameters,
    build_optics_model,
    get_backend,
)

BACKENDS = ("c", "numpy")
CHUNK = 1 << 20


def gys(length_km: float) -> OpticsParameters:
    return OpticsParameters(
        intensities=(0.48, 0.05, 0.0),
        class_probabilities=(0.8, 0.1, 0.1),
        channel_transmittance=10.0 ** (-0.21 * length_km / 10.0),
        receiver_efficiency=0.045,
        dark_count_probability=1.7e-6,
        misalignment_error=0.033,
    )


def run_window(backend, model, n_pulses: int) -> int:
    cursor, total = OpticsCursor(), 0
    while True:
        det, cursor = backend.optics_sample(model, cursor, n_pulses, CHUNK)
        total += len(det)
        if len(det) < CHUNK:
            return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller windows (noisier numbers)")
    args = parser.parse_args()
    target = 400_000 if args.quick else 2_000_000
    emit(environment_record())
    for length_km in (10, 100):
        params = gys(length_km)
        model = build_optics_model(params, alice_key=0x5EED, channel_key=0xC0FFEE)
        rate = float(np.dot(params.choice_thresholds.class_probabilities, model.click_probability[:3]))
        n_pulses = int(target / rate)
        rates: dict[str, float] = {}
        for name in BACKENDS:
            be = get_backend(name)
            run_window(be, model, min(n_pulses, 10_000_000))  # warm-up
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                detections = run_window(be, model, n_pulses)
                best = min(best, time.perf_counter() - t0)
            rates[name] = detections / best
            emit(
                {
                    "bench": "optics_sample",
                    "backend": name,
                    "length_km": length_km,
                    "pulses": n_pulses,
                    "detections": detections,
                    "clicks_per_pulse": detections / n_pulses,
                    "seconds": best,
                    "detections_per_s": detections / best,
                    "pulses_per_s_equivalent": n_pulses / best,
                    "real_time_factor_at_1ghz": n_pulses / best / 1e9,
                }
            )
        ratio = rates["c"] / rates["numpy"]
        emit({"bench": "optics_sample_ratio", "length_km": length_km, "ratio_c_over_numpy": ratio})


if __name__ == "__main__":
    main()
