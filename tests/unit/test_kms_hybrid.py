"""Hybrid keys (nodes/kms/hybrid.py): the CatKDF combiner and the authenticated ML-KEM-768 + X25519 exchange."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from emulator.certs import RunCa
from nodes.kms.hybrid import (
    LABELS,
    MAX_KEY_BYTES,
    HybridError,
    KmeIdentity,
    Policy,
    PqcAuthenticationFailed,
    PqcConfirm,
    PqcEpoch,
    PqcInit,
    PqcInitiator,
    PqcPeerFailure,
    PqcProtocolError,
    PqcResponder,
    PqcResponse,
    cat_kdf,
    hybrid_key,
    key_context,
    message_from_dict,
    policy_of,
)

KAT = json.loads((Path(__file__).resolve().parents[1] / "data" / "kms_hybrid_kat.json").read_text())
NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
LATER = NOW + dt.timedelta(hours=1)  # the exchanges happen within the certificates' validity


# ---------------------------------------------------------------------------
# An independent implementation of the formula (stdlib only), for the known answers
# ---------------------------------------------------------------------------


def ref_hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 §2.2 (extract) and §2.3 (expand), written out."""
    prk = hmac.new(salt if salt else bytes(32), ikm, hashlib.sha256).digest()
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
        i += 1
    return okm[:length]


def ref_f(*values: bytes) -> bytes:
    """ETSI TS 103 744 §7.2: SHA-256 over 4-byte big-endian length || value, for each value."""
    return hashlib.sha256(b"".join(struct.pack(">I", len(v)) + v for v in values)).digest()


def ref_catkdf(psk: bytes, secrets: list[bytes], ma: bytes, mb: bytes, context: bytes, label: bytes, n: int) -> bytes:
    return ref_hkdf_sha256(label, psk + b"".join(secrets), ref_f(context, ma, mb), n)


def ref_hybrid(vector: dict[str, Any]) -> bytes:
    qkd = unhex(vector["qkd_key"])
    if vector["policy"] == "qkd":
        assert qkd is not None
        return qkd
    label = {"pqc": b"qnetem kms pqc v1", "hybrid": b"qnetem kms hybrid v1"}[vector["policy"]]
    secrets = [unhex(vector["mlkem_secret"]), unhex(vector["x25519_secret"])]
    context = bytes.fromhex(vector["context"])
    return ref_catkdf(qkd or b"", secrets, b"", b"", context, label, vector["length_bytes"])  # type: ignore[arg-type]


def unhex(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def module_hybrid(vector: dict[str, Any]) -> bytes:
    return hybrid_key(
        qkd_key=unhex(vector["qkd_key"]),
        mlkem_secret=unhex(vector["mlkem_secret"]),
        x25519_secret=unhex(vector["x25519_secret"]),
        context=bytes.fromhex(vector["context"]),
        length_bytes=vector["length_bytes"],
    )


# ---------------------------------------------------------------------------
# The combiner
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vector", KAT["etsi_catkdf"], ids=lambda v: v["name"].split(":")[0])
def test_catkdf_reproduces_etsi_annex_c(vector: dict[str, Any]) -> None:
    la, lb = bytes.fromhex(vector["LA"]), bytes.fromhex(vector["LB"])
    ma = la + bytes.fromhex(vector["PA1"]) + bytes.fromhex(vector["PA2"])
    mb = lb + bytes.fromhex(vector["PB1"]) + bytes.fromhex(vector["PB2"])
    secrets = [bytes.fromhex(vector["k1"]), bytes.fromhex(vector["k2"])]
    expected = bytes.fromhex(vector["key_material"])
    context = vector["context"].encode()
    out = cat_kdf(secrets=secrets, ma=ma, mb=mb, context=context, label=la + lb, length_bytes=len(expected))
    assert out == expected
    assert ref_catkdf(b"", secrets, ma, mb, context, la + lb, len(expected)) == expected  # the reference is right too


@pytest.mark.parametrize("vector", KAT["hybrid_key"], ids=lambda v: v["name"])
def test_hybrid_key_matches_the_independent_implementation(vector: dict[str, Any]) -> None:
    out = module_hybrid(vector)
    assert out == ref_hybrid(vector)
    assert len(out) == vector["length_bytes"]


@pytest.mark.parametrize("vector", [v for v in KAT["hybrid_key"] if "expected" in v], ids=lambda v: v["name"])
def test_hybrid_key_frozen_vectors(vector: dict[str, Any]) -> None:
    assert module_hybrid(vector).hex() == vector["expected"]


def test_frozen_vectors_cover_each_policy_and_both_lengths() -> None:
    frozen = [v for v in KAT["hybrid_key"] if "expected" in v]
    assert {v["policy"] for v in frozen} == {"qkd", "pqc", "hybrid"}
    assert {v["length_bytes"] for v in frozen} >= {32, 64}


def test_key_context_encoding_is_the_one_of_the_vectors() -> None:
    transcript = hashlib.sha256(b"qnetem kat transcript").digest()
    vector = KAT["hybrid_key"][0]
    assert key_context(key_id="0b5c2f4e-1c1d-4d1e-9a8e-2b7f4c1e0a01", transcript_hash=transcript).hex() == vector[
        "context"
    ]
    # Length prefixes: moving a byte between items changes the encoding.
    assert key_context(key_id="ab", transcript_hash=b"c") != key_context(key_id="a", transcript_hash=b"bc")
    assert key_context(key_id="a", transcript_hash=b"t", extra=("x",)) != key_context(key_id="a", transcript_hash=b"t")


BASE = next(v for v in KAT["hybrid_key"] if v["name"] == "hybrid-32")


@pytest.mark.parametrize("field", ["qkd_key", "mlkem_secret", "x25519_secret", "context"])
@pytest.mark.parametrize("bit", [0, 7, 8 * 31 + 7])
def test_changing_any_single_input_changes_the_output(field: str, bit: int) -> None:
    base = module_hybrid(BASE)
    raw = bytearray(bytes.fromhex(BASE[field]))
    raw[bit // 8] ^= 1 << (bit % 8)
    changed = module_hybrid({**BASE, field: raw.hex()})
    assert changed != base
    assert changed == ref_hybrid({**BASE, field: raw.hex()})


def test_policies_and_lengths() -> None:
    hybrid = module_hybrid(BASE)
    pqc = module_hybrid({**BASE, "qkd_key": None, "policy": "pqc"})
    assert pqc != hybrid
    # Same secret bytes, other label: the policy separates key spaces.
    same_secret = cat_kdf(
        psk=bytes.fromhex(BASE["qkd_key"]),
        secrets=(bytes.fromhex(BASE["mlkem_secret"]), bytes.fromhex(BASE["x25519_secret"])),
        context=bytes.fromhex(BASE["context"]),
        label=LABELS[Policy.PQC],
        length_bytes=32,
    )
    assert same_secret != hybrid
    for n in (1, 16, 32, 33, 64, 100, MAX_KEY_BYTES):
        assert len(module_hybrid({**BASE, "length_bytes": n})) == n


def test_qkd_policy_passes_the_key_through() -> None:
    key = bytes(range(32))
    assert hybrid_key(qkd_key=key, mlkem_secret=None, x25519_secret=None, context=b"", length_bytes=32) == key
    with pytest.raises(HybridError, match="32 bytes, 64 were asked"):
        hybrid_key(qkd_key=key, mlkem_secret=None, x25519_secret=None, context=b"", length_bytes=64)


@pytest.mark.parametrize(
    ("qkd", "kem", "dh"),
    [
        (None, None, None),
        (None, b"k" * 32, None),
        (None, None, b"x" * 32),
        (b"q", b"k" * 32, None),
        (b"q", None, b"x" * 32),
    ],
)
def test_invalid_policy_combinations(qkd: bytes | None, kem: bytes | None, dh: bytes | None) -> None:
    with pytest.raises(HybridError):
        policy_of(qkd, kem, dh)
    with pytest.raises(HybridError):
        hybrid_key(qkd_key=qkd, mlkem_secret=kem, x25519_secret=dh, context=b"", length_bytes=32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mlkem_secret": b"k" * 31},
        {"x25519_secret": b"x" * 33},
        {"qkd_key": b""},
        {"length_bytes": 0},
        {"length_bytes": MAX_KEY_BYTES + 1},
        {"length_bytes": True},
        {"context": "text"},
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "qkd_key": b"q" * 32, "mlkem_secret": b"k" * 32, "x25519_secret": b"x" * 32,
        "context": b"c", "length_bytes": 32,
    }  # fmt: skip
    with pytest.raises(HybridError):
        hybrid_key(**{**args, **kwargs})


# ---------------------------------------------------------------------------
# The exchange: fixtures and a driver
# ---------------------------------------------------------------------------


def identity(ca: RunCa, node: str) -> KmeIdentity:
    cred = ca.issue_kme(node, now=NOW)
    return KmeIdentity(node, cred.cert_pem, cred.key_pem, cred.ca_pem)


@pytest.fixture(scope="module")
def ca() -> RunCa:
    return RunCa.create("hybrid-test", now=NOW)


@pytest.fixture(scope="module")
def alice(ca: RunCa) -> KmeIdentity:
    return identity(ca, "alice")


@pytest.fixture(scope="module")
def bob(ca: RunCa) -> KmeIdentity:
    return identity(ca, "bob")


@pytest.fixture(scope="module")
def carol(ca: RunCa) -> KmeIdentity:
    return identity(ca, "carol")


def wire(msg: Any) -> Any:
    """What the shells do: to_dict, msgpack, and back."""
    return message_from_dict(msgpack.unpackb(msgpack.packb(msg.to_dict(), use_bin_type=True), raw=False))


def exchange(
    initiator: PqcInitiator, responder: PqcResponder
) -> tuple[PqcInit, PqcResponse, PqcConfirm, PqcEpoch, PqcEpoch]:
    init = initiator.start()
    response = responder.receive_init(wire(init), now=LATER)
    confirm, epoch_i = initiator.receive_response(wire(response), now=LATER)
    epoch_r = responder.receive_confirm(wire(confirm))
    return init, response, confirm, epoch_i, epoch_r


def flip(data: bytes, index: int = -1) -> bytes:
    raw = bytearray(data)
    raw[index] ^= 0x01
    return bytes(raw)


# ---------------------------------------------------------------------------
# The exchange: success
# ---------------------------------------------------------------------------


def test_both_ends_derive_identical_secrets(alice: KmeIdentity, bob: KmeIdentity) -> None:
    responder = PqcResponder(identity=bob)
    _, _, _, ea, eb = exchange(PqcInitiator(identity=alice, peer="bob", epoch_id=1), responder)
    assert (ea.epoch_id, ea.peer, eb.epoch_id, eb.peer) == (1, "bob", 1, "alice")
    assert ea.mlkem_secret == eb.mlkem_secret and len(ea.mlkem_secret) == 32
    assert ea.x25519_secret == eb.x25519_secret and len(ea.x25519_secret) == 32
    assert ea.transcript_hash == eb.transcript_hash and len(ea.transcript_hash) == 32
    assert ea.mlkem_secret != ea.x25519_secret
    for qkd in (None, bytes(range(32))):
        ka = ea.derive_key(key_id="k-1", length_bytes=32, qkd_key=qkd)
        assert ka == eb.derive_key(key_id="k-1", length_bytes=32, qkd_key=qkd)
        assert ka != ea.derive_key(key_id="k-2", length_bytes=32, qkd_key=qkd)
    assert responder.last_epoch_id("alice") == 1
    assert responder.statistics().completed == 1

    # A second epoch gives fresh secrets.
    _, _, _, ea2, eb2 = exchange(PqcInitiator(identity=alice, peer="bob", epoch_id=2), responder)
    assert ea2.mlkem_secret == eb2.mlkem_secret != ea.mlkem_secret
    assert ea2.x25519_secret != ea.x25519_secret and ea2.transcript_hash != ea.transcript_hash


def test_messages_are_msgpack_able_dicts(alice: KmeIdentity, bob: KmeIdentity) -> None:
    initiator, responder = PqcInitiator(identity=alice, peer="bob", epoch_id=7), PqcResponder(identity=bob)
    init, response, confirm, _, _ = exchange(initiator, responder)
    for msg in (init, response, confirm):
        d = msg.to_dict()
        assert d["type"] == msg.TYPE
        assert all(isinstance(k, str) for k in d)
        assert all(isinstance(v, (bytes, str, int)) for v in d.values())
        assert wire(msg) == msg
    assert len(init.mlkem_encapsulation_key) == 1184 and len(response.mlkem_ciphertext) == 1088


# ---------------------------------------------------------------------------
# The exchange: rejections
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["x25519_public", "nonce", "mlkem_encapsulation_key", "certificate_pem"])
def test_tampered_init_is_caught_by_the_initiator(alice: KmeIdentity, bob: KmeIdentity, field: str) -> None:
    """The init is not signed, but the responder signs what it received: the initiator sees the difference."""
    initiator, responder = PqcInitiator(identity=alice, peer="bob", epoch_id=1), PqcResponder(identity=bob)
    init = initiator.start()
    # The last byte: of the ML-KEM key, a byte of its seed rho (any value is a valid key); of the
    # certificate, a trailing newline added (the same certificate, other bytes).
    if field == "certificate_pem":
        tampered = dataclasses.replace(init, certificate_pem=init.certificate_pem + b"\n")
    else:
        tampered = dataclasses.replace(init, **{field: flip(getattr(init, field))})
    response = responder.receive_init(wire(tampered), now=LATER)
    with pytest.raises(PqcAuthenticationFailed) as exc:
        initiator.receive_response(wire(response), now=LATER)
    assert exc.value.reason is PqcPeerFailure.BAD_SIGNATURE


@pytest.mark.parametrize("field", ["x25519_public", "mlkem_ciphertext", "nonce", "signature", "epoch_id"])
def test_tampered_response_is_rejected(alice: KmeIdentity, bob: KmeIdentity, field: str) -> None:
    initiator, responder = PqcInitiator(identity=alice, peer="bob", epoch_id=1), PqcResponder(identity=bob)
    response = responder.receive_init(wire(initiator.start()), now=LATER)
    if field == "epoch_id":
        tampered = dataclasses.replace(response, epoch_id=0)
        expected = PqcPeerFailure.REPLAYED
    else:
        tampered = dataclasses.replace(response, **{field: flip(getattr(response, field), 5)})
        expected = PqcPeerFailure.BAD_SIGNATURE
    with pytest.raises(PqcAuthenticationFailed) as exc:
        initiator.receive_response(wire(tampered), now=LATER)
    assert exc.value.reason is expected
    # The initiator's exchange is over: even the genuine response is refused now.
    with pytest.raises(PqcProtocolError) as again:
        initiator.receive_response(wire(response), now=LATER)
    assert again.value.reason is PqcPeerFailure.UNEXPECTED


def test_tampered_confirm_is_rejected_and_the_genuine_one_still_completes(alice: KmeIdentity, bob: KmeIdentity) -> None:
    initiator, responder = PqcInitiator(identity=alice, peer="bob", epoch_id=1), PqcResponder(identity=bob)
    response = responder.receive_init(wire(initiator.start()), now=LATER)
    confirm, epoch_i = initiator.receive_response(wire(response), now=LATER)
    with pytest.raises(PqcAuthenticationFailed) as exc:
        responder.receive_confirm(wire(dataclasses.replace(confirm, signature=flip(confirm.signature, 10))))
    assert exc.value.reason is PqcPeerFailure.BAD_SIGNATURE
    assert responder.last_epoch_id("alice") is None and responder.statistics().pending == 1
    assert responder.receive_confirm(wire(confirm)).mlkem_secret == epoch_i.mlkem_secret
    assert responder.statistics().rejected == {"bad-signature": 1}


def test_certificate_of_another_ca_is_rejected(alice: KmeIdentity, bob: KmeIdentity) -> None:
    rogue_ca = RunCa.create("hybrid-test", now=NOW)  # same CA name, another key
    mallory_as_alice = identity(rogue_ca, "alice")
    with pytest.raises(PqcAuthenticationFailed) as exc:
        PqcResponder(identity=bob).receive_init(
            wire(PqcInitiator(identity=mallory_as_alice, peer="bob", epoch_id=1).start()), now=LATER
        )
    assert exc.value.reason is PqcPeerFailure.BAD_CERTIFICATE

    # And the other direction: a responder posing as bob with a rogue certificate.
    initiator = PqcInitiator(identity=alice, peer="bob", epoch_id=1)
    init = initiator.start()
    rogue_bob = identity(rogue_ca, "bob")
    rogue_alice_view = dataclasses.replace(init, certificate_pem=mallory_as_alice.certificate_pem)
    response = PqcResponder(identity=rogue_bob).receive_init(wire(rogue_alice_view), now=LATER)
    with pytest.raises(PqcAuthenticationFailed) as exc:
        initiator.receive_response(wire(response), now=LATER)
    assert exc.value.reason is PqcPeerFailure.BAD_CERTIFICATE


def test_wrong_common_name_is_rejected(alice: KmeIdentity, bob: KmeIdentity, carol: KmeIdentity) -> None:
    # carol (a genuine KME of the run) claims to be alice: her certificate says kme-carol.
    init = PqcInitiator(identity=carol, peer="bob", epoch_id=1).start()
    with pytest.raises(PqcAuthenticationFailed) as exc:
        PqcResponder(identity=bob).receive_init(wire(dataclasses.replace(init, initiator="alice")), now=LATER)
    assert exc.value.reason is PqcPeerFailure.WRONG_IDENTITY

    # carol answers an init meant for bob, claiming to be bob.
    initiator = PqcInitiator(identity=alice, peer="bob", epoch_id=1)
    init = initiator.start()
    response = PqcResponder(identity=carol).receive_init(wire(dataclasses.replace(init, responder="carol")), now=LATER)
    with pytest.raises(PqcAuthenticationFailed) as exc:
        initiator.receive_response(wire(dataclasses.replace(response, responder="bob")), now=LATER)
    assert exc.value.reason is PqcPeerFailure.WRONG_IDENTITY


def test_init_for_another_responder_or_unlisted_peer_is_refused(alice: KmeIdentity, bob: KmeIdentity) -> None:
    init = PqcInitiator(identity=alice, peer="carol", epoch_id=1).start()
    with pytest.raises(PqcAuthenticationFailed) as exc:
        PqcResponder(identity=bob).receive_init(wire(init), now=LATER)
    assert exc.value.reason is PqcPeerFailure.WRONG_IDENTITY
    init = PqcInitiator(identity=alice, peer="bob", epoch_id=1).start()
    with pytest.raises(PqcAuthenticationFailed) as exc:
        PqcResponder(identity=bob, peers={"carol"}).receive_init(wire(init), now=LATER)
    assert exc.value.reason is PqcPeerFailure.WRONG_IDENTITY
    PqcResponder(identity=bob, peers={"alice"}).receive_init(wire(init), now=LATER)  # listed: fine


def test_sae_certificate_cannot_pose_as_a_kme(ca: RunCa, bob: KmeIdentity) -> None:
    """A client-only certificate of the run CA with CN kme-alice (no serverAuth) is refused."""
    forged = ca._issue(  # noqa: SLF001 - issue_sae refuses the reserved kme- prefix; build one anyway
        "kme-alice",
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:qnetem:sae:kme-alice")]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
        NOW,
    )
    impostor = KmeIdentity("alice", forged.cert_pem, forged.key_pem, forged.ca_pem)
    with pytest.raises(PqcAuthenticationFailed) as exc:
        init = PqcInitiator(identity=impostor, peer="bob", epoch_id=1).start()
        PqcResponder(identity=bob).receive_init(wire(init), now=LATER)
    assert exc.value.reason is PqcPeerFailure.BAD_CERTIFICATE


def test_expired_certificate_is_rejected(alice: KmeIdentity, bob: KmeIdentity) -> None:
    init = PqcInitiator(identity=alice, peer="bob", epoch_id=1).start()
    for when in (NOW + dt.timedelta(days=3), NOW - dt.timedelta(hours=1)):
        with pytest.raises(PqcAuthenticationFailed) as exc:
            PqcResponder(identity=bob).receive_init(wire(init), now=when)
        assert exc.value.reason is PqcPeerFailure.BAD_CERTIFICATE


def test_replayed_old_epoch_messages_are_rejected(alice: KmeIdentity, bob: KmeIdentity) -> None:
    responder = PqcResponder(identity=bob)
    init1, response1, confirm1, _, _ = exchange(PqcInitiator(identity=alice, peer="bob", epoch_id=1), responder)
    with pytest.raises(PqcAuthenticationFailed) as exc:
        responder.receive_init(wire(init1), now=LATER)
    assert exc.value.reason is PqcPeerFailure.REPLAYED
    with pytest.raises(PqcAuthenticationFailed) as exc:
        responder.receive_confirm(wire(confirm1))
    assert exc.value.reason is PqcPeerFailure.REPLAYED
    # An old response fed to the next epoch's initiator.
    initiator2 = PqcInitiator(identity=alice, peer="bob", epoch_id=2)
    initiator2.start()
    with pytest.raises(PqcAuthenticationFailed) as exc:
        initiator2.receive_response(wire(response1), now=LATER)
    assert exc.value.reason is PqcPeerFailure.REPLAYED
    # The old response relabelled with the new epoch: the signature does not cover the new init.
    initiator3 = PqcInitiator(identity=alice, peer="bob", epoch_id=3)
    initiator3.start()
    with pytest.raises(PqcAuthenticationFailed) as exc:
        initiator3.receive_response(wire(dataclasses.replace(response1, epoch_id=3)), now=LATER)
    assert exc.value.reason is PqcPeerFailure.BAD_SIGNATURE
    # A fresh epoch still works, and the replays were counted.
    exchange(PqcInitiator(identity=alice, peer="bob", epoch_id=4), responder)
    assert responder.last_epoch_id("alice") == 4
    assert responder.statistics().rejected == {"replayed": 2}


def test_restored_replay_window(alice: KmeIdentity, bob: KmeIdentity) -> None:
    responder = PqcResponder(identity=bob, last_epochs={"alice": 5})
    with pytest.raises(PqcAuthenticationFailed) as exc:
        responder.receive_init(wire(PqcInitiator(identity=alice, peer="bob", epoch_id=5).start()), now=LATER)
    assert exc.value.reason is PqcPeerFailure.REPLAYED
    exchange(PqcInitiator(identity=alice, peer="bob", epoch_id=6), responder)


def test_unauthenticated_init_does_not_move_the_replay_window(alice: KmeIdentity, bob: KmeIdentity) -> None:
    responder = PqcResponder(identity=bob)
    stray = PqcInitiator(identity=alice, peer="bob", epoch_id=99).start()
    responder.receive_init(wire(stray), now=LATER)  # never confirmed
    exchange(PqcInitiator(identity=alice, peer="bob", epoch_id=1), responder)  # a lower epoch still completes
    assert responder.last_epoch_id("alice") == 1


def test_confirm_without_pending_exchange(alice: KmeIdentity, bob: KmeIdentity) -> None:
    _, _, confirm, _, _ = exchange(PqcInitiator(identity=alice, peer="bob", epoch_id=1), PqcResponder(identity=bob))
    with pytest.raises(PqcProtocolError) as exc:
        PqcResponder(identity=bob).receive_confirm(wire(confirm))  # another responder never saw the init
    assert exc.value.reason is PqcPeerFailure.UNEXPECTED
    assert not isinstance(exc.value, PqcAuthenticationFailed)


def test_low_order_x25519_point_is_refused(alice: KmeIdentity, bob: KmeIdentity) -> None:
    init = PqcInitiator(identity=alice, peer="bob", epoch_id=1).start()
    with pytest.raises(PqcProtocolError) as exc:
        PqcResponder(identity=bob).receive_init(wire(dataclasses.replace(init, x25519_public=bytes(32))), now=LATER)
    assert exc.value.reason is PqcPeerFailure.MALFORMED


# ---------------------------------------------------------------------------
# Malformed input and misuse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: {**d, "type": "pqc-nope"},
        lambda d: {k: v for k, v in d.items() if k != "nonce"},
        lambda d: {**d, "extra": 1},
        lambda d: {**d, "nonce": d["nonce"][:-1]},
        lambda d: {**d, "nonce": d["nonce"].hex()},
        lambda d: {**d, "epoch_id": -1},
        lambda d: {**d, "epoch_id": 1 << 64},
        lambda d: {**d, "epoch_id": True},
        lambda d: {**d, "initiator": "Alice"},
        lambda d: {**d, "responder": d["initiator"]},
        lambda d: {**d, "mlkem_encapsulation_key": d["mlkem_encapsulation_key"] + b"\x00"},
        lambda d: {**d, "certificate_pem": b""},
        lambda d: [d],
    ],
)
def test_malformed_messages(alice: KmeIdentity, mutate: Any) -> None:
    d = PqcInitiator(identity=alice, peer="bob", epoch_id=1).start().to_dict()
    with pytest.raises(PqcProtocolError) as exc:
        message_from_dict(mutate(d))
    assert exc.value.reason is PqcPeerFailure.MALFORMED


def test_misuse_is_a_local_error(alice: KmeIdentity, bob: KmeIdentity, ca: RunCa) -> None:
    initiator = PqcInitiator(identity=alice, peer="bob", epoch_id=1)
    with pytest.raises(HybridError) as exc:
        initiator.receive_response(None, now=LATER)  # type: ignore[arg-type]
    assert not isinstance(exc.value, PqcProtocolError)
    initiator.start()
    with pytest.raises(HybridError):
        initiator.start()
    with pytest.raises(HybridError):
        PqcInitiator(identity=alice, peer="alice", epoch_id=1)
    with pytest.raises(HybridError):
        PqcInitiator(identity=alice, peer="bob", epoch_id=-1)
    with pytest.raises(HybridError, match="aware"):
        PqcResponder(identity=bob).receive_init(
            PqcInitiator(identity=alice, peer="bob", epoch_id=2).start(), now=dt.datetime(2025, 6, 1)
        )
    # Identities are checked on construction.
    with pytest.raises(HybridError, match="CN"):
        KmeIdentity("bob", alice.certificate_pem, alice.private_key_pem, alice.ca_pem)
    with pytest.raises(HybridError, match="does not belong"):
        KmeIdentity("alice", alice.certificate_pem, bob.private_key_pem, alice.ca_pem)
    with pytest.raises(HybridError, match="not issued"):
        KmeIdentity("alice", alice.certificate_pem, alice.private_key_pem, RunCa.create("x", now=NOW).certificate_pem)
    with pytest.raises(HybridError, match="not an unencrypted PEM private key"):
        bad_key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        KmeIdentity("alice", alice.certificate_pem, bad_key, alice.ca_pem)


# ---------------------------------------------------------------------------
# Secrets stay secret
# ---------------------------------------------------------------------------


def test_secrets_never_in_repr(alice: KmeIdentity, bob: KmeIdentity) -> None:
    initiator, responder = PqcInitiator(identity=alice, peer="bob", epoch_id=1), PqcResponder(identity=bob)
    _, _, _, ea, eb = exchange(initiator, responder)
    derived = ea.derive_key(key_id="k", length_bytes=32)
    secrets = [ea.mlkem_secret, ea.x25519_secret, derived, alice.private_key_pem, bob.private_key_pem]
    texts = [repr(ea), repr(eb), str(ea), repr(initiator), repr(responder), repr(alice), repr(responder.statistics())]
    for text in texts:
        for secret in secrets:
            assert secret.hex() not in text and repr(secret) not in text
    key_body = alice.private_key_pem.decode().splitlines()[1]
    assert all(key_body not in text for text in texts)
    assert "mlkem_secret" not in repr(ea) and "x25519_secret" not in repr(ea)
    assert "transcript_hash" in repr(ea) and "epoch_id=1" in repr(ea)


def test_errors_carry_no_key_bytes(alice: KmeIdentity, bob: KmeIdentity) -> None:
    initiator, responder = PqcInitiator(identity=alice, peer="bob", epoch_id=1), PqcResponder(identity=bob)
    response = responder.receive_init(wire(initiator.start()), now=LATER)
    bad = dataclasses.replace(response, signature=flip(response.signature, 8))
    with pytest.raises(PqcAuthenticationFailed) as exc:
        initiator.receive_response(bad, now=LATER)
    message = str(exc.value)
    assert bad.signature.hex() not in message and response.mlkem_ciphertext.hex()[:16] not in message
    assert exc.value.__cause__ is None and exc.value.__suppress_context__  # no chained library error
