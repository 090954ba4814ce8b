"""Hybrid keys for the KMS: QKD key + ML-KEM-768 + X25519, and the authenticated PQC exchange between KMEs.

Theory of operation
-------------------
A pair of SAEs asks for keys under one of three policies (``Policy``):

* ``qkd``: the KME-pair key made from QKD link material, delivered as is;
* ``pqc``: a key derived from an ML-KEM-768 (FIPS 203) and an X25519 (RFC 7748) shared
  secret that the two KMEs established with the exchange below;
* ``hybrid``: a key derived from all three, secure as long as *one* of them is
  (QKD, the lattice problem behind ML-KEM, or elliptic-curve Diffie-Hellman).

1. The combiner (``cat_kdf``, ``hybrid_key``)
.............................................
ETSI TS 103 744 V1.1.1 (2020-12) "Quantum-safe Hybrid Key Exchanges", §8.2, the
concatenate KDF ("CatKDF"), with SHA-256:

    secret       = psk || k_1 || ... || k_n                        (§8.2 step 1)
    f_context    = SHA-256(len(context) || context || len(MA) || MA
                           || len(MB) || MB)                        (§7.2, f; len = 4 bytes, big-endian)
    key_material = HKDF-SHA-256(IKM = secret, salt = label,
                                info = f_context, L = length)       (§8.2 step 3; §7.4.2)

HKDF is RFC 5869 §2.2 (Extract: PRK = HMAC-SHA-256(salt, IKM)) followed by §2.3
(Expand: T(i) = HMAC-SHA-256(PRK, T(i-1) || info || i)), so L <= 255 × 32 bytes. It is
the KDF of the TS's HKDF-SHA-256 parameter set; the mapping of the inputs (salt = label,
info = f_context) is the one of the TS's reference implementation (ETSI forge,
``cyber.103744_QHKEX``, ``qshkex.c``), and ``cat_kdf`` reproduces the TS's Annex C test
vectors C.2.1 and C.2.9 (``tests/data/kms_hybrid_kat.json``). We chose HKDF over the
TS's other KDFs because every library has it (``cryptography`` here, stdlib ``hmac`` in
the tests) and it is built to extract from non-uniform secrets such as DH outputs
(RFC 5869 §3.3).

``hybrid_key`` fixes the inputs:

* psk = the QKD key (policy hybrid) or empty (policy pqc). The QKD key plays the TS's
  pre-shared key: a symmetric secret established outside the asymmetric exchange.
* k_1 = the ML-KEM-768 shared secret, k_2 = the X25519 shared secret, in this order.
  Both are exactly 32 bytes (FIPS 203 §7.2-7.3 and Table 3; RFC 7748 §6.1) and are
  checked to be, so the concatenation is unambiguous without length prefixes: the QKD
  key is whatever precedes the last 64 bytes.
* label = ``LABELS[policy]`` (``qnetem kms pqc v1`` / ``qnetem kms hybrid v1``):
  separates the policies' key spaces even for equal inputs.
* context = the caller's bytes (use ``key_context``: key id, the exchange's transcript
  hash, ...); MA = MB = empty. The exchanged public values (the TS's MA and MB) are
  bound through the transcript hash inside the context, which is a SHA-256 over them
  and everything else the KMEs sent; one epoch's secrets serve many keys, the key id in
  the context makes each key different.

Policy ``qkd`` returns the QKD key unchanged (its length must be the requested one):
it is information-theoretically secure, and a pass through a computational KDF would
only make it computationally secure.

2. The exchange (``PqcInitiator``, ``PqcResponder``)
...................................................
Two KMEs, initiator I and responder R, agree on fresh ML-KEM-768 and X25519 secrets,
authenticated with the ECDSA P-256 keys of their KME certificates (issued by the run CA,
CN ``kme-<node>``), in three messages::

    I -> R  PqcInit     epoch_id, I, R, X25519 public key pk_I (32 B),
                        ML-KEM-768 encapsulation key ek (1184 B), nonce_I (32 B), cert_I
    R -> I  PqcResponse epoch_id, I, R, pk_R, ML-KEM ciphertext ct (1088 B), nonce_R,
                        cert_R, sig_R = Sign_R("... responder signature" || th_R)
    I -> R  PqcConfirm  epoch_id, I, R, sig_I = Sign_I("... initiator signature" || th_I)

    th_R = SHA-256(D || enc(PqcInit) || enc(PqcResponse without sig_R))
    th_I = SHA-256(D || enc(PqcInit) || enc(PqcResponse without sig_R) || enc(sig_R))

where enc() writes the message type and each field length-prefixed (4 bytes,
big-endian; integers as 8 bytes), D is a fixed domain string, and th_I, the hash of
everything sent before the last signature, is the epoch's ``transcript_hash``. R
encapsulates to ek (FIPS 203 ML-KEM.Encaps, §7.2) and computes X25519(sk_R, pk_I); I
decapsulates ct (ML-KEM.Decaps, §7.3) and computes X25519(sk_I, pk_R) (RFC 7748 §6.1;
an all-zero result, from a low-order point, is refused).

Why it is authenticated (SIGMA, Krawczyk, CRYPTO 2003, "sign the transcript"; the
same shape as TLS 1.3's CertificateVerify, RFC 8446 §4.4.3): each side signs a hash
of the whole transcript, which holds both ephemeral public values, both nonces, both
node names and both certificates. A signature verifies only under a key certified by
the run CA for CN ``kme-<peer>`` (with serverAuth, which only KME certificates have), so
a man in the middle cannot substitute ephemeral keys (the peer's signature would not
cover them), cannot replay an old message into a new session (the other side's fresh
ephemeral keys and nonce are in what the peer must sign), and cannot mis-bind
identities (both names are signed, SIGMA's identity binding). The role strings in the
signed data keep a signature of one role from serving as the other's. R accepts only
after I's signature over R's own fresh values (the third message); I accepts after
R's signature over I's fresh values. Neither side gets explicit key confirmation: a
peer whose decapsulation went wrong is noticed when derived keys are used.

Receiver rules (``PqcPeerFailure`` names the reason of each rejection):

==========  ======================================================  ==============
who / msg   condition                                               verdict
==========  ======================================================  ==============
R / init    responder != me, or initiator not an allowed peer       WRONG_IDENTITY
R / init    epoch_id <= last completed epoch with that peer         REPLAYED
R / init    cert_I not by the run CA, expired, not a KME cert       BAD_CERTIFICATE
R / init    cert_I CN != kme-<initiator>                            WRONG_IDENTITY
R / init    otherwise: answer; a pending exchange with the peer is abandoned
I / resp    epoch_id < mine                                         REPLAYED
I / resp    epoch_id > mine, or not waiting for a response          UNEXPECTED
I / resp    names, certificate: as above; sig_R bad                 BAD_SIGNATURE
R / conf    responder != me                                         WRONG_IDENTITY
R / conf    epoch_id <= last completed                              REPLAYED
R / conf    no pending exchange with that epoch                     UNEXPECTED
R / conf    sig_I bad                                               BAD_SIGNATURE
==========  ======================================================  ==============

A malformed field (size, type, an unknown key) is MALFORMED. The initiator's exchange
ends at the first failure (start a new epoch); the responder keeps its pending state
when a confirmation fails, so a forged one does not kill the genuine exchange, and
advances the last completed epoch only when a confirmation verifies (an unauthenticated
init cannot move the replay window). Epoch ids are chosen by the initiator and must
grow per peer; the shell persists ``last_epochs`` across restarts if it wants replay
protection across them.

Randomness and time. Ephemeral keys and nonces come from the operating system (the
``cryptography`` key generators and ``os.urandom``): these are real keys, and a seeded
generator would make them predictable. Certificate validity is checked against ``now``,
an aware ``datetime`` passed by the caller. No I/O.

Secrets. Shared secrets, private keys and derived keys never appear in a repr, an
exception or statistics; ``PqcEpoch`` hides its secrets from repr.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import os
import re
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Final, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "HASH_BYTES",
    "LABELS",
    "MAX_KEY_BYTES",
    "MLKEM768_CIPHERTEXT_BYTES",
    "MLKEM768_ENCAPSULATION_KEY_BYTES",
    "NONCE_BYTES",
    "SHARED_SECRET_BYTES",
    "X25519_KEY_BYTES",
    "HybridError",
    "KmeIdentity",
    "Policy",
    "PqcAuthenticationFailed",
    "PqcConfirm",
    "PqcEpoch",
    "PqcInit",
    "PqcInitiator",
    "PqcMessage",
    "PqcPeerFailure",
    "PqcProtocolError",
    "PqcResponder",
    "PqcResponderStatistics",
    "PqcResponse",
    "cat_kdf",
    "f_context",
    "hybrid_key",
    "key_context",
    "message_from_dict",
    "policy_of",
]

HASH_BYTES: Final = 32  # SHA-256
#: RFC 5869 §2.3: L <= 255 * HashLen.
MAX_KEY_BYTES: Final = 255 * HASH_BYTES
#: FIPS 203 Table 3 (k = 3): ek = 384k + 32 bytes, c = 32(d_u k + d_v) bytes; K is 32 bytes.
MLKEM768_ENCAPSULATION_KEY_BYTES: Final = 1184
MLKEM768_CIPHERTEXT_BYTES: Final = 1088
SHARED_SECRET_BYTES: Final = 32  # ML-KEM's K (FIPS 203) and X25519's output (RFC 7748 §6.1)
X25519_KEY_BYTES: Final = 32  # RFC 7748 §5
NONCE_BYTES: Final = 32
_MAX_CERT_PEM_BYTES: Final = 16384
_MAX_SIGNATURE_BYTES: Final = 80  # DER ECDSA P-256: at most 72
_EPOCH_LIMIT: Final = 1 << 64
_NODE_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]*\Z")  # emulator.certs: node names
_NODE_MAX: Final = 60  # 64 (RFC 5280 ub-common-name) - len("kme-")


class Policy(enum.Enum):
    """How a pair of SAEs gets its keys."""

    QKD = "qkd"
    PQC = "pqc"
    HYBRID = "hybrid"


#: The CatKDF label (HKDF salt) of each derived policy.
LABELS: Final[Mapping[Policy, bytes]] = {Policy.PQC: b"qnetem kms pqc v1", Policy.HYBRID: b"qnetem kms hybrid v1"}


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class HybridError(Exception):
    """Misuse by the caller (bad arguments, calls out of order); base of every error here."""


class PqcPeerFailure(enum.Enum):
    """Why a message of the peer was refused (see the rules in the module docstring)."""

    MALFORMED = "malformed"
    UNEXPECTED = "unexpected"
    REPLAYED = "replayed"
    WRONG_IDENTITY = "wrong-identity"
    BAD_CERTIFICATE = "bad-certificate"
    BAD_SIGNATURE = "bad-signature"


class PqcProtocolError(HybridError):
    """The peer sent something illegal: malformed, or not expected now. No state changed."""

    def __init__(self, reason: PqcPeerFailure, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


class PqcAuthenticationFailed(PqcProtocolError):
    """A certificate, identity, freshness (replay) or signature check failed."""


_AUTH_REASONS: Final = frozenset(
    {
        PqcPeerFailure.REPLAYED,
        PqcPeerFailure.WRONG_IDENTITY,
        PqcPeerFailure.BAD_CERTIFICATE,
        PqcPeerFailure.BAD_SIGNATURE,
    }
)


def _peer_error(reason: PqcPeerFailure, message: str) -> PqcProtocolError:
    cls = PqcAuthenticationFailed if reason in _AUTH_REASONS else PqcProtocolError
    return cls(reason, message)


# ---------------------------------------------------------------------------
# 1. The combiner
# ---------------------------------------------------------------------------


def _len32(data: bytes) -> bytes:
    if len(data) >= 1 << 32:
        raise HybridError("a CatKDF input is longer than 2^32 - 1 bytes")
    return len(data).to_bytes(4, "big")


def f_context(context: bytes, ma: bytes, mb: bytes) -> bytes:
    """ETSI TS 103 744 §7.2, the context formatting function f, with SHA-256."""
    h = hashlib.sha256()
    for value in (context, ma, mb):
        h.update(_len32(value))
        h.update(value)
    return h.digest()


def _check_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise HybridError(f"{name} must be bytes, not {type(value).__name__}")
    return bytes(value)


def _check_length(length_bytes: object) -> int:
    if isinstance(length_bytes, bool) or not isinstance(length_bytes, int):
        raise HybridError("length_bytes must be an int")
    if not 1 <= length_bytes <= MAX_KEY_BYTES:
        raise HybridError(f"length_bytes={length_bytes} is not within 1..{MAX_KEY_BYTES} (RFC 5869 §2.3)")
    return length_bytes


def cat_kdf(
    *,
    secrets: tuple[bytes, ...] | list[bytes],
    psk: bytes = b"",
    ma: bytes = b"",
    mb: bytes = b"",
    context: bytes = b"",
    label: bytes = b"",
    length_bytes: int,
) -> bytes:
    """ETSI TS 103 744 §8.2 CatKDF with SHA-256 and HKDF (RFC 5869): see the module docstring.

    `secrets` are k_1..k_n (at least one, each non-empty), `psk` may be empty.
    """
    if not secrets:
        raise HybridError("CatKDF needs at least one shared secret")
    parts = [_check_bytes("psk", psk)]
    for i, k in enumerate(secrets, 1):
        k = _check_bytes(f"k_{i}", k)
        if not k:
            raise HybridError(f"k_{i} is empty")
        parts.append(k)
    secret = b"".join(parts)  # §8.2 step 1
    info = f_context(_check_bytes("context", context), _check_bytes("MA", ma), _check_bytes("MB", mb))  # step 2
    kdf = HKDF(  # step 3: salt = label, info = f_context
        algorithm=hashes.SHA256(), length=_check_length(length_bytes), salt=_check_bytes("label", label), info=info
    )
    return kdf.derive(secret)


def policy_of(qkd_key: bytes | None, mlkem_secret: bytes | None, x25519_secret: bytes | None) -> Policy:
    """The policy a combination of inputs stands for: qkd alone, the two PQC secrets, or all three."""
    present = (qkd_key is not None, mlkem_secret is not None, x25519_secret is not None)
    if present == (True, False, False):
        return Policy.QKD
    if present == (False, True, True):
        return Policy.PQC
    if present == (True, True, True):
        return Policy.HYBRID
    raise HybridError(
        "give the QKD key alone (qkd), both PQC secrets (pqc) or all three (hybrid); "
        f"got qkd_key={'set' if present[0] else None}, mlkem_secret={'set' if present[1] else None}, "
        f"x25519_secret={'set' if present[2] else None}"
    )


def hybrid_key(
    *,
    qkd_key: bytes | None,
    mlkem_secret: bytes | None,
    x25519_secret: bytes | None,
    context: bytes,
    length_bytes: int,
) -> bytes:
    """A key of `length_bytes` bytes under the policy the inputs select (`policy_of`).

    qkd: `qkd_key` itself (its length must be `length_bytes`; `context` is not used).
    pqc / hybrid: CatKDF(psk = qkd_key or empty, k_1 = mlkem_secret, k_2 = x25519_secret,
    context, label = LABELS[policy]); both secrets must be 32 bytes.
    """
    policy = policy_of(qkd_key, mlkem_secret, x25519_secret)
    length_bytes = _check_length(length_bytes)
    context = _check_bytes("context", context)
    if qkd_key is not None:
        qkd_key = _check_bytes("qkd_key", qkd_key)
        if not qkd_key:
            raise HybridError("qkd_key is empty")
    if policy is Policy.QKD:
        assert qkd_key is not None
        if len(qkd_key) != length_bytes:
            raise HybridError(f"policy qkd: the QKD key has {len(qkd_key)} bytes, {length_bytes} were asked for")
        return qkd_key
    assert mlkem_secret is not None and x25519_secret is not None
    for name, value in (("mlkem_secret", mlkem_secret), ("x25519_secret", x25519_secret)):
        if len(_check_bytes(name, value)) != SHARED_SECRET_BYTES:
            raise HybridError(f"{name} must be {SHARED_SECRET_BYTES} bytes, not {len(value)}")
    return cat_kdf(
        psk=qkd_key or b"",
        secrets=(bytes(mlkem_secret), bytes(x25519_secret)),
        context=context,
        label=LABELS[policy],
        length_bytes=length_bytes,
    )


def key_context(*, key_id: str, transcript_hash: bytes, extra: tuple[bytes | str, ...] = ()) -> bytes:
    """A canonical CatKDF context for one key: ``"qnetem kms key v1"``, key id, transcript hash, `extra`.

    Every item is length-prefixed (4 bytes, big-endian; text as UTF-8), so distinct
    tuples give distinct contexts. Both KMEs must pass the same items in the same order.
    """
    items: list[bytes] = [b"qnetem kms key v1", key_id.encode(), _check_bytes("transcript_hash", transcript_hash)]
    items += [x.encode() if isinstance(x, str) else _check_bytes("extra item", x) for x in extra]
    return b"".join(_len32(x) + x for x in items)


# ---------------------------------------------------------------------------
# 2. The exchange: messages
# ---------------------------------------------------------------------------

_Field = Union[bytes, str, int]
_DOMAIN: Final = b"qnetem kms pqc-exchange v1"
_SIG_CONTEXT_RESPONDER: Final = b"qnetem kms pqc-exchange v1, responder signature\x00"
_SIG_CONTEXT_INITIATOR: Final = b"qnetem kms pqc-exchange v1, initiator signature\x00"


def _enc_field(value: _Field) -> bytes:
    if isinstance(value, int):
        raw = value.to_bytes(8, "big")
    elif isinstance(value, str):
        raw = value.encode()
    else:
        raw = value
    return len(raw).to_bytes(4, "big") + raw


def _malformed(message: str) -> PqcProtocolError:
    return PqcProtocolError(PqcPeerFailure.MALFORMED, message)


def _check_node(field: str, value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= _NODE_MAX or _NODE_RE.match(value) is None:
        raise _malformed(f"{field} is not a node name")
    return value


def _check_field_bytes(field: str, value: object, *, size: int | None = None, max_size: int | None = None) -> None:
    if not isinstance(value, bytes):
        raise _malformed(f"{field} must be bytes, not {type(value).__name__}")
    if size is not None and len(value) != size:
        raise _malformed(f"{field} has {len(value)} bytes, expected {size}")
    if max_size is not None and not 1 <= len(value) <= max_size:
        raise _malformed(f"{field} has {len(value)} bytes, expected 1..{max_size}")


def _check_epoch(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _EPOCH_LIMIT:
        raise _malformed("epoch_id must be an int in 0..2^64-1")


class _Message:
    """Shared codec of the three messages: to_dict / from_dict and the transcript encoding."""

    __slots__ = ()
    TYPE: ClassVar[str]
    #: Fields that the transcript covers, in order (the response's signature comes after).
    _BODY: ClassVar[tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-able dict (str keys; bytes, str, int values) with a "type" tag."""
        out: dict[str, Any] = {"type": self.TYPE}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        if not isinstance(data, Mapping):
            raise _malformed(f"a {cls.TYPE} message must be a map")
        if data.get("type") != cls.TYPE:
            raise _malformed(f"expected a {cls.TYPE} message")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        keys = set(data) - {"type"}
        if keys != names:
            missing, extra = sorted(names - keys), sorted(map(str, keys - names))
            raise _malformed(f"{cls.TYPE}: missing fields {missing}, unknown fields {extra}")
        return cls(**{name: data[name] for name in names})

    def _transcript_part(self) -> bytes:
        return _enc_field(self.TYPE) + b"".join(_enc_field(getattr(self, name)) for name in self._BODY)


def _check_parties(epoch_id: int, initiator: str, responder: str) -> None:
    """The header every exchange message carries: an epoch and two different KMEs."""
    _check_epoch(epoch_id)
    _check_node("initiator", initiator)
    _check_node("responder", responder)
    if initiator == responder:
        raise _malformed("initiator and responder are the same node")


@dataclasses.dataclass(frozen=True, slots=True)
class PqcInit(_Message):
    """I -> R: the initiator's ephemeral public values, nonce and certificate."""

    TYPE: ClassVar[str] = "pqc-init"
    _BODY: ClassVar[tuple[str, ...]] = (
        "epoch_id", "initiator", "responder", "x25519_public", "mlkem_encapsulation_key", "nonce", "certificate_pem",
    )  # fmt: skip

    epoch_id: int
    initiator: str
    responder: str
    x25519_public: bytes
    mlkem_encapsulation_key: bytes = dataclasses.field(repr=False)
    nonce: bytes
    certificate_pem: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        _check_parties(self.epoch_id, self.initiator, self.responder)
        _check_field_bytes("x25519_public", self.x25519_public, size=X25519_KEY_BYTES)
        _check_field_bytes(
            "mlkem_encapsulation_key", self.mlkem_encapsulation_key, size=MLKEM768_ENCAPSULATION_KEY_BYTES
        )
        _check_field_bytes("nonce", self.nonce, size=NONCE_BYTES)
        _check_field_bytes("certificate_pem", self.certificate_pem, max_size=_MAX_CERT_PEM_BYTES)


@dataclasses.dataclass(frozen=True, slots=True)
class PqcResponse(_Message):
    """R -> I: the responder's public value, ML-KEM ciphertext, nonce, certificate and signature."""

    TYPE: ClassVar[str] = "pqc-response"
    _BODY: ClassVar[tuple[str, ...]] = (
        "epoch_id", "initiator", "responder", "x25519_public", "mlkem_ciphertext", "nonce", "certificate_pem",
    )  # fmt: skip

    epoch_id: int
    initiator: str
    responder: str
    x25519_public: bytes
    mlkem_ciphertext: bytes = dataclasses.field(repr=False)
    nonce: bytes
    certificate_pem: bytes = dataclasses.field(repr=False)
    signature: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        _check_parties(self.epoch_id, self.initiator, self.responder)
        _check_field_bytes("x25519_public", self.x25519_public, size=X25519_KEY_BYTES)
        _check_field_bytes("mlkem_ciphertext", self.mlkem_ciphertext, size=MLKEM768_CIPHERTEXT_BYTES)
        _check_field_bytes("nonce", self.nonce, size=NONCE_BYTES)
        _check_field_bytes("certificate_pem", self.certificate_pem, max_size=_MAX_CERT_PEM_BYTES)
        _check_field_bytes("signature", self.signature, max_size=_MAX_SIGNATURE_BYTES)


@dataclasses.dataclass(frozen=True, slots=True)
class PqcConfirm(_Message):
    """I -> R: the initiator's signature over the whole transcript."""

    TYPE: ClassVar[str] = "pqc-confirm"
    _BODY: ClassVar[tuple[str, ...]] = ("epoch_id", "initiator", "responder")

    epoch_id: int
    initiator: str
    responder: str
    signature: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        _check_parties(self.epoch_id, self.initiator, self.responder)
        _check_field_bytes("signature", self.signature, max_size=_MAX_SIGNATURE_BYTES)


PqcMessage = Union[PqcInit, PqcResponse, PqcConfirm]
_MESSAGE_TYPES: Final[Mapping[str, type[_Message]]] = {cls.TYPE: cls for cls in (PqcInit, PqcResponse, PqcConfirm)}


def message_from_dict(data: Mapping[str, Any]) -> PqcMessage:
    """Decode any of the three messages by its "type" tag; PqcProtocolError(MALFORMED) if invalid."""
    if not isinstance(data, Mapping):
        raise _malformed("a message must be a map")
    cls = _MESSAGE_TYPES.get(data.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise _malformed("unknown message type")
    return cls.from_dict(data)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------
# 2. The exchange: identities and certificate checks
# ---------------------------------------------------------------------------


def _kme_cn(node: str) -> str:
    return f"kme-{node}"


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else None


def _utc(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise HybridError("now must be an aware datetime (e.g. datetime.now(timezone.utc))")
    return now.astimezone(dt.timezone.utc)


@dataclasses.dataclass(frozen=True, slots=True)
class KmeIdentity:
    """A KME's credential: node name, certificate, private key (hidden from repr) and the run CA, PEM.

    Checked on construction (HybridError): the key is ECDSA P-256 and belongs to the
    certificate, the certificate's CN is ``kme-<node>`` and the CA issued it.
    """

    node: str
    certificate_pem: bytes = dataclasses.field(repr=False)
    private_key_pem: bytes = dataclasses.field(repr=False)
    ca_pem: bytes = dataclasses.field(repr=False)
    _key: ec.EllipticCurvePrivateKey = dataclasses.field(init=False, repr=False, compare=False)
    _ca: x509.Certificate = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or _NODE_RE.match(self.node) is None or len(self.node) > _NODE_MAX:
            raise HybridError("node is not a node name")
        try:
            cert = x509.load_pem_x509_certificate(self.certificate_pem)
            ca = x509.load_pem_x509_certificate(self.ca_pem)
        except (ValueError, TypeError):
            raise HybridError("certificate_pem and ca_pem must be PEM certificates") from None
        try:
            key = serialization.load_pem_private_key(self.private_key_pem, password=None)
        except (ValueError, TypeError):  # never echo the key material
            raise HybridError("private_key_pem is not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise HybridError("the KME key must be ECDSA P-256")
        if key.public_key() != cert.public_key():
            raise HybridError("the private key does not belong to the certificate")
        if _common_name(cert) != _kme_cn(self.node):
            raise HybridError(f"the certificate's CN is not {_kme_cn(self.node)!r}")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise HybridError("the certificate was not issued by the given CA") from None
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_ca", ca)

    def _sign(self, context: bytes, digest: bytes) -> bytes:
        return self._key.sign(context + digest, ec.ECDSA(hashes.SHA256()))

    def _check_peer(self, pem: bytes, peer: str, now: dt.datetime) -> ec.EllipticCurvePublicKey:
        """The peer's verified public key, or PqcAuthenticationFailed (RFC 5280 §6.1.3 (a), simplified)."""
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise _peer_error(PqcPeerFailure.BAD_CERTIFICATE, "the certificate is not PEM") from None
        try:
            cert.verify_directly_issued_by(self._ca)  # §6.1.3 (a)(1) signature, (a)(4) issuer name
        except (ValueError, TypeError, InvalidSignature):
            raise _peer_error(PqcPeerFailure.BAD_CERTIFICATE, "the certificate is not issued by the run CA") from None
        if not cert.not_valid_before_utc <= _utc(now) <= cert.not_valid_after_utc:  # (a)(2)
            raise _peer_error(PqcPeerFailure.BAD_CERTIFICATE, "the certificate is not valid now")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
            raise _peer_error(PqcPeerFailure.BAD_CERTIFICATE, "not a KME certificate (extensions)") from None
        # Only KME certificates carry serverAuth: an SAE's (client-only) certificate cannot pose as a KME.
        if is_ca or ExtendedKeyUsageOID.SERVER_AUTH not in eku:
            raise _peer_error(PqcPeerFailure.BAD_CERTIFICATE, "not a KME certificate")
        if _common_name(cert) != _kme_cn(peer):
            raise _peer_error(PqcPeerFailure.WRONG_IDENTITY, f"the certificate is not that of {_kme_cn(peer)!r}")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise _peer_error(PqcPeerFailure.BAD_CERTIFICATE, "the certificate key is not ECDSA P-256")
        return key


def _verify(key: ec.EllipticCurvePublicKey, signature: bytes, context: bytes, digest: bytes, who: str) -> None:
    try:
        key.verify(signature, context + digest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _peer_error(PqcPeerFailure.BAD_SIGNATURE, f"the {who}'s signature does not verify") from None


def _x25519(private: x25519.X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(public))
    except ValueError:  # RFC 7748 §6.1: the all-zero output of a low-order point
        raise _malformed("the X25519 public key is a low-order point") from None


# ---------------------------------------------------------------------------
# 2. The exchange: the result and the two ends
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PqcEpoch:
    """The secrets of one completed exchange with `peer` (identical at both KMEs)."""

    epoch_id: int
    peer: str
    mlkem_secret: bytes = dataclasses.field(repr=False)
    x25519_secret: bytes = dataclasses.field(repr=False)
    transcript_hash: bytes

    def derive_key(
        self, *, key_id: str, length_bytes: int, qkd_key: bytes | None = None, extra: tuple[bytes | str, ...] = ()
    ) -> bytes:
        """``hybrid_key`` (pqc without `qkd_key`, hybrid with it) in ``key_context(key_id, transcript_hash, extra)``."""
        return hybrid_key(
            qkd_key=qkd_key,
            mlkem_secret=self.mlkem_secret,
            x25519_secret=self.x25519_secret,
            context=key_context(key_id=key_id, transcript_hash=self.transcript_hash, extra=extra),
            length_bytes=length_bytes,
        )


class _InitiatorState(enum.Enum):
    IDLE = "idle"
    WAIT_RESPONSE = "wait-response"
    DONE = "done"
    FAILED = "failed"


class PqcInitiator:
    """The initiating KME of one exchange (one epoch): ``start()``, then ``receive_response()``."""

    __slots__ = ("_identity", "_init", "_mlkem", "_peer", "_state", "_x25519", "epoch_id")

    def __init__(self, *, identity: KmeIdentity, peer: str, epoch_id: int) -> None:
        if not isinstance(identity, KmeIdentity):
            raise HybridError("identity must be a KmeIdentity")
        if not isinstance(peer, str) or _NODE_RE.match(peer) is None or len(peer) > _NODE_MAX:
            raise HybridError("peer is not a node name")
        if peer == identity.node:
            raise HybridError("a KME does not exchange keys with itself")
        if isinstance(epoch_id, bool) or not isinstance(epoch_id, int) or not 0 <= epoch_id < _EPOCH_LIMIT:
            raise HybridError("epoch_id must be an int in 0..2^64-1")
        self._identity = identity
        self._peer = peer
        self.epoch_id = epoch_id
        self._state = _InitiatorState.IDLE
        self._mlkem: mlkem.MLKEM768PrivateKey | None = None
        self._x25519: x25519.X25519PrivateKey | None = None
        self._init: PqcInit | None = None

    def __repr__(self) -> str:
        return (
            f"<PqcInitiator {self._identity.node} -> {self._peer} epoch={self.epoch_id} state={self._state.value}>"
        )

    @property
    def peer(self) -> str:
        return self._peer

    def start(self) -> PqcInit:
        """Make the ephemeral keys and the first message."""
        if self._state is not _InitiatorState.IDLE:
            raise HybridError(f"start() was called already (state {self._state.value})")
        self._mlkem = mlkem.MLKEM768PrivateKey.generate()  # FIPS 203 ML-KEM.KeyGen (§7.1), OS randomness
        self._x25519 = x25519.X25519PrivateKey.generate()
        self._init = PqcInit(
            epoch_id=self.epoch_id,
            initiator=self._identity.node,
            responder=self._peer,
            x25519_public=self._x25519.public_key().public_bytes_raw(),
            mlkem_encapsulation_key=self._mlkem.public_key().public_bytes_raw(),
            nonce=os.urandom(NONCE_BYTES),
            certificate_pem=self._identity.certificate_pem,
        )
        self._state = _InitiatorState.WAIT_RESPONSE
        return self._init

    def receive_response(self, msg: PqcResponse, *, now: dt.datetime) -> tuple[PqcConfirm, PqcEpoch]:
        """Check the response; on success the confirmation to send and the epoch's secrets.

        Any failure ends the exchange (PqcProtocolError / PqcAuthenticationFailed).
        """
        if self._state is _InitiatorState.IDLE:
            raise HybridError("receive_response() before start()")
        if not isinstance(msg, PqcResponse):
            raise HybridError("msg must be a PqcResponse (decode with message_from_dict)")
        if self._state is not _InitiatorState.WAIT_RESPONSE:
            raise _peer_error(PqcPeerFailure.UNEXPECTED, f"no response expected (state {self._state.value})")
        try:
            return self._complete(msg, now)
        except PqcProtocolError:
            self._fail()
            raise

    def _fail(self) -> None:
        self._state = _InitiatorState.FAILED
        self._mlkem = self._x25519 = None

    def _complete(self, msg: PqcResponse, now: dt.datetime) -> tuple[PqcConfirm, PqcEpoch]:
        assert self._init is not None and self._mlkem is not None and self._x25519 is not None
        if msg.epoch_id < self.epoch_id:
            raise _peer_error(PqcPeerFailure.REPLAYED, f"response for old epoch {msg.epoch_id}")
        if msg.epoch_id != self.epoch_id:
            raise _peer_error(PqcPeerFailure.UNEXPECTED, f"response for epoch {msg.epoch_id}, not {self.epoch_id}")
        if msg.initiator != self._identity.node or msg.responder != self._peer:
            raise _peer_error(PqcPeerFailure.WRONG_IDENTITY, "the response names other nodes")
        peer_key = self._identity._check_peer(msg.certificate_pem, self._peer, now)  # noqa: SLF001
        h = hashlib.sha256(_DOMAIN)
        h.update(self._init._transcript_part())  # noqa: SLF001
        h.update(msg._transcript_part())  # noqa: SLF001
        _verify(peer_key, msg.signature, _SIG_CONTEXT_RESPONDER, h.copy().digest(), "responder")
        try:
            mlkem_secret = self._mlkem.decapsulate(msg.mlkem_ciphertext)  # FIPS 203 ML-KEM.Decaps (§7.3)
        except ValueError:
            raise _malformed("the ML-KEM ciphertext is invalid") from None
        x25519_secret = _x25519(self._x25519, msg.x25519_public)
        h.update(_enc_field(msg.signature))
        transcript_hash = h.digest()
        confirm = PqcConfirm(
            epoch_id=self.epoch_id,
            initiator=self._identity.node,
            responder=self._peer,
            signature=self._identity._sign(_SIG_CONTEXT_INITIATOR, transcript_hash),  # noqa: SLF001
        )
        self._state = _InitiatorState.DONE
        self._mlkem = self._x25519 = None  # forward secrecy: the ephemeral keys are not kept
        return confirm, PqcEpoch(self.epoch_id, self._peer, mlkem_secret, x25519_secret, transcript_hash)


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    epoch_id: int
    peer_key: ec.EllipticCurvePublicKey = dataclasses.field(repr=False)
    transcript_hash: bytes
    mlkem_secret: bytes = dataclasses.field(repr=False)
    x25519_secret: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class PqcResponderStatistics:
    """Counts only: completed exchanges, pending ones, and rejected messages by reason."""

    completed: int
    pending: int
    rejected: Mapping[str, int]


class PqcResponder:
    """The responding side of a KME, for all its peers: ``receive_init()``, then ``receive_confirm()``.

    `peers` restricts who may initiate (None: any node with a KME certificate of the run
    CA); `last_epochs` restores the last completed epoch per peer (replay protection).
    """

    __slots__ = ("_completed", "_identity", "_last", "_peers", "_pending", "_rejected")

    def __init__(
        self,
        *,
        identity: KmeIdentity,
        peers: Collection[str] | None = None,
        last_epochs: Mapping[str, int] | None = None,
    ) -> None:
        if not isinstance(identity, KmeIdentity):
            raise HybridError("identity must be a KmeIdentity")
        self._identity = identity
        self._peers = None if peers is None else frozenset(peers)
        self._last: dict[str, int] = dict(last_epochs or {})
        self._pending: dict[str, _Pending] = {}
        self._completed = 0
        self._rejected: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<PqcResponder {self._identity.node} completed={self._completed} pending={len(self._pending)}>"

    def last_epoch_id(self, peer: str) -> int | None:
        """The last completed epoch with `peer` (None if none)."""
        return self._last.get(peer)

    def statistics(self) -> PqcResponderStatistics:
        return PqcResponderStatistics(self._completed, len(self._pending), dict(self._rejected))

    def _reject(self, exc: PqcProtocolError) -> PqcProtocolError:
        self._rejected[exc.reason.value] = self._rejected.get(exc.reason.value, 0) + 1
        return exc

    def receive_init(self, msg: PqcInit, *, now: dt.datetime) -> PqcResponse:
        """Check an init and answer it; the exchange is pending until its confirmation."""
        if not isinstance(msg, PqcInit):
            raise HybridError("msg must be a PqcInit (decode with message_from_dict)")
        try:
            return self._respond(msg, now)
        except PqcProtocolError as exc:
            raise self._reject(exc) from None

    def _respond(self, msg: PqcInit, now: dt.datetime) -> PqcResponse:
        me, peer = self._identity.node, msg.initiator
        if msg.responder != me or (self._peers is not None and peer not in self._peers):
            raise _peer_error(PqcPeerFailure.WRONG_IDENTITY, f"init from {peer!r} to {msg.responder!r} refused")
        last = self._last.get(peer)
        if last is not None and msg.epoch_id <= last:
            raise _peer_error(PqcPeerFailure.REPLAYED, f"epoch {msg.epoch_id} <= last completed {last}")
        peer_key = self._identity._check_peer(msg.certificate_pem, peer, now)  # noqa: SLF001
        try:
            ek = mlkem.MLKEM768PublicKey.from_public_bytes(msg.mlkem_encapsulation_key)  # FIPS 203 §7.2 input check
        except ValueError:
            raise _malformed("the ML-KEM encapsulation key is invalid") from None
        mlkem_secret, ciphertext = ek.encapsulate()  # FIPS 203 ML-KEM.Encaps (§7.2), OS randomness
        own = x25519.X25519PrivateKey.generate()
        x25519_secret = _x25519(own, msg.x25519_public)
        body = PqcResponse(
            epoch_id=msg.epoch_id,
            initiator=peer,
            responder=me,
            x25519_public=own.public_key().public_bytes_raw(),
            mlkem_ciphertext=ciphertext,
            nonce=os.urandom(NONCE_BYTES),
            certificate_pem=self._identity.certificate_pem,
            signature=b"\x00",  # set below: the signature covers the transcript, not itself
        )
        h = hashlib.sha256(_DOMAIN)
        h.update(msg._transcript_part())  # noqa: SLF001
        h.update(body._transcript_part())  # noqa: SLF001
        signature = self._identity._sign(_SIG_CONTEXT_RESPONDER, h.copy().digest())  # noqa: SLF001
        h.update(_enc_field(signature))
        self._pending[peer] = _Pending(msg.epoch_id, peer_key, h.digest(), mlkem_secret, x25519_secret)
        return dataclasses.replace(body, signature=signature)

    def receive_confirm(self, msg: PqcConfirm) -> PqcEpoch:
        """Check the initiator's signature; on success the epoch's secrets (and the epoch is completed)."""
        if not isinstance(msg, PqcConfirm):
            raise HybridError("msg must be a PqcConfirm (decode with message_from_dict)")
        try:
            return self._confirm(msg)
        except PqcProtocolError as exc:
            raise self._reject(exc) from None

    def _confirm(self, msg: PqcConfirm) -> PqcEpoch:
        peer = msg.initiator
        if msg.responder != self._identity.node:
            raise _peer_error(PqcPeerFailure.WRONG_IDENTITY, f"confirmation addressed to {msg.responder!r}")
        last = self._last.get(peer)
        if last is not None and msg.epoch_id <= last:
            raise _peer_error(PqcPeerFailure.REPLAYED, f"epoch {msg.epoch_id} <= last completed {last}")
        pending = self._pending.get(peer)
        if pending is None or pending.epoch_id != msg.epoch_id:
            raise _peer_error(PqcPeerFailure.UNEXPECTED, f"no pending exchange with {peer!r} in epoch {msg.epoch_id}")
        _verify(pending.peer_key, msg.signature, _SIG_CONTEXT_INITIATOR, pending.transcript_hash, "initiator")
        del self._pending[peer]
        self._last[peer] = msg.epoch_id
        self._completed += 1
        return PqcEpoch(msg.epoch_id, peer, pending.mlkem_secret, pending.x25519_secret, pending.transcript_hash)
