"""Wegman-Carter authentication of post-processing messages (nodes/qkd/authentication.py).

Two ends built from the same shared key exchange messages in both directions; every
tampering (payload or tag bit flips, wrong key, replay, reordering, injection ahead of
the genuine message) is rejected with the right reason and counted, the next genuine
message is accepted, both ends consume the same key bits, and no key byte shows up in
a repr, an exception or the statistics.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodes.qkd import _polyhash
from nodes.qkd.authentication import (
    TAG_BYTES,
    AuthenticationFailed,
    AuthenticationMisuse,
    Authenticator,
    AuthFailure,
    BufferKeySource,
    DirectionalKeys,
    KeyExhausted,
    KeySource,
    forgery_bound,
)

# A recognisable key: any 4-byte window of it in an output would be a leak.
SHARED = bytes((i * 37 + 11) % 256 for i in range(1024))


def pair(material: bytes = SHARED) -> tuple[Authenticator, Authenticator, DirectionalKeys, DirectionalKeys]:
    ka = DirectionalKeys(initiator=True, material=material)
    kb = DirectionalKeys(initiator=False, material=material)
    return Authenticator.from_keys(ka), Authenticator.from_keys(kb), ka, kb


def rejected(auth: Authenticator, payload: bytes, seq: int, tag: bytes) -> AuthFailure:
    with pytest.raises(AuthenticationFailed) as info:
        auth.verify(payload, seq, tag)
    return info.value.reason


def test_round_trip_in_both_directions() -> None:
    alice, bob, _, _ = pair()
    for i in range(5):
        msg = f"parities {i}".encode()
        tag = alice.seal(msg, i)
        assert len(tag) == TAG_BYTES
        bob.verify(msg, i, tag)
        reply = b"ack" * i  # bob sends too; the two directions are independent
        alice.verify(reply, i, bob.seal(reply, i))
    sa, sb = alice.statistics(), bob.statistics()
    assert (sa.sealed, sa.accepted, sb.sealed, sb.accepted) == (5, 5, 5, 5)
    assert sa.rejected == sb.rejected == 0


def test_key_consumption_is_equal_on_both_ends() -> None:
    alice, bob, ka, kb = pair()
    for i in range(7):
        bob.verify(b"x" * i, i, alice.seal(b"x" * i, i))
    for i in range(3):
        alice.verify(b"y", i, bob.seal(b"y", i))
    # r (128 bits) + one 128-bit pad per message, per direction
    assert ka.outbound.bits_taken == kb.inbound.bits_taken == 128 * (1 + 7)
    assert kb.outbound.bits_taken == ka.inbound.bits_taken == 128 * (1 + 3)
    assert alice.statistics().key_bits_outbound == bob.statistics().key_bits_inbound == 128 * 8


def test_directional_streams_mirror_each_other() -> None:
    ka = DirectionalKeys(initiator=True, material=SHARED[:64])
    kb = DirectionalKeys(initiator=False, material=SHARED[:64])
    ka.add(SHARED[64:128])
    kb.add(SHARED[64:128])
    assert ka.outbound.take(256) == kb.inbound.take(256) == SHARED[:32]
    assert ka.inbound.take(256) == kb.outbound.take(256) == SHARED[32:64]
    assert ka.outbound.take(256) == kb.inbound.take(256) == SHARED[64:96]


@pytest.mark.parametrize("bit", [0, 7, 8 * 5 + 3, 8 * 11 - 1])
def test_payload_bit_flip_is_rejected_then_genuine_accepted(bit: int) -> None:
    alice, bob, ka, kb = pair()
    msg = b"cascade pass 1 parities"
    tag = alice.seal(msg, 0)
    bad = bytearray(msg)
    bad[bit // 8] ^= 1 << (bit % 8)
    assert rejected(bob, bytes(bad), 0, tag) is AuthFailure.BAD_TAG
    bob.verify(msg, 0, tag)  # the session recovers: the genuine message still verifies
    assert bob.statistics().rejected_bad_tag == 1 and bob.statistics().accepted == 1
    assert ka.outbound.bits_taken == kb.inbound.bits_taken


@pytest.mark.parametrize("bit", [0, 1, 64, 126, 127])
def test_tag_bit_flip_is_rejected(bit: int) -> None:
    alice, bob, _, _ = pair()
    tag = bytearray(alice.seal(b"seed", 0))
    tag[bit // 8] ^= 1 << (bit % 8)
    assert rejected(bob, b"seed", 0, bytes(tag)) is AuthFailure.BAD_TAG


def test_truncated_or_empty_tag_is_rejected() -> None:
    alice, bob, _, _ = pair()
    tag = alice.seal(b"m", 0)
    assert rejected(bob, b"m", 0, tag[:-1]) is AuthFailure.BAD_TAG
    assert rejected(bob, b"m", 0, b"") is AuthFailure.BAD_TAG
    bob.verify(b"m", 0, tag)


def test_replay_and_reordering_are_rejected_and_the_session_recovers() -> None:
    alice, bob, _, _ = pair()
    msgs = [f"message {i}".encode() for i in range(4)]
    tags = [alice.seal(m, i) for i, m in enumerate(msgs)]
    bob.verify(msgs[0], 0, tags[0])
    assert rejected(bob, msgs[0], 0, tags[0]) is AuthFailure.REPLAYED
    assert rejected(bob, msgs[2], 2, tags[2]) is AuthFailure.OUT_OF_ORDER
    # a genuine message re-labelled with the expected seq does not verify either
    assert rejected(bob, msgs[0], 1, tags[0]) is AuthFailure.BAD_TAG
    bob.verify(msgs[1], 1, tags[1])
    bob.verify(msgs[2], 2, tags[2])
    assert rejected(bob, msgs[1], 1, tags[1]) is AuthFailure.REPLAYED
    bob.verify(msgs[3], 3, tags[3])
    s = bob.statistics()
    assert (s.accepted, s.rejected_replayed, s.rejected_out_of_order, s.rejected_bad_tag) == (4, 2, 1, 1)
    assert s.rejected == 4
    assert bob.next_verify_seq == 4


def test_injection_ahead_of_the_genuine_message() -> None:
    """Eve sends seq 0 first; it is rejected, and Alice's real seq 0 still verifies."""
    alice, bob, ka, kb = pair()
    assert rejected(bob, b"evil", 0, bytes(TAG_BYTES)) is AuthFailure.BAD_TAG
    assert kb.inbound.bits_taken == 256  # r and the pad of seq 0, kept for the genuine message
    assert rejected(bob, b"evil again", 0, b"\xff" * TAG_BYTES) is AuthFailure.BAD_TAG
    assert kb.inbound.bits_taken == 256  # retried seq: no extra key
    tag = alice.seal(b"genuine", 0)
    bob.verify(b"genuine", 0, tag)
    assert ka.outbound.bits_taken == kb.inbound.bits_taken == 256


def test_a_different_key_is_rejected() -> None:
    alice, _, _, _ = pair(SHARED)
    _, mallory_bob, _, _ = pair(bytes(reversed(SHARED)))
    assert rejected(mallory_bob, b"hello", 0, alice.seal(b"hello", 0)) is AuthFailure.BAD_TAG


def test_messages_of_different_lengths_and_empty_payload() -> None:
    alice, bob, _, _ = pair()
    for i, size in enumerate([0, 1, 14, 15, 16, 29, 30, 4096]):
        msg = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        bob.verify(msg, i, alice.seal(msg, i))
    # a trailing zero byte changes the message (the length block)
    t = alice.seal(b"ab", 8)
    assert rejected(bob, b"ab\x00", 8, t) is AuthFailure.BAD_TAG


@given(st.binary(max_size=300), st.integers(0, 8 * 300 - 1))
def test_round_trip_and_any_single_bit_flip(payload: bytes, bit: int) -> None:
    alice, bob, _, _ = pair()
    tag = alice.seal(payload, 0)
    if payload:
        bad = bytearray(payload)
        bad[(bit // 8) % len(bad)] ^= 1 << (bit % 8)
        assert rejected(bob, bytes(bad), 0, tag) is AuthFailure.BAD_TAG
    bob.verify(payload, 0, tag)


# --------------------------------------------------------------------- key source


def test_key_exhaustion_is_typed_consumes_nothing_and_recovers_after_refill() -> None:
    # 48 bytes per direction: r + pad for seq 0, then one more pad (seq 1); seq 2 has none.
    alice, bob, ka, kb = pair(SHARED[:96])
    for i in range(2):
        bob.verify(b"m", i, alice.seal(b"m", i))
    with pytest.raises(KeyExhausted, match="has 0 bits; 128 requested"):
        alice.seal(b"m", 2)
    assert alice.next_seal_seq == 2 and ka.outbound.bits_taken == 384
    ka.add(SHARED[96:160])  # later: bits from the link's own key pool, fed to both ends
    kb.add(SHARED[96:160])
    bob.verify(b"m", 2, alice.seal(b"m", 2))
    assert ka.outbound.bits_taken == kb.inbound.bits_taken == 512


def test_buffer_key_source_contract() -> None:
    src = BufferKeySource(b"\x01\x02\x03\x04")
    assert isinstance(src, KeySource)
    assert src.take(16) == b"\x01\x02"
    assert (src.bits_available, src.bits_taken) == (16, 16)
    with pytest.raises(AuthenticationMisuse):
        src.take(12)
    with pytest.raises(KeyExhausted):
        src.take(24)
    src.extend(b"\x05")
    assert src.take(24) == b"\x03\x04\x05"


def test_buffer_key_source_compacts_without_changing_the_stream() -> None:
    data = bytes(range(256)) * 64
    src = BufferKeySource(data)
    got = b"".join(src.take(128) for _ in range(len(data) // 16))
    assert got == data and src.bits_available == 0


def test_seal_with_the_wrong_seq_is_caller_misuse() -> None:
    alice, _, _, _ = pair()
    with pytest.raises(AuthenticationMisuse, match="next outbound seq is 0"):
        alice.seal(b"m", 1)
    alice.seal(b"m", 0)
    with pytest.raises(AuthenticationMisuse):
        alice.seal(b"m", 0)


# --------------------------------------------------------------------- secrets stay secret


def _leaks(text: str, secrets: list[bytes], numbers: list[int]) -> list[str]:
    found = []
    for s in secrets:
        for i in range(0, len(s) - 3):
            window = s[i : i + 4]
            if window.hex() in text.lower() or repr(window)[2:-1] in text:
                found.append(window.hex())
    for n in numbers:
        for form in (str(n), hex(n)[2:]):
            if len(form) >= 8 and form in text.lower():
                found.append(form)
    return found


def test_no_key_material_in_reprs_exceptions_or_statistics() -> None:
    alice, bob, ka, kb = pair()
    tag = alice.seal(b"m", 0)
    texts = [repr(alice), repr(bob), repr(ka), repr(kb), repr(ka.outbound), str(ka.inbound)]
    for payload, seq, t in [(b"x", 0, tag), (b"m", 5, tag)]:
        with pytest.raises(AuthenticationFailed) as info:
            bob.verify(payload, seq, t)
        texts += [str(info.value), repr(info.value)]
    bob.verify(b"m", 0, tag)
    with pytest.raises(AuthenticationFailed) as info:
        bob.verify(b"m", 0, tag)
    texts += [str(info.value), repr(bob.statistics()), repr(alice.statistics())]
    tiny = DirectionalKeys(initiator=True, material=SHARED[:8])
    with pytest.raises(KeyExhausted) as exhausted:
        Authenticator.from_keys(tiny).seal(b"m", 0)
    texts.append(str(exhausted.value))
    r = _polyhash.key_from_bytes(SHARED[:16])
    pad = _polyhash.key_from_bytes(SHARED[16:32])
    # the detector itself finds a leak when there is one
    assert _leaks(repr(SHARED[40:60]), [SHARED], []) and _leaks(SHARED[40:60].hex(), [SHARED], [])
    assert _leaks(f"r={r}", [], [r]) and _leaks(f"pad={pad:x}", [], [pad])
    for text in texts:
        assert _leaks(text, [SHARED], [r, pad]) == [], text
    # and the reprs say something useful instead
    assert re.search(r"bits_taken=\d+", repr(ka.outbound))


def test_forgery_bound_stated() -> None:
    # (L + 3 + q) / 2^127 with L = ceil((8 + len)/15): below 2^-86 for 1 MB and q = 2^40.
    assert forgery_bound(1 << 20, 1 << 40) < 2.0**-86
    assert forgery_bound(0, 0) == (1 + 3) / 2.0**127
