"""One-time-pad transport with Wegman-Carter one-time MACs: the cryptography of key relay and key wrap.

Theory of operation
-------------------
A KME-pair key travels between KMEs only as a one-time-pad ciphertext (Vernam): over
one QKD link h -> h+1 the sender takes ``len(payload) + MAC_KEY_BYTES`` fresh bytes of
the link's key material (``KeyStore.take_own``, the stream h owns; h+1 takes the same
bytes with ``take_peer`` at the position the message names) and splits them into

    pad  (len(payload) bytes)  ->  ct = payload XOR pad        (perfect secrecy, Shannon 1949)
    r, s (16 + 16 bytes)       ->  tag = (h_r(A) + s) mod p,   p = 2^127 - 1

where A is the authenticated data — a domain label, the hop's two node names and
every field of the message that the receiver acts on, each length-prefixed, then the
ciphertext — and h_r is the polynomial hash of ``nodes.qkd._polyhash`` (kernel
``poly127_hash``). For a key r used once, h_r is (L+2)/2^127-almost-Δ-universal
(L = number of 15-byte blocks of A, see ``_polyhash``), and adding the one-time pad s
makes the tag a Wegman-Carter one-time MAC (Wegman & Carter, JCSS 22 (1981) 265): an
adversary who changes anything in a message (including the ciphertext: an OTP is
malleable) is accepted with probability at most ``(L + 3) / 2^127`` (one more than the
Δ-universal bound for s's reduction mod p). Since r and s are never reused, no
recycling argument is needed.

What the receiver trusts: a good tag proves the message came from the KME at the other
end of the link and was not altered; the pad makes the payload secret. A trusted relay
decrypts and re-encrypts with the next link's material (the trusted-node model of QKD
networks, e.g. ITU-T Y.3803 §8; ETSI GS QKD 004 Annex).

Key wrap (multicast key transport) uses the same construction with KME-pair keys as
the pad and MAC key instead of link material (``WRAP_LABEL``), and a key assignment is
authenticated by a one-time MAC whose key is a KME-pair key spent for it
(``ASSIGN_LABEL``; under policy pqc a key derived from the PQC epoch instead).

Everything here is pure functions over bytes; no key byte appears in an exception.
"""

from __future__ import annotations

import hmac
import uuid
from typing import Final

from nodes.qkd import _polyhash

__all__ = [
    "ASSIGN_LABEL",
    "MAC_KEY_BYTES",
    "RELAY_LABEL",
    "TAG_BYTES",
    "TOKEN_BYTES",
    "WRAP_LABEL",
    "auth_data",
    "derived_key_id",
    "open_otp",
    "seal_otp",
    "wc_tag",
    "xor_bytes",
]

MAC_KEY_BYTES: Final = 32  # r (16 bytes) || s (16 bytes), each reduced to GF(2^127 - 1)
TAG_BYTES: Final = 16
#: A relay moves key || token; the token (never part of the key) is revealed in relay_ok as
#: the end-to-end confirmation: forging it means guessing 128 uniform bits.
TOKEN_BYTES: Final = 16
RELAY_LABEL: Final = b"qnetem kms relay v1"
WRAP_LABEL: Final = b"qnetem kms wrap v1"
ASSIGN_LABEL: Final = b"qnetem kms assign v1"
_DERIVED_NS: Final = uuid.UUID("6f6e6574-656d-4b4d-9e53-646572697665")  # fixed namespace for derived ids


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """a XOR b (equal lengths)."""
    if len(a) != len(b):
        raise ValueError("xor of strings of different lengths")
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def auth_data(label: bytes, *fields: str | int | bytes | None) -> bytes:
    """The authenticated data: label, then every field length-prefixed (4 bytes, big-endian).

    Strings as UTF-8, integers as 8 bytes big-endian (non-negative), None as an empty
    field with a distinct type byte. Distinct field tuples give distinct byte strings.
    """
    parts = [len(label).to_bytes(4, "big"), label]
    for f in fields:
        if f is None:
            kind, raw = b"n", b""
        elif isinstance(f, bool):
            raise TypeError("booleans are not authenticated fields")
        elif isinstance(f, int):
            kind, raw = b"i", f.to_bytes(8, "big")
        elif isinstance(f, str):
            kind, raw = b"s", f.encode()
        else:
            kind, raw = b"b", bytes(f)
        parts += [kind, len(raw).to_bytes(4, "big"), raw]
    return b"".join(parts)


def wc_tag(data: bytes, mac_key: bytes) -> bytes:
    """Wegman-Carter one-time tag: (h_r(data) + s) mod (2^127 - 1), 16 bytes little-endian."""
    if len(mac_key) != MAC_KEY_BYTES:
        raise ValueError(f"a one-time MAC key is {MAC_KEY_BYTES} bytes")
    r = _polyhash.key_from_bytes(mac_key[:16])
    s = _polyhash.key_from_bytes(mac_key[16:])
    tag = (_polyhash.poly_hash(data, r, len(data)) + s) % _polyhash.P127
    return tag.to_bytes(TAG_BYTES, "little")


def seal_otp(payload: bytes, material: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """(ciphertext, tag) of `payload` with `material` = pad || MAC key; aad is authenticated with ct."""
    n = len(payload)
    if len(material) != n + MAC_KEY_BYTES:
        raise ValueError("material must be len(payload) + MAC_KEY_BYTES bytes")
    ct = xor_bytes(payload, material[:n])
    return ct, wc_tag(aad + ct, material[n:])


def open_otp(ct: bytes, tag: bytes, material: bytes, aad: bytes) -> bytes | None:
    """The payload, or None when the tag does not verify (nothing about the key is revealed)."""
    n = len(ct)
    if len(material) != n + MAC_KEY_BYTES or len(tag) != TAG_BYTES:
        return None
    if not hmac.compare_digest(wc_tag(aad + ct, material[n:]), tag):
        return None
    return xor_bytes(ct, material[:n])


def derived_key_id(base_id: str) -> str:
    """The id of a key derived from KME-pair key `base_id` (composite or hybrid): UUID v5.

    Deterministic, so that both ends — and a withdrawal naming only the base id — agree
    on it without sending it.
    """
    return str(uuid.uuid5(_DERIVED_NS, base_id))
