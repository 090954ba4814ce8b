"""Authentication of post-processing messages, Wegman-Carter style, with key from a key source.

Theory of operation
-------------------
Sifting, Cascade parities, verification tags and amplification seeds travel in the
clear; what QKD needs is that nobody can alter or inject them. Each message is
authenticated with an information-theoretic MAC (Wegman & Carter, "New hash functions
and their use in authentication and set equality", JCSS 22 (1981) 265; built on
Carter & Wegman, JCSS 18 (1979) 143):

    tag = h_r(seq || payload) + s_seq   (mod p = 2^127 - 1)

* ``h_r`` is the polynomial hash of ``_polyhash`` over GF(2^127 - 1) with a secret key r,
  ε-almost-Δ-universal: for different messages m != m' of at most L data blocks
  (15 bytes each), ``Pr_r[h_r(m) - h_r(m') = δ] <= (L + 2)/2^127`` for every δ.
* ``s_seq`` is a fresh secret pad per message: a one-time pad in the group Z_p (addition
  mod p plays the role XOR plays for bit strings, and matches the Δ-universality of
  h). It makes every tag independent of r (up to 2^-127 per tag, from reducing 127
  random bits mod p), so r can be reused for all messages of a direction (Wegman &
  Carter 1981; composable security of this key recycling: Portmann, "Key recycling in
  authentication", IEEE TIT 60 (2014) 4383).
* ``seq`` (8 bytes, big-endian) is a per-direction message number inside the
  authenticated data, so a replayed or reordered message is recognised and rejected.

Forgery bound (per attempt). Having seen q sealed messages, an adversary who sends any
(seq, payload, tag) not sent by the legitimate end is accepted with probability at most

    (L + 3 + q) / 2^127,        L = ceil((8 + len(payload)) / 15)

(L + 2 from the Δ-universal bound under r's slightly non-uniform distribution, q from
the distance to uniform, 2^-127 each, of the pads behind the q tags seen, and 1 of
slack; a forgery for a seq not sealed yet must hit an unseen pad: <= 2^-126). For
1 MB messages and q = 2^40 that is below 2^-86. Rejections reveal nothing but "wrong
guess", so F attempts succeed with probability <= F × this figure (union bound); every
attempt is counted in ``statistics()``.

Key consumption: each direction has its own key stream — its first 128 bits are r, then
128 bits of pad per sequence number. The sender takes the pad when it seals seq k,
the receiver when it first checks a message with the seq it expects; a rejected
message does not advance the receiver, so the pad of seq k stays cached for the genuine
message. Thus both ends take the same bits, in the same order, whatever arrives in
between. ``DirectionalKeys`` builds the two streams of one end from material both ends
share (the scenario's bootstrap key at first, bits of the link's own key pool later):
the first half of each piece of material feeds initiator -> responder, the second half
responder -> initiator.

Receiver rules (the state is ``expected``, the next sequence number to accept):

    seq < expected  -> reject REPLAYED        (no key taken)
    seq > expected  -> reject OUT_OF_ORDER    (no key taken)
    seq == expected -> check the tag; bad -> reject BAD_TAG (pad kept for seq);
                       good -> accept, expected += 1

Cost: one pass of the polynomial hash over seq || payload per seal and per verify, run
by the kernel backend (``Backend.poly127_hash``: C, or the Python reference loop),
``get_backend()`` unless the caller passes one.

Secrets: no key byte, pad or hash key appears in a repr, an exception or statistics.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
from typing import Protocol, runtime_checkable

from emulator.kernels import Backend, get_backend

from . import _polyhash

__all__ = [
    "SEQ_LIMIT",
    "TAG_BYTES",
    "AuthFailure",
    "AuthStatistics",
    "AuthenticationFailed",
    "AuthenticationMisuse",
    "Authenticator",
    "BufferKeySource",
    "DirectionalKeys",
    "KeyExhausted",
    "KeySource",
    "forgery_bound",
]

TAG_BYTES = 16
_KEY_BITS = 128  # bits taken per hash key and per pad (127 used)
SEQ_LIMIT = 1 << 64  # seq travels as 8 bytes


@runtime_checkable
class KeySource(Protocol):
    """A stream of secret bits that both ends of a direction read in the same order."""

    def take(self, n_bits: int) -> bytes:
        """The next ``n_bits`` bits (a positive multiple of 8) as n_bits // 8 bytes.

        Raises :class:`KeyExhausted`, taking nothing, when fewer bits are left.
        """
        ...


class KeyExhausted(Exception):
    """The key source has fewer bits than requested (refill it from the key pool)."""


class AuthenticationMisuse(ValueError):
    """The caller used the authenticator wrongly (not an attack)."""


class AuthFailure(enum.Enum):
    BAD_TAG = "bad tag"
    REPLAYED = "replayed"
    OUT_OF_ORDER = "out of order"


class AuthenticationFailed(Exception):
    """A received post-processing message was rejected; the session counts it and carries on."""

    def __init__(self, reason: AuthFailure, seq: int, expected: int) -> None:
        self.reason = reason
        self.seq = seq
        self.expected = expected
        super().__init__(f"post-processing message seq {seq} rejected: {reason.value} (expected seq {expected})")


class BufferKeySource:
    """An in-memory :class:`KeySource` over a bytes buffer, refillable with :meth:`extend`."""

    __slots__ = ("_buf", "_pos", "_taken_bits")

    def __init__(self, key: bytes = b"") -> None:
        self._buf = bytearray(key)
        self._pos = 0
        self._taken_bits = 0

    def take(self, n_bits: int) -> bytes:
        if n_bits <= 0 or n_bits % 8:
            raise AuthenticationMisuse(
                f"key is taken in whole bytes: n_bits must be a positive multiple of 8, not {n_bits}"
            )
        n = n_bits // 8
        if len(self._buf) - self._pos < n:
            raise KeyExhausted(f"key source has {self.bits_available} bits; {n_bits} requested")
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self._taken_bits += n_bits
        if self._pos > 4096 and self._pos * 2 > len(self._buf):  # drop the consumed prefix
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def extend(self, more: bytes) -> None:
        """Append key material (read after everything already in the buffer)."""
        self._buf += more

    @property
    def bits_available(self) -> int:
        return 8 * (len(self._buf) - self._pos)

    @property
    def bits_taken(self) -> int:
        return self._taken_bits

    def __repr__(self) -> str:
        return f"BufferKeySource(bits_available={self.bits_available}, bits_taken={self.bits_taken})"


class DirectionalKeys:
    """The two key streams of one end: ``outbound`` (seal) and ``inbound`` (verify).

    Both ends feed the same material with opposite ``initiator``; the first half
    (len // 2 bytes) of each piece goes to initiator -> responder, the rest to
    responder -> initiator, so one end's outbound stream equals the other's inbound.
    """

    __slots__ = ("inbound", "initiator", "outbound")

    def __init__(self, *, initiator: bool, material: bytes = b"") -> None:
        self.initiator = initiator
        self.outbound = BufferKeySource()
        self.inbound = BufferKeySource()
        if material:
            self.add(material)

    def add(self, material: bytes) -> None:
        half = len(material) // 2
        forward, backward = material[:half], material[half:]
        if self.initiator:
            self.outbound.extend(forward)
            self.inbound.extend(backward)
        else:
            self.outbound.extend(backward)
            self.inbound.extend(forward)

    def __repr__(self) -> str:
        return f"DirectionalKeys(initiator={self.initiator}, outbound={self.outbound!r}, inbound={self.inbound!r})"


@dataclasses.dataclass(frozen=True, slots=True)
class AuthStatistics:
    sealed: int
    accepted: int
    rejected_bad_tag: int
    rejected_replayed: int
    rejected_out_of_order: int
    key_bits_outbound: int  # taken from the outbound source so far
    key_bits_inbound: int  # taken from the inbound source so far

    @property
    def rejected(self) -> int:
        return self.rejected_bad_tag + self.rejected_replayed + self.rejected_out_of_order


def forgery_bound(payload_bytes: int, sealed: int) -> float:
    """Per-attempt forgery probability bound (L + 3 + q)/2^127 for payloads up to payload_bytes."""
    return (_polyhash.n_blocks(8 + payload_bytes) + 3 + sealed) / 2.0**127


def _mac_input(seq: int, payload: bytes) -> bytes:
    return seq.to_bytes(8, "big") + payload  # bytes + any bytes-like: one copy


class Authenticator:
    """Seal outbound and verify inbound post-processing messages of one link end (sans-IO)."""

    __slots__ = (
        "_accepted",
        "_backend",
        "_bad_tag",
        "_expected",
        "_in_pad",
        "_in_r",
        "_inbound",
        "_next_out",
        "_out_r",
        "_out_of_order",
        "_outbound",
        "_replayed",
        "_sealed",
        "_taken_in",
        "_taken_out",
    )

    def __init__(self, outbound: KeySource, inbound: KeySource, *, backend: Backend | None = None) -> None:
        self._backend = backend if backend is not None else get_backend()
        self._outbound = outbound
        self._inbound = inbound
        self._out_r: int | None = None
        self._in_r: int | None = None
        self._in_pad: int | None = None  # pad of seq == expected, once taken
        self._next_out = 0
        self._expected = 0
        self._sealed = self._accepted = 0
        self._bad_tag = self._replayed = self._out_of_order = 0
        self._taken_out = self._taken_in = 0

    @classmethod
    def from_keys(cls, keys: DirectionalKeys, *, backend: Backend | None = None) -> Authenticator:
        return cls(keys.outbound, keys.inbound, backend=backend)

    def _pad(self, inbound: bool) -> int:
        """The next pad of a direction; the first call also takes r (256 bits in one take)."""
        source = self._inbound if inbound else self._outbound
        have_r = (self._in_r if inbound else self._out_r) is not None
        n_bits = _KEY_BITS if have_r else 2 * _KEY_BITS
        raw = source.take(n_bits)  # KeyExhausted leaves our state untouched
        if inbound:
            self._taken_in += n_bits
        else:
            self._taken_out += n_bits
        if not have_r:
            r = _polyhash.key_from_bytes(raw[:16])
            raw = raw[16:]
            if inbound:
                self._in_r = r
            else:
                self._out_r = r
        return _polyhash.key_from_bytes(raw)

    # -- sender

    @property
    def next_seal_seq(self) -> int:
        return self._next_out

    def seal(self, payload: bytes, seq: int) -> bytes:
        """The 16-byte tag of ``payload`` as message ``seq`` (must be :attr:`next_seal_seq`).

        Takes 128 bits from the outbound source (256 on the first call: r, then the
        pad); raises :class:`KeyExhausted`, consuming nothing, when they are missing.
        """
        if seq != self._next_out:
            raise AuthenticationMisuse(f"seal called with seq {seq}; the next outbound seq is {self._next_out}")
        if seq >= SEQ_LIMIT:
            raise AuthenticationMisuse(f"outbound sequence numbers are exhausted (limit {SEQ_LIMIT})")
        pad = self._pad(inbound=False)
        assert self._out_r is not None
        data = _mac_input(seq, payload)
        tag = (_polyhash.poly_hash(data, self._out_r, len(data), self._backend) + pad) % _polyhash.P127
        self._next_out += 1
        self._sealed += 1
        return tag.to_bytes(TAG_BYTES, "little")

    # -- receiver

    @property
    def next_verify_seq(self) -> int:
        return self._expected

    def verify(self, payload: bytes, seq: int, tag: bytes) -> None:
        """Accept message ``seq`` or raise :class:`AuthenticationFailed` (counted; state unchanged).

        Only a message with the expected seq takes key (its pad, and r first); the pad
        stays cached until the genuine message for that seq arrives.
        """
        expected = self._expected
        if seq < expected:
            self._replayed += 1
            raise AuthenticationFailed(AuthFailure.REPLAYED, seq, expected)
        if seq > expected:
            self._out_of_order += 1
            raise AuthenticationFailed(AuthFailure.OUT_OF_ORDER, seq, expected)
        if self._in_pad is None:
            self._in_pad = self._pad(inbound=True)
        assert self._in_r is not None
        data = _mac_input(seq, payload)
        want = (_polyhash.poly_hash(data, self._in_r, len(data), self._backend) + self._in_pad) % _polyhash.P127
        if not hmac.compare_digest(want.to_bytes(TAG_BYTES, "little"), bytes(tag)):
            self._bad_tag += 1
            raise AuthenticationFailed(AuthFailure.BAD_TAG, seq, expected)
        self._in_pad = None
        self._expected += 1
        self._accepted += 1

    def statistics(self) -> AuthStatistics:
        return AuthStatistics(
            sealed=self._sealed,
            accepted=self._accepted,
            rejected_bad_tag=self._bad_tag,
            rejected_replayed=self._replayed,
            rejected_out_of_order=self._out_of_order,
            key_bits_outbound=self._taken_out,
            key_bits_inbound=self._taken_in,
        )

    def __repr__(self) -> str:
        return (
            f"Authenticator(next_seal_seq={self._next_out}, next_verify_seq={self._expected}, "
            f"sealed={self._sealed}, accepted={self._accepted})"
        )
