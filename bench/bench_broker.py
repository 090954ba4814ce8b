"""Benchmark the broker: request round trips over TCP, and the core's pair throughput.

Run: ``python bench/bench_broker.py [--quick] [--backends c,numpy]``. Prints one JSON
object per line:

* ``env``: Python, platform, CPU count;
* ``broker_roundtrip``: per backend, per op (``ping``; ``alloc_free`` = alloc 1 qubit
  then free it, two round trips), per number of client processes (1 and 4): total round
  trips per second over all clients and the median round-trip latency;
* ``core_pairs``: per backend, heralded pairs per second through the sans-IO core alone
  (epr_request, herald, allocate_state, batched epr_delivered, measure+free), no sockets.

Method: the broker is a real ``python -m emulator.broker`` process on 127.0.0.1 (port 0,
port file). Each client is a separate process (``multiprocessing`` spawn) with a plain
blocking socket (TCP_NODELAY) that registers as its own scenario node, then runs the
op in a closed loop (one request in flight per client). All clients start together at
a barrier; throughput = total round trips / the slowest client's elapsed time.
Wall-clock numbers depend on the machine (this one has few cores, so 4 clients share
them with the broker); compare backends within one run, not across machines.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from emulator.wire import (  # noqa: E402
    PROTOCOL_VERSION,
    Alloc,
    Allocated,
    FrameDecoder,
    Free,
    Hello,
    Message,
    Ping,
    decode,
    encode_framed,
)

NODE_TOKEN = "bench-node-token"
ADMIN_TOKEN = "bench-admin-token"
N_NODES = 4


def scenario_dict() -> dict[str, object]:
    names = [f"n{i}" for i in range(N_NODES)]
    return {
        "name": "bench-broker",
        "duration": "1h",
        "seed": 1,
        "nodes": {n: {"memory": {"qubits": 64}} for n in names},
        "links": [
            {"endpoints": [names[i], names[i + 1]], "length_km": 10, "entanglement": {"scheme": "double-click"}}
            for i in range(N_NODES - 1)
        ],
    }


# ------------------------------------------------------------------ client process


class SyncClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.next_id = 1
        self.pending: list[object] = []

    def call(self, message: Message) -> Message:
        msg_id = self.next_id
        self.next_id += 1
        self.sock.sendall(encode_framed(message, id=msg_id))
        while True:
            while (payload := self.decoder.next_frame()) is not None:
                env = decode(payload)
                if env.re == msg_id:
                    return env.message
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("broker closed the connection")
            self.decoder.feed(data)


def client_main(port: int, node: str, op: str, n: int, barrier: object, results: object) -> None:
    c = SyncClient(port)
    c.call(Hello(node=node, token=NODE_TOKEN, versions=[PROTOCOL_VERSION], capabilities=[],
                 tcp=("127.0.0.1", 1), udp=("127.0.0.1", 1)))
    for _ in range(50):  # warm-up
        c.call(Ping())
    latencies = np.empty(n)
    barrier.wait()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    if op == "ping":
        for i in range(n):
            t = time.perf_counter()
            c.call(Ping())
            latencies[i] = time.perf_counter() - t
    else:
        for i in range(n):
            t = time.perf_counter()
            reply = c.call(Alloc(count=1))
            assert isinstance(reply, Allocated), reply
            c.call(Free(qubits=reply.qubits))
            latencies[i] = (time.perf_counter() - t) / 2
    elapsed = time.perf_counter() - t0
    c.sock.close()
    results.put((elapsed, n * (1 if op == "ping" else 2), float(np.median(latencies))))  # type: ignore[attr-defined]


# ------------------------------------------------------------------ broker process


def start_broker(backend: str, run_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    from emulator.scenario import scenario_from_dict, scenario_to_dict

    scen = run_dir / "scenario.json"
    scen.write_text(json.dumps(scenario_to_dict(scenario_from_dict(scenario_dict()))))
    port_file = run_dir / "broker.port"
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "QNETEM_TOKEN": NODE_TOKEN, "QNETEM_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.broker", "--scenario", str(scen), "--port", "0",
         "--port-file", str(port_file), "--backend", backend, "--log-level", "warning"],
        env=env,
    )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("broker did not start")
        time.sleep(0.02)
    return proc, int(port_file.read_text())


def run_clients(port: int, op: str, clients: int, n: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients)
    results = ctx.Queue()
    procs = [ctx.Process(target=client_main, args=(port, f"n{i}", op, n, barrier, results)) for i in range(clients)]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    slowest = max(e for e, _, _ in out)
    total = sum(k for _, k, _ in out)
    return {
        "roundtrips": total,
        "seconds": round(slowest, 4),
        "roundtrips_per_s": round(total / slowest, 1),
        "median_latency_us": round(1e6 * statistics.median(m for _, _, m in out), 1),
    }


# ------------------------------------------------------------------ core-only pairs


def core_pairs(backend: str, n_pairs: int) -> dict[str, float]:
    from emulator.broker import BrokerConfig, EntanglementConfig, LinkConfig, MemoryConfig
    from emulator.kernels import get_backend
    from emulator.testing import InMemoryBroker
    from emulator.wire import EprDelivered, EprListen, EprRequest, Measure

    cfg = BrokerConfig.build(
        {"a": MemoryConfig(qubits=2048), "b": MemoryConfig(qubits=2048)},
        [LinkConfig(("a", "b"), 10.0, entanglement=EntanglementConfig())],
    )
    broker = InMemoryBroker(cfg, backend=get_backend(backend))
    a, b = broker.connect("a"), broker.connect("b")
    b.call(EprListen(peer="a", accept=True))
    t0 = time.perf_counter()
    a.call(EprRequest(peer="b", pairs=n_pairs))
    done = 0
    t_s = 0.0
    basis = np.zeros(1, dtype=np.uint8)
    while done < n_pairs:
        t_s += 0.05  # ~200 pairs per step at ~4 kHz: batches of realistic size
        broker.advance_to(t_s, batch=True)
        for s in (a, b):
            for m in s.messages(EprDelivered):
                s.call(Measure(qubits=m.qubits, bases=basis, free=True))
                if s is a:
                    done += len(m.pair_ids)
    elapsed = time.perf_counter() - t0
    return {"pairs": n_pairs, "seconds": round(elapsed, 4), "pairs_per_s": round(n_pairs / elapsed, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", default="c,numpy")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    n_single = 500 if args.quick else 3000
    n_multi = 250 if args.quick else 1500
    n_pairs = 2000 if args.quick else 10000
    print(json.dumps({"bench": "env", "python": platform.python_version(), "platform": platform.platform(),
                      "cpus": os.cpu_count()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="qnetem-bench-") as tmp:
        for backend in backends:
            proc, port = start_broker(backend, Path(tmp))
            try:
                for op in ("ping", "alloc_free"):
                    for clients, n in ((1, n_single), (N_NODES, n_multi)):
                        res = run_clients(port, op, clients, n)
                        print(json.dumps({"bench": "broker_roundtrip", "backend": backend, "op": op,
                                          "clients": clients, **res}), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    for backend in backends:
        print(json.dumps({"bench": "core_pairs", "backend": backend, **core_pairs(backend, n_pairs)}), flush=True)


if __name__ == "__main__":
    main()
