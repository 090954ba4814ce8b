"""The broker core, driven through emulator.testing.InMemoryBroker (no sockets, fake time).

Statistical tests use fixed seeds; each states where its tolerance comes from.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.broker.core import node_seed
from emulator.broker import (
    BrokerConfig,
    BrokerCore,
    BrokerLimits,
    EntanglementConfig,
    LinkConfig,
    MemoryConfig,
    SessionState,
)
from emulator.kernels import GATES, BellState, derive_key, get_backend
from emulator.physics import HeraldingScheme, propagation_delay_s, transmittance
from emulator.state import QuantumRegistry
from emulator.testing import BrokerRequestError, FakeClock, InMemoryBroker, InMemoryBrokerSession
from emulator.wire import (
    FibreCut,
    PROTOCOL_VERSION,
    AdminHello,
    Alloc,
    Allocated,
    Bye,
    Circuit,
    Clock,
    EprAccepted,
    EprCancel,
    EprDelivered,
    EprDone,
    EprListen,
    EprRequest,
    Error,
    Free,
    Gate,
    GateOp,
    GetStats,
    Hello,
    Measure,
    Measured,
    Ok,
    PeerDown,
    PeerUp,
    Ping,
    Pong,
    QubitTransfer,
    SendQubit,
    Shutdown,
    Stats,
    Status,
    StatusReply,
    Unitary,
    Welcome,
    encode,
    encode_frame,
    encode_framed,
    message_types,
)

SEED = 20240611
ENT = EntanglementConfig(scheme=HeraldingScheme.DOUBLE_CLICK, detector_efficiency=0.8, visibility=0.9)


def config(
    *,
    memory: MemoryConfig | None = None,
    length_km: float = 10.0,
    entanglement: EntanglementConfig | None = ENT,
    limits: BrokerLimits | None = None,
    seed: int = SEED,
) -> BrokerConfig:
    """alice - bob (entangling), bob - carol (fibre only); dave has no link."""
    mem = memory or MemoryConfig(qubits=8)
    return BrokerConfig.build(
        {"alice": mem, "bob": mem, "carol": mem, "dave": mem},
        [
            LinkConfig(("alice", "bob"), length_km, entanglement=entanglement, jitter_s=1e-4, udp_loss=0.01),
            LinkConfig(("bob", "carol"), 50.0),
        ],
        seed=seed,
        limits=limits or BrokerLimits(),
    )


@pytest.fixture(params=["numpy", "c"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


def make_broker(cfg: BrokerConfig | None = None, backend: str = "numpy") -> InMemoryBroker:
    return InMemoryBroker(cfg or config(), backend=get_backend(backend))


def error_of(env_or_msg: object) -> str:
    msg = getattr(env_or_msg, "message", env_or_msg)
    assert isinstance(msg, Error), f"expected an error, got {msg!r}"
    return msg.code


def alloc(s: InMemoryBrokerSession, n: int = 1) -> list[int]:
    reply = s.call(Alloc(count=n), check=True).message
    assert isinstance(reply, Allocated)
    return [int(q) for q in reply.qubits]


def ping_ok(s: InMemoryBrokerSession) -> bool:
    return isinstance(s.call(Ping()).message, Pong)


def hello(node: str, token: str, versions: tuple[int, ...] = (PROTOCOL_VERSION,)) -> Hello:
    return Hello(
        node=node,
        token=token,
        versions=list(versions),
        capabilities=[],
        tcp=("127.0.0.1", 7000),
        udp=("127.0.0.1", 7001),
    )


# ============================================================================ registration


def test_registration_welcome_and_peer_up() -> None:
    broker = make_broker()
    alice = broker.connect("alice", tcp=("127.0.0.1", 1111), udp=("127.0.0.1", 1112))
    w = alice.welcome
    assert isinstance(w, Welcome)
    assert w.node == "alice" and w.version == PROTOCOL_VERSION and w.time_scale == 1.0
    assert w.seed == derive_key(SEED, "node", "alice") & (2**63 - 1) == node_seed(SEED, "alice")
    assert w.memory_qubits == 8
    assert [link.peer for link in w.links] == ["bob"]
    assert w.links[0].entanglement and w.links[0].length_km == 10.0 and w.links[0].udp_loss == 0.01
    assert alice.events() == []  # no neighbour registered yet

    bob = broker.connect("bob", tcp=("127.0.0.1", 2221), udp=("127.0.0.1", 2222))
    assert {link.peer for link in bob.welcome.links} == {"alice", "carol"}
    assert bob.messages() == [PeerUp(node="alice", tcp=("127.0.0.1", 1111), udp=("127.0.0.1", 1112))]
    assert alice.messages() == [PeerUp(node="bob", tcp=("127.0.0.1", 2221), udp=("127.0.0.1", 2222))]
    dave = broker.connect("dave")
    assert dave.events() == [] and alice.events() == [] and bob.events() == []  # dave has no neighbours


def test_wrong_token_is_unauthorized_and_closed_while_others_work() -> None:
    broker = make_broker()
    alice = broker.connect("alice")
    intruder = broker.connect_raw()
    reply = intruder.call(hello("bob", "not-the-token"))
    assert error_of(reply) == "unauthorized"
    assert reply.re is not None
    assert intruder.closed
    assert broker.core.session_state(intruder.session_id) is None  # closed and forgotten
    assert ping_ok(alice)
    bob = broker.connect("bob")  # the name was not taken by the failed attempt
    assert ping_ok(bob)
    assert broker.core.statistics().errors_by_code == {"unauthorized": 1}


def test_unknown_node_duplicate_and_version_mismatch_keep_the_session() -> None:
    broker = make_broker()
    broker.connect("alice")
    s = broker.connect_raw()
    assert error_of(s.call(hello("mallory", broker.node_token))) == "unknown_node"
    assert error_of(s.call(hello("alice", broker.node_token))) == "already_registered"
    assert error_of(s.call(hello("bob", broker.node_token, versions=(99,)))) == "unsupported_version"
    assert error_of(s.call(hello("bob", broker.node_token, versions=()))) == "unsupported_version"
    # envelope version 2 is refused by the decoder, with the id echoed
    frame = encode_frame(msgpack.packb({"v": 2, "t": "ping", "id": 77}))
    s.send_raw(frame)
    (env,) = s.events()
    assert error_of(env) == "unsupported_version" and env.re == 77
    assert not s.closed
    reply = s.call(hello("bob", broker.node_token, versions=(PROTOCOL_VERSION, 42)))
    assert isinstance(reply.message, Welcome) and reply.message.version == PROTOCOL_VERSION
    assert error_of(s.call(hello("bob", broker.node_token))) == "already_registered"  # second hello


def test_requests_before_registration_are_not_registered() -> None:
    broker = make_broker()
    s = broker.connect_raw()
    for msg in (Alloc(count=1), Ping(), Clock(), Status(), EprListen(peer="bob", accept=True)):
        assert error_of(s.call(msg)) == "not_registered"
    assert not s.closed


def test_welcome_is_not_a_request() -> None:
    broker = make_broker()
    alice = broker.connect("alice")
    assert error_of(alice.call(Ok())) == "unknown_type"
    assert error_of(alice.call(Status())) == "not_registered"  # admin-only request


# ============================================================================ framing and bad input


def test_bad_frames_get_typed_errors_and_the_session_survives() -> None:
    broker = make_broker()
    alice = broker.connect("alice")
    bob = broker.connect("bob")
    alice.events()
    bob.events()

    # truncated frame: the length prefix is honest, the msgpack map inside is cut short
    good = encode(Ping(), id=5)
    alice.send_raw(encode_frame(good[:-3]))
    (env,) = alice.events()
    assert error_of(env) == "bad_frame"

    # garbage bytes in a frame
    alice.send_raw(encode_frame(b"\xc1\xff\x00garbage"))
    assert error_of(alice.events()[0]) == "bad_frame"

    # a msgpack value that is not a map
    alice.send_raw(encode_frame(msgpack.packb([1, 2, 3])))
    assert error_of(alice.events()[0]) == "bad_frame"

    # unknown message type: the request id comes back in `re`
    alice.send_raw(encode_frame(msgpack.packb({"v": 1, "t": "teleport_me", "id": 41})))
    (env,) = alice.events()
    assert error_of(env) == "unknown_type" and env.re == 41

    # bad field: count is a string
    alice.send_raw(encode_frame(msgpack.packb({"v": 1, "t": "alloc", "id": 42, "count": "many"})))
    (env,) = alice.events()
    assert error_of(env) == "bad_field" and env.re == 42
    # extra field
    alice.send_raw(encode_frame(msgpack.packb({"v": 1, "t": "alloc", "id": 43, "count": 1, "x": 0})))
    (env,) = alice.events()
    assert error_of(env) == "bad_field" and env.re == 43

    # frame split across many receive_data calls still works
    frame = encode_framed(Ping(), id=44)
    for i in range(len(frame)):
        alice.send_raw(frame[i : i + 1])
    (env,) = alice.events()
    assert isinstance(env.message, Pong) and env.re == 44

    assert not alice.closed
    assert ping_ok(alice) and ping_ok(bob)
    counts = broker.core.statistics().errors_by_code
    assert counts == {"bad_frame": 3, "unknown_type": 1, "bad_field": 2}


def test_oversized_frame_closes_only_that_session() -> None:
    broker = make_broker(config(limits=BrokerLimits(max_frame_bytes=1024)))
    alice = broker.connect("alice")
    bob = broker.connect("bob")
    alice.events()
    bob.events()
    qs = alloc(alice, 2)
    alice.send_raw(struct.pack(">I", 1025) + b"x" * 10)
    (env,) = alice.events()
    assert error_of(env) == "frame_too_large"
    assert alice.closed
    # the closed node was released: qubits gone, neighbours told
    assert all(q not in broker.core.registry for q in qs)
    assert bob.messages() == [PeerDown(node="alice")]
    assert ping_ok(bob)


def test_internal_error_is_reported_and_the_session_survives(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = make_broker()
    alice = broker.connect("alice")
    (q,) = alloc(alice)

    def broken(*args: object) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(QuantumRegistry, "measure", broken)
    assert error_of(alice.call(Measure(qubits=np.array([q]), bases=np.array([0], dtype=np.uint8)))) == "internal"
    monkeypatch.undo()
    assert ping_ok(alice)


# ============================================================================ ownership and resources


def test_ownership_rules() -> None:
    broker = make_broker()
    alice, bob = broker.connect("alice"), broker.connect("bob")
    (qa,) = alloc(alice)
    assert error_of(bob.call(Gate(op=GateOp("x", [qa])))) == "not_owner"
    assert error_of(bob.call(Free(qubits=np.array([qa])))) == "not_owner"
    assert error_of(bob.call(Measure(qubits=np.array([qa]), bases=np.array([0], dtype=np.uint8)))) == "not_owner"
    assert error_of(bob.call(SendQubit(qubit=qa, peer="alice"))) == "not_owner"
    assert error_of(alice.call(Gate(op=GateOp("x", [123456])))) == "unknown_qubit"
    alice.call(Free(qubits=np.array([qa])), check=True)
    assert error_of(alice.call(Gate(op=GateOp("x", [qa])))) == "unknown_qubit"  # freed
    assert error_of(alice.call(Free(qubits=np.array([qa])))) == "unknown_qubit"


def test_memory_full_is_no_resource() -> None:
    broker = make_broker(config(memory=MemoryConfig(qubits=3)))
    alice = broker.connect("alice")
    alloc(alice, 2)
    assert error_of(alice.call(Alloc(count=2))) == "no_resource"
    (q,) = alloc(alice, 1)
    assert error_of(alice.call(Alloc(count=1))) == "no_resource"
    assert error_of(alice.call(Alloc(count=0))) == "bad_field"
    alice.call(Free(qubits=np.array([q])), check=True)
    alloc(alice, 1)
    assert broker.core.statistics().qubits_in_use["alice"] == 3


def test_circuit_is_atomic() -> None:
    broker = make_broker(config(limits=BrokerLimits(max_register_qubits=2)))
    alice, bob = broker.connect("alice"), broker.connect("bob")
    q0, q1, q2 = alloc(alice, 3)
    (qb,) = alloc(bob)
    reg = broker.core.registry
    zero = np.array([[1, 0], [0, 0]], dtype=complex)

    bad_circuits = {
        "not_owner": [GateOp("x", [q0]), GateOp("x", [qb])],
        "unknown_gate": [GateOp("x", [q0]), GateOp("toffoli", [q0, q1])],
        "bad_field": [GateOp("x", [q0]), GateOp("cnot", [q1])],
        "unknown_qubit": [GateOp("h", [q0]), GateOp("x", [999])],
        # each gate alone fits the 2-qubit register limit, together they do not
        "no_resource": [GateOp("h", [q0]), GateOp("cnot", [q0, q1]), GateOp("cnot", [q1, q2])],
    }
    for code, ops in bad_circuits.items():
        assert error_of(alice.call(Circuit(ops=ops))) == code, code
        for q in (q0, q1, q2):
            np.testing.assert_allclose(reg.reduced_state([q]), zero, atol=1e-12)
            assert reg.register_of(q) == (q,)
    alice.call(Circuit(ops=[GateOp("x", [q0]), GateOp("rx", [q1], [math.pi])]), check=True)
    one = np.array([[0, 0], [0, 1]], dtype=complex)
    np.testing.assert_allclose(reg.reduced_state([q0]), one, atol=1e-12)
    np.testing.assert_allclose(reg.reduced_state([q1]), one, atol=1e-12)
    alice.events()
    alice.send_raw(encode_frame(msgpack.packb(
        {"v": 1, "t": "gate", "id": 99, "op": {"name": "rz", "qubits": [q0], "params": [math.inf]}}
    )))
    (env,) = alice.events()
    assert error_of(env) == "bad_field" and env.re == 99
    assert error_of(alice.call(Gate(op=GateOp("cnot", [q0, q0])))) == "bad_field"


def test_bell_pair_by_gates_then_measure(backend_name: str) -> None:
    broker = make_broker(backend=backend_name)
    alice = broker.connect("alice")
    reg = broker.core.registry
    phi_plus = np.outer([1, 0, 0, 1], [1, 0, 0, 1]) / 2
    outcomes = []
    for basis in (0, 1) * 50:
        a, b = alloc(alice, 2)
        alice.call(Circuit(ops=[GateOp("h", [a]), GateOp("cnot", [a, b])]), check=True)
        np.testing.assert_allclose(reg.reduced_state([a, b]), phi_plus, atol=1e-12)
        m = alice.call(Measure(qubits=np.array([a, b]), bases=np.array([basis], dtype=np.uint8), free=True)).message
        assert isinstance(m, Measured)
        outcomes.append(tuple(int(x) for x in m.outcomes))
    # Phi+ is perfectly correlated in Z and in X
    assert all(x == y for x, y in outcomes)
    # both outcomes occur (P(all 100 equal) = 2 * 2^-100 for a fair coin)
    assert {x for x, _ in outcomes} == {0, 1}
    assert broker.core.statistics().qubits_in_use["alice"] == 0


def test_unitary_and_measure_validation() -> None:
    broker = make_broker()
    alice = broker.connect("alice")
    a, b = alloc(alice, 2)
    x = np.ascontiguousarray(GATES["X"], dtype="<c16").tobytes()
    alice.call(Unitary(qubits=[a], matrix=x), check=True)
    np.testing.assert_allclose(broker.core.registry.reduced_state([a]), np.diag([0, 1]), atol=1e-12)
    assert error_of(alice.call(Unitary(qubits=[a], matrix=np.eye(2, dtype="<c16").tobytes() * 2))) == "bad_field"
    assert error_of(alice.call(Unitary(qubits=[a], matrix=(2 * np.eye(2, dtype="<c16")).tobytes()))) == "bad_field"
    assert error_of(alice.call(Unitary(qubits=[a, a], matrix=np.eye(4, dtype="<c16").tobytes()))) == "bad_field"
    alice.call(Unitary(qubits=[a, b], matrix=np.ascontiguousarray(GATES["CNOT"]).tobytes()), check=True)
    m = alice.call(Measure(qubits=np.array([a, b]), bases=np.array([0, 0], dtype=np.uint8))).message
    assert list(m.outcomes) == [1, 1]
    assert error_of(alice.call(Measure(qubits=np.array([a, b]), bases=np.array([0, 1, 2], dtype=np.uint8)))) == "bad_field"
    assert error_of(alice.call(Measure(qubits=np.array([a]), bases=np.array([3], dtype=np.uint8)))) == "bad_field"
    assert error_of(alice.call(Measure(qubits=np.array([a, a]), bases=np.array([0], dtype=np.uint8)))) == "bad_field"


def test_gate_noise_and_lazy_decoherence() -> None:
    t2_s = 0.5
    mem = MemoryConfig(qubits=4, t1_s=math.inf, t2_s=t2_s, gate_fidelity=0.95)
    broker = make_broker(config(memory=mem))
    alice = broker.connect("alice")
    reg = broker.core.registry
    (q,) = alloc(alice)
    alice.call(Gate(op=GateOp("x", [q])), check=True)
    # depolarising p = 2(1 - F) = 0.1 (Nielsen 2002 eq. 3): P(|1>) = 1 - p/2
    np.testing.assert_allclose(reg.reduced_state([q])[1, 1].real, 1 - 0.1 / 2, atol=1e-12)

    (r,) = alloc(alice)
    alice.call(Gate(op=GateOp("h", [r])), check=True)
    coherence0 = reg.reduced_state([r])[0, 1].real  # (1 - p)/2 after the noisy H
    np.testing.assert_allclose(coherence0, 0.9 / 2, atol=1e-12)
    broker.advance_to(0.3)
    # nothing touched r: lazily, its state is still that of t = 0
    np.testing.assert_allclose(reg.reduced_state([r])[0, 1].real, coherence0, atol=1e-12)
    alice.call(Measure(qubits=np.array([q]), bases=np.array([0], dtype=np.uint8)), check=True)  # other qubit
    np.testing.assert_allclose(reg.reduced_state([r])[0, 1].real, coherence0, atol=1e-12)
    # touching r applies e^{-t/T2} for t = 0.3 s first, then the gate (and its noise)
    alice.call(Gate(op=GateOp("z", [r])), check=True)
    expected = -coherence0 * math.exp(-0.3 / t2_s) * (1 - 0.1)
    np.testing.assert_allclose(reg.reduced_state([r])[0, 1].real, expected, atol=1e-12)


# ============================================================================ send_qubit


def test_send_qubit_arrival_rate_and_exact_delay() -> None:
    # bob - carol: 50 km at 0.2 dB/km -> transmittance 0.1
    broker = make_broker(config(memory=MemoryConfig(qubits=10_000)))
    bob, carol = broker.connect("bob"), broker.connect("carol")
    bob.events()
    carol.events()
    eta = transmittance(50.0, 0.2)
    delay_s = propagation_delay_s(50.0)
    assert eta == pytest.approx(0.1)
    n = 4000
    arrived = 0
    for i in range(n):
        t_send = i * 1e-3
        broker.advance_to(t_send)
        (q,) = alloc(bob)
        bob.call(SendQubit(qubit=q, peer="carol"), check=True)
        assert error_of(bob.call(Gate(op=GateOp("x", [q])))) == "not_owner"  # in flight
        broker.advance_to(t_send + delay_s / 2)
        assert bob.events() == [] and carol.events() == []
        broker.advance_to(t_send + delay_s)
        (ev_b,) = bob.messages()
        (ev_c,) = carol.messages()
        assert ev_b == ev_c and isinstance(ev_b, QubitTransfer)
        assert ev_b.qubit == q and ev_b.sender == "bob" and ev_b.receiver == "carol"
        assert ev_b.now_s == t_send + delay_s  # exactly the propagation delay
        if ev_b.arrived:
            arrived += 1
            assert error_of(bob.call(Free(qubits=np.array([q])))) == "not_owner"
            carol.call(Free(qubits=np.array([q])), check=True)
        else:
            assert error_of(carol.call(Free(qubits=np.array([q])))) == "unknown_qubit"
    # 4 sigma of the binomial std with n = 4000, p = 0.1: 4 * sqrt(0.1 * 0.9 / 4000) = 0.019
    tolerance = 4 * math.sqrt(eta * (1 - eta) / n)
    assert abs(arrived / n - eta) < tolerance
    stats = broker.core.statistics()
    assert stats.qubits_sent == n and stats.qubits_lost == n - arrived


def test_send_qubit_needs_a_link_and_a_known_peer() -> None:
    broker = make_broker()
    alice = broker.connect("alice")
    (q,) = alloc(alice)
    assert error_of(alice.call(SendQubit(qubit=q, peer="carol"))) == "no_link"
    assert error_of(alice.call(SendQubit(qubit=q, peer="zed"))) == "unknown_node"
    # bob is linked but not registered: the qubit is lost on arrival
    alice.call(SendQubit(qubit=q, peer="bob"), check=True)
    broker.advance(1.0)
    (ev,) = alice.messages()
    assert isinstance(ev, QubitTransfer) and not ev.arrived
    assert q not in broker.core.registry


def test_qubit_arriving_at_a_full_memory_is_lost() -> None:
    # 0 dB link so that only the memory can lose the qubit
    cfg = BrokerConfig.build(
        {"alice": MemoryConfig(qubits=2), "bob": MemoryConfig(qubits=1)},
        [LinkConfig(("alice", "bob"), 1.0, attenuation_db_per_km=0.0)],
    )
    broker = make_broker(cfg)
    alice, bob = broker.connect("alice"), broker.connect("bob")
    a1, a2 = alloc(alice, 2)
    alice.call(SendQubit(qubit=a1, peer="bob"), check=True)
    alloc(bob, 1)  # fills bob's memory while a1 is in flight
    broker.advance(1.0)
    ev = [m for m in alice.messages() if isinstance(m, QubitTransfer)]
    assert len(ev) == 1 and not ev[0].arrived
    assert a1 not in broker.core.registry


# ============================================================================ heralded entanglement


def listen(s: InMemoryBrokerSession, peer: str) -> None:
    s.call(EprListen(peer=peer, accept=True), check=True)


def request_pairs(s: InMemoryBrokerSession, peer: str, pairs: int) -> int:
    reply = s.call(EprRequest(peer=peer, pairs=pairs), check=True).message
    assert isinstance(reply, EprAccepted)
    return reply.request


def test_epr_refusals() -> None:
    cfg = dataclasses.replace(
        config(), links=config().links + (LinkConfig(("alice", "carol"), 5.0),)
    )  # alice - carol: fibre without entanglement
    broker = make_broker(cfg)
    alice = broker.connect("alice")
    assert error_of(alice.call(EprRequest(peer="bob", pairs=1))) == "refused"  # bob not registered
    bob = broker.connect("bob")
    assert error_of(alice.call(EprRequest(peer="bob", pairs=1))) == "refused"  # bob not listening
    carol = broker.connect("carol")
    listen(carol, "alice")
    assert error_of(alice.call(EprRequest(peer="carol", pairs=1))) == "refused"  # no entanglement on link
    assert error_of(alice.call(EprRequest(peer="dave", pairs=1))) == "no_link"
    assert error_of(alice.call(EprRequest(peer="zed", pairs=1))) == "unknown_node"
    assert error_of(bob.call(EprListen(peer="dave", accept=True))) == "no_link"
    listen(bob, "alice")
    assert error_of(alice.call(EprRequest(peer="bob", pairs=0))) == "bad_field"
    request_pairs(alice, "bob", 1)
    bob.call(EprListen(peer="alice", accept=False), check=True)  # consent withdrawn
    assert error_of(alice.call(EprRequest(peer="bob", pairs=1))) == "refused"


def test_open_request_limit() -> None:
    broker = make_broker(config(limits=BrokerLimits(max_open_epr_requests_per_node=2)))
    alice, bob = broker.connect("alice"), broker.connect("bob")
    listen(bob, "alice")
    listen(alice, "bob")
    request_pairs(alice, "bob", 5)
    request_pairs(bob, "alice", 5)
    assert error_of(alice.call(EprRequest(peer="bob", pairs=1))) == "no_resource"


def test_epr_delivery_is_batched_per_request_and_end() -> None:
    broker = make_broker(config(memory=MemoryConfig(qubits=64)))
    alice, bob = broker.connect("alice"), broker.connect("bob")
    listen(bob, "alice")
    alice.events()
    bob.events()
    rid = request_pairs(alice, "bob", 20)
    broker.advance_to(1.0, batch=True)  # 20 pairs at ~4 kHz: all heralded well before 1 s
    ev_a, ev_b = alice.messages(), bob.messages()
    assert [type(m) for m in ev_a] == [EprDelivered, EprDone]
    assert [type(m) for m in ev_b] == [EprDelivered, EprDone]
    da, db = ev_a[0], ev_b[0]
    assert da.request == db.request == rid
    assert da.initiator == db.initiator == "alice" and da.peer == "bob" and db.peer == "alice"
    assert len(da.pair_ids) == 20
    np.testing.assert_array_equal(da.pair_ids, db.pair_ids)
    np.testing.assert_array_equal(da.bell, db.bell)
    np.testing.assert_array_equal(da.herald_s, db.herald_s)
    assert np.all(np.diff(da.herald_s) > 0) and da.herald_s[-1] <= 1.0
    assert set(int(q) for q in da.qubits) == broker.core.qubits_of("alice")
    assert set(int(q) for q in db.qubits) == broker.core.qubits_of("bob")
    end = {"request": rid, "initiator": "alice", "delivered": 20, "reason": "complete", "now_s": float(da.herald_s[-1])}
    assert ev_a[1] == EprDone(peer="bob", **end) and ev_b[1] == EprDone(peer="alice", **end)
    # punctual timers instead: one epr_delivered per pair
    rid2 = request_pairs(alice, "bob", 3)
    broker.advance_to(2.0)
    delivered = [m for m in alice.messages() if isinstance(m, EprDelivered)]
    assert [len(m.pair_ids) for m in delivered] == [1, 1, 1] and delivered[0].request == rid2


def _pair_statistics(scheme_cfg: EntanglementConfig, n_pairs: int, backend: str) -> tuple[InMemoryBroker, EprDelivered]:
    broker = make_broker(config(memory=MemoryConfig(qubits=2 * n_pairs), entanglement=scheme_cfg), backend)
    alice, bob = broker.connect("alice"), broker.connect("bob")
    listen(bob, "alice")
    request_pairs(alice, "bob", n_pairs)
    t_s = 0.0
    while broker.core.get_timer() is not None:
        t_s += 1.0
        broker.advance_to(t_s, batch=True)
    pair_ids, qubits, bells, heralds = [], [], [], []
    for m in alice.messages():
        if isinstance(m, EprDelivered):
            pair_ids.append(m.pair_ids)
            qubits.append(m.qubits)
            bells.append(m.bell)
            heralds.append(m.herald_s)
    merged = EprDelivered(
        request=1,
        initiator="alice",
        peer="bob",
        pair_ids=np.concatenate(pair_ids),
        qubits=np.concatenate(qubits),
        bell=np.concatenate(bells),
        herald_s=np.concatenate(heralds),
    )
    return broker, merged


def test_double_click_pair_statistics(backend_name: str) -> None:
    n = 8000
    broker, delivered = _pair_statistics(ENT, n, backend_name)
    assert len(delivered.pair_ids) == n
    model = ENT.model(10.0, 0.2)
    assert model.p_success == pytest.approx((0.8 * 10 ** (-0.1)) ** 2 / 2)  # Barrett-Kok: eta^2/2

    # Psi+ vs Psi-: fair coin. 4 sigma of the binomial std, n = 8000: 4 * 0.5/sqrt(n) = 0.022
    bells = delivered.bell
    assert set(np.unique(bells)) <= {BellState.PSI_PLUS, BellState.PSI_MINUS}
    frac_plus = float(np.mean(bells == BellState.PSI_PLUS))
    assert abs(frac_plus - 0.5) < 4 * 0.5 / math.sqrt(n)

    # Pair rate: the emulated time for n pairs is T * (sum of n geometric(p) attempt counts),
    # mean n/p, relative std sqrt((1-p)/n) = sqrt(0.8/8000) = 1.0%; 5% is ~5 sigma.
    rate_hz = n / float(delivered.herald_s[-1])  # the request started at t = 0
    expected_hz = model.p_success / model.attempt_period_s
    assert math.sqrt((1 - model.p_success) / n) < 0.05 / 4
    assert abs(rate_hz / expected_hz - 1) < 0.05

    # Fidelity: every delivered pair holds exactly the model's state for its herald.
    reg = broker.core.registry
    bob_qubits = sorted(broker.core.qubits_of("bob"))
    by_pair = dict(zip(delivered.pair_ids.tolist(), delivered.qubits.tolist()))
    assert len(by_pair) == n
    for i in range(0, n, 97):  # a spread-out sample; each check is exact
        qa = int(delivered.qubits[i])
        (qb,) = [q for q in reg.register_of(qa) if q != qa]
        assert qb in bob_qubits
        bell = int(delivered.bell[i])
        np.testing.assert_allclose(reg.reduced_state([qa, qb]), model.state_for(bell), atol=1e-12)
        assert reg.bell_fidelities(qa, qb)[bell] == pytest.approx(model.fidelity, abs=1e-12)
    assert model.fidelity == pytest.approx((1 + 3 * 0.9) / 4)
    assert broker.core.statistics().pairs_delivered == {("alice", "bob"): n}


def test_single_click_pairs_have_the_model_state() -> None:
    ent = EntanglementConfig(scheme=HeraldingScheme.SINGLE_CLICK, detector_efficiency=0.9, visibility=0.95, bright_state_alpha=0.05)
    broker, delivered = _pair_statistics(ent, 50, "numpy")
    model = ent.model(10.0, 0.2)
    reg = broker.core.registry
    for qa, bell in zip(delivered.qubits.tolist(), delivered.bell.tolist()):
        (qb,) = [q for q in reg.register_of(qa) if q != qa]
        np.testing.assert_allclose(reg.reduced_state([qa, qb]), model.state_for(bell), atol=1e-12)
        assert reg.bell_fidelities(qa, qb)[bell] == pytest.approx((1 - 0.05) * (1 + 0.95) / 2, abs=1e-12)


def test_generation_pauses_when_memory_is_full_and_resumes_when_it_frees() -> None:
    broker = make_broker(config(memory=MemoryConfig(qubits=2)))
    alice, bob = broker.connect("alice"), broker.connect("bob")
    listen(bob, "alice")
    rid = request_pairs(alice, "bob", 4)
    broker.advance_to(1.0, batch=True)
    (first,) = [m for m in alice.messages() if isinstance(m, EprDelivered)]
    assert len(first.pair_ids) == 2  # memory (2 qubits) full at both ends: paused
    assert broker.core.get_timer() is None
    broker.advance_to(5.0, batch=True)
    assert alice.events() == []
    # free one pair at alice only: bob is still full, still paused
    alice.call(Free(qubits=first.qubits[:1]), check=True)
    broker.advance_to(6.0, batch=True)
    assert alice.events() == [] and broker.core.get_timer() is None
    bob_first = [m for m in bob.messages() if isinstance(m, EprDelivered)][0]
    bob.call(Measure(qubits=bob_first.qubits[:1], bases=np.array([0], dtype=np.uint8), free=True), check=True)
    # resumes from t = 6 s, the time memory freed at both ends
    broker.advance_to(7.0, batch=True)
    (second,) = [m for m in alice.messages() if isinstance(m, EprDelivered)]
    assert len(second.pair_ids) == 1 and second.herald_s[0] > 6.0
    alice.call(Free(qubits=second.qubits), check=True)
    bob.call(Free(qubits=bob_first.qubits[1:]), check=True)
    broker.advance_to(8.0, batch=True)
    msgs = alice.messages()
    assert [type(m) for m in msgs] == [EprDelivered, EprDone]
    assert msgs[1].request == rid and msgs[1].delivered == 4


def test_epr_cancel() -> None:
    broker = make_broker(config(memory=MemoryConfig(qubits=64)))
    alice, bob = broker.connect("alice"), broker.connect("bob")
    listen(bob, "alice")
    alice.events()
    bob.events()
    rid = request_pairs(alice, "bob", 30)
    broker.advance_to(1e-3, batch=True)  # a few pairs (~4 per ms)
    before = sum(len(m.pair_ids) for m in alice.messages() if isinstance(m, EprDelivered))
    bob.messages()
    assert 0 < before < 30
    assert bob.call(EprCancel(request=rid)).message == Ok()  # either end may cancel
    done = {"request": rid, "initiator": "alice", "delivered": before, "reason": "cancelled", "now_s": 1e-3}
    assert alice.messages() == [EprDone(peer="bob", **done)] and bob.messages() == [EprDone(peer="alice", **done)]
    assert broker.core.get_timer() is None
    assert error_of(alice.call(EprCancel(request=rid))) == "bad_field"


def test_peer_disconnect_releases_qubits_and_notifies() -> None:
    broker = make_broker(config(memory=MemoryConfig(qubits=64)))
    alice, bob = broker.connect("alice"), broker.connect("bob")
    carol = broker.connect("carol")
    listen(bob, "alice")
    for s in (alice, bob, carol):
        s.events()
    alloc(alice, 3)
    rid = request_pairs(alice, "bob", 50)
    broker.advance_to(2e-3, batch=True)
    delivered = sum(len(m.pair_ids) for m in bob.messages() if isinstance(m, EprDelivered))
    alice_qubits = broker.core.qubits_of("alice")
    assert len(alice_qubits) == 3 + delivered
    alice.close()
    assert bob.messages() == [
        EprDone(request=rid, initiator="alice", peer="alice", delivered=delivered, reason="peer_gone", now_s=2e-3),
        PeerDown(node="alice"),
    ]
    assert carol.events() == []  # not a neighbour of alice
    assert all(q not in broker.core.registry for q in alice_qubits)
    assert broker.core.statistics().qubits_in_use["alice"] == 0
    assert broker.core.statistics().epr_requests_open == 0
    assert len(broker.core.qubits_of("bob")) == delivered  # bob keeps his (now mixed) halves
    assert broker.core.get_timer() is None
    alice2 = broker.connect("alice")  # the name is free again
    assert alice2.welcome is not None
    assert bob.messages() == [PeerUp(node="alice", tcp=("127.0.0.1", 0), udp=("127.0.0.1", 0))]


def test_bye_closes_and_releases() -> None:
    broker = make_broker()
    alice = broker.connect("alice")
    qs = alloc(alice, 2)
    assert alice.call(Bye()).message == Ok()
    assert alice.closed and all(q not in broker.core.registry for q in qs)


def test_same_seed_and_inputs_give_the_same_physics() -> None:
    def run() -> tuple[list[float], list[int], list[int]]:
        broker = make_broker(config(memory=MemoryConfig(qubits=200)))
        alice, bob = broker.connect("alice"), broker.connect("bob")
        listen(bob, "alice")
        request_pairs(alice, "bob", 100)
        broker.advance_to(1.0, batch=True)
        (d,) = [m for m in alice.messages() if isinstance(m, EprDelivered)]
        outcomes = alice.call(Measure(qubits=d.qubits, bases=np.array([1], dtype=np.uint8))).message.outcomes
        return d.herald_s.tolist(), d.bell.tolist(), outcomes.tolist()

    assert run() == run()


# ============================================================================ admin


def test_admin_session() -> None:
    broker = make_broker()
    alice = broker.connect("alice", tcp=("127.0.0.1", 5000), udp=("127.0.0.1", 5001))
    admin = broker.connect_admin()
    assert admin.admin_welcome.server == "broker"
    reply = admin.call(Status()).message
    assert isinstance(reply, StatusReply)
    by_name = {n.name: n for n in reply.nodes}
    assert by_name["alice"].registered and by_name["alice"].tcp == ("127.0.0.1", 5000)
    assert not by_name["bob"].registered
    alloc(alice, 2)
    stats = admin.call(GetStats()).message
    assert isinstance(stats, Stats)
    assert stats.stats["qubits_in_use"]["alice"] == 2 and stats.stats["nodes_registered"] == 1
    assert error_of(admin.call(Alloc(count=1))) == "not_registered"
    assert not broker.core.shutdown_requested
    assert admin.call(Shutdown()).message == Ok()
    assert broker.core.shutdown_requested

    bad = broker.connect_raw()
    assert error_of(bad.call(AdminHello(token=broker.node_token, versions=[1], client="x"))) == "unauthorized"
    assert bad.closed and ping_ok(alice)


def test_statistics_are_frozen_and_count_frames() -> None:
    broker = make_broker()
    alice = broker.connect("alice")
    ping_ok(alice)
    st_ = broker.core.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        st_.frames_in = 0  # type: ignore[misc]
    assert st_.frames_in == 2 and st_.frames_out == 2 and st_.sessions_open == 1
    assert st_.bytes_in > 0 and st_.bytes_out > 0


def test_time_never_runs_backwards_in_the_core() -> None:
    clock = FakeClock(10.0)
    core = BrokerCore(config(), backend=get_backend("numpy"), node_token="n", admin_token="a", now_s=clock.now_s)
    sid = core.open_session(5.0)  # earlier than the core has seen: treated as 10.0
    assert core.now_s == 10.0
    core.receive_data(sid, encode_framed(hello("alice", "n"), id=1), 3.0)
    assert core.session_state(sid) is SessionState.NODE


# ============================================================================ fuzzing


_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=64),
    st.lists(st.integers(min_value=-3, max_value=40), max_size=4),
    st.lists(st.text(max_size=4), max_size=3),
    st.sampled_from(["alice", "bob", "carol", "dave", "h", "cnot", "rx"]),
    st.builds(lambda a, b: [a, b], st.text(max_size=8), st.integers(0, 65535)),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.integers(0, 40).map(lambda q: np.array([q], dtype="<i8").tobytes()),
    st.builds(lambda n, q: {"name": n, "qubits": [q], "params": []}, st.sampled_from(["h", "x", "cnot", "bogus"]), st.integers(0, 40)),
)


@st.composite
def wire_maps(draw: st.DrawFn) -> dict[str, object]:
    """Maps shaped like real messages (right type tag, often right field names)."""
    types_ = message_types()
    tag = draw(st.sampled_from(sorted(types_)))
    fields = [f.name for f in dataclasses.fields(types_[tag])]
    out: dict[str, object] = {"v": draw(st.sampled_from([1, 1, 1, 2, "1"])), "t": tag, "id": draw(st.integers(0, 2**31))}
    for name in fields:
        if draw(st.integers(0, 9)) > 0:
            out[name] = draw(_FIELD_VALUES)
    if draw(st.booleans()):
        out[draw(st.text(max_size=6))] = draw(_FIELD_VALUES)
    return out


def _fuzz_setup() -> tuple[InMemoryBroker, InMemoryBrokerSession, InMemoryBrokerSession]:
    broker = make_broker(config(memory=MemoryConfig(qubits=4), limits=BrokerLimits(max_frame_bytes=4096)))
    victim = broker.connect("alice")
    bystander = broker.connect("bob")
    listen(victim, "bob")
    listen(bystander, "alice")
    alloc(victim, 2)
    alloc(bystander, 1)
    return broker, victim, bystander


def _assert_only_wire_frames(session: InMemoryBrokerSession) -> None:
    # Every frame the core produced decoded (InMemoryBrokerSession would have raised otherwise).
    for env in session.events():
        assert env.message is not None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    registered=st.booleans(),
    framed=st.booleans(),
)
def test_fuzz_random_bytes_never_escape_the_core(chunks: list[bytes], registered: bool, framed: bool) -> None:
    broker, victim, bystander = _fuzz_setup()
    target = victim if registered else broker.connect_raw()
    for chunk in chunks:
        if target.closed:
            break
        target.send_raw(encode_frame(chunk) if framed else chunk)  # would raise if the core raised
    _assert_only_wire_frames(target)
    assert ping_ok(bystander)
    if framed and registered:
        # garbage inside well-formed frames: the session itself keeps working
        assert ping_ok(victim)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps=st.lists(wire_maps(), min_size=1, max_size=6), registered=st.booleans(), advance=st.floats(0, 0.01))
def test_fuzz_random_messages_never_escape_the_core(maps: list[dict[str, object]], registered: bool, advance: float) -> None:
    broker, victim, bystander = _fuzz_setup()
    target = victim if registered else broker.connect_raw()
    for m in maps:
        if target.closed:
            break
        try:
            payload = msgpack.packb(m, use_bin_type=True)
        except (OverflowError, TypeError, ValueError):
            continue
        target.send_raw(encode_frame(payload, max_frame_bytes=1 << 30))
        for env in target.events():
            if isinstance(env.message, Error):
                assert env.message.code != "internal", env.message.message
    broker.advance(advance)
    assert ping_ok(bystander)
    assert broker.core.statistics().errors_by_code.get("internal", 0) == 0


def test_huge_batches_are_split_at_max_pairs_per_delivery() -> None:
    broker = make_broker(config(memory=MemoryConfig(qubits=64), limits=BrokerLimits(max_pairs_per_delivery=7)))
    alice, bob = broker.connect("alice"), broker.connect("bob")
    listen(bob, "alice")
    alice.events()
    rid = request_pairs(alice, "bob", 20)
    broker.advance_to(1.0, batch=True)
    msgs = alice.messages()
    assert [len(m.pair_ids) for m in msgs if isinstance(m, EprDelivered)] == [7, 7, 6]
    assert isinstance(msgs[-1], EprDone) and msgs[-1].request == rid and msgs[-1].delivered == 20


def test_a_fibre_cut_stops_heralds_and_qubits_until_the_splice() -> None:
    """Admin `fibre_cut` (docs/protocol.md §4.5): while alice-bob's fibre is cut no pair
    heralds on it and a qubit sent over it is lost; at the splice attempts restart from
    the splice time. ENT heralds a pair every ~0.2 ms, so a 1 s cut without a herald in
    it cannot be chance; requests on other links (bob-carol: qubits) are untouched."""
    broker = make_broker(config(memory=MemoryConfig(qubits=100_000)))
    alice, bob, carol = broker.connect("alice"), broker.connect("bob"), broker.connect("carol")
    admin = broker.connect_admin()
    listen(bob, "alice")
    request_pairs(alice, "bob", 1_000_000)
    broker.advance_to(0.1, batch=True)
    assert admin.call(FibreCut(endpoints=["bob", "alice"], cut=True)).message == Ok()
    before = [m for m in alice.messages() if isinstance(m, EprDelivered)]
    assert before and max(float(t) for m in before for t in m.herald_s) <= 0.1
    broker.advance_to(1.1, batch=True)
    assert [m for m in alice.messages() if isinstance(m, EprDelivered)] == []  # nothing in the cut
    (q,) = alloc(alice)
    alice.call(SendQubit(qubit=q, peer="bob"), check=True)  # lost: the fibre is cut
    (q2,) = alloc(bob)
    bob.call(SendQubit(qubit=q2, peer="carol"), check=True)  # another fibre: transmittance 0.1
    broker.advance_to(1.2, batch=True)
    (lost,) = [m for m in alice.messages() if isinstance(m, QubitTransfer)]
    assert lost.arrived is False
    assert admin.call(FibreCut(endpoints=["alice", "bob"], cut=False)).message == Ok()
    assert admin.call(FibreCut(endpoints=["alice", "bob"], cut=False)).message == Ok()  # harmless repeat
    broker.advance_to(1.3, batch=True)
    after = [m for m in alice.messages() if isinstance(m, EprDelivered)]
    heralds = [float(t) for m in after for t in m.herald_s]
    assert heralds and min(heralds) > 1.2  # restarted from the splice
    stats = broker.core.statistics().as_dict()
    assert stats["fibres"] == {"alice|bob": {"cut": False, "cuts": 1}}
    # bad requests: typed errors, the session lives on
    assert error_of(admin.call(FibreCut(endpoints=["alice"]))) == "bad_field"
    assert error_of(admin.call(FibreCut(endpoints=["alice", "zed"]))) == "unknown_node"
    assert error_of(admin.call(FibreCut(endpoints=["alice", "carol"]))) == "no_link"
    assert error_of(admin.call(FibreCut(endpoints=["alice", "alice"]))) == "no_link"
    assert error_of(carol.call(FibreCut(endpoints=["alice", "bob"]))) == "not_registered"
    assert ping_ok(alice)
