"""Request records, validation and error texts of key delivery (ETSI GS QKD 014 semantics).

Theory of operation
-------------------
An SAE's ``enc_keys`` (master side) or ``dec_keys`` (slave side) call becomes a request
record here; ``nodes.kms.kme`` moves it through the states below and reports exactly
one result per request. Requests of one SAE pair complete in arrival order: each pair
has a FIFO queue, a request may start (take its keys, send its assignment) while an
older one still waits for its confirmation, but results leave the queue from the head
only.

Enc request states::

    WAITING    no keys taken yet: waits for stock / a PQC epoch (bounded by the pair's wait_s)
    ASSIGNING  keys taken (ASSIGNED in the store at this KME), assignment sent to the
               slave side KME(s); waits for their acks (bounded by assign_timeout_s)
    ACKED      every ack arrived; committed (delivered to the master) when at the head
    DONE / FAILED  result ready; leaves the queue from the head

Dec request states: WAITING (some key not assigned here yet; bounded by
assign_timeout_s), DONE, FAILED.

Validation (ETSI GS QKD 014 V1.1.1 §5.2, §6.2): the caller must be an SAE of this KME
(else 401); the slave and additional slaves must be known SAEs (400 naming them);
``number`` <= max_keys_per_request; ``size`` a multiple of 8 (the spec's text "size
shall be a multiple of 8") within [min_key_size, max_key_size]; at most
max_SAE_ID_count additional slaves.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import uuid
from collections.abc import Mapping
from typing import Any, Final

from .errors import KmsError

__all__ = [
    "MSG_NOT_AVAILABLE",
    "MSG_TOO_MANY_KEYS",
    "DecRequest",
    "EncRequest",
    "PlannedKey",
    "ReqState",
    "assign_aad",
    "bad_request",
    "context_extra",
    "key_not_found",
    "unauthorized",
    "unavailable",
    "validate_dec",
    "validate_enc",
]

MSG_TOO_MANY_KEYS: Final = "Number of requested keys exceed allowed max keys per request"  # ETSI 014 §6.2
MSG_SIZE_NOT_MULTIPLE_OF_8: Final = "size shall be a multiple of 8"  # ETSI 014 §6.2
MSG_NOT_AVAILABLE: Final = "keys are not available"
MSG_KEYS_NOT_FOUND: Final = "one or more keys specified are not found on KME"  # ETSI 014 §6.4


class ReqState(enum.Enum):
    WAITING = "waiting"
    ASSIGNING = "assigning"
    ACKED = "acked"
    DONE = "done"
    FAILED = "failed"


def bad_request(message: str, **details: Any) -> KmsError:
    return KmsError(400, message, (details,) if details else None)


def unauthorized(message: str, **details: Any) -> KmsError:
    return KmsError(401, message, (details,) if details else None)


def unavailable(message: str, **details: Any) -> KmsError:
    return KmsError(503, message, (details,) if details else None)


def key_not_found(key_id: str) -> KmsError:
    return KmsError(400, f"key_ID {key_id} not found", ({"key_ID": key_id, "message": MSG_KEYS_NOT_FOUND},))


@dataclasses.dataclass(slots=True, eq=False)
class PlannedKey:
    """One key of an enc request between taking its material and the commit (bytes hidden)."""

    key_id: str  # the id the SAEs see
    base_id: str  # the first component's id (or key_id): withdrawals name it
    parts: tuple[str, ...]  # KME-pair keys it is made of (empty for pqc / local keys)
    origin: str
    stored: bool  # key_id is a row of this store already (qkd single, pqc, local)
    wraps: dict[str, tuple[str, ...]]  # per other slave KME: the pair keys wrapping it
    key: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(slots=True, eq=False)
class EncRequest:
    req: int
    master: str
    slave: str
    slaves: tuple[str, ...]  # slave first, then the additional slaves
    r_kme: str  # the slave's KME (may be this KME)
    local_parties: tuple[str, ...]  # SAEs fetching this KME's copy: master + slaves here
    q_kmes: tuple[str, ...]  # other KMEs of additional slaves (get the key by wrap)
    number: int
    size_bits: int
    on_empty: str
    wait_s: float
    mode: str  # "local" | "qkd" | "pqc" | "hybrid" (pqc after a fallback)
    arrival_s: float
    state: ReqState = ReqState.WAITING
    rid: str = ""
    fallback: bool = False
    epoch_id: int | None = None
    keys: list[PlannedKey] = dataclasses.field(default_factory=list)
    local_ids: list[str] = dataclasses.field(default_factory=list)  # rows held here for it
    withdraw_to: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    mac_ids: tuple[str, ...] = ()  # pair keys spent on the assignment's one-time MAC
    mac_key: bytes = dataclasses.field(default=b"", repr=False)
    acks: set[str] = dataclasses.field(default_factory=set)
    assign_deadline_s: float = math.inf
    result: Any = None  # RequestDone | RequestFailed

    @property
    def deadline_s(self) -> float:
        return self.arrival_s + self.wait_s


@dataclasses.dataclass(slots=True, eq=False)
class DecRequest:
    req: int
    caller: str
    master: str
    key_ids: tuple[str, ...]
    deadline_s: float
    state: ReqState = ReqState.WAITING
    result: Any = None


def validate_enc(
    *,
    node: str,
    saes: Mapping[str, str],
    caller: str,
    slave: str,
    number: int,
    size_bits: int | None,
    additional: tuple[str, ...],
    default_size_bits: int,
    min_size_bits: int,
    max_size_bits: int,
    max_keys: int,
    max_sae_ids: int,
) -> tuple[int, tuple[str, ...]]:
    """(size_bits, slaves) of a valid enc request, else KmsError (400/401)."""
    if saes.get(caller) != node:
        raise unauthorized(f"SAE {caller!r} is not attached to KME {node!r}", master_SAE_ID=caller)
    if slave not in saes:
        raise bad_request(f"slave SAE {slave!r} is unknown", slave_SAE_ID=slave)
    if slave == caller:
        raise bad_request(f"slave SAE {slave!r} is the master SAE itself", slave_SAE_ID=slave)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise bad_request("number must be a positive integer", number=str(number))
    if number > max_keys:
        raise bad_request(MSG_TOO_MANY_KEYS, number=number, max_key_per_request=max_keys)
    size = default_size_bits if size_bits is None else size_bits
    if isinstance(size, bool) or not isinstance(size, int):
        raise bad_request("size must be an integer")
    if size % 8:
        raise bad_request(MSG_SIZE_NOT_MULTIPLE_OF_8, size=size)
    if not min_size_bits <= size <= max_size_bits:
        raise bad_request(
            f"requested key size {size} is not within {min_size_bits}..{max_size_bits} bits",
            size=size,
            min_key_size=min_size_bits,
            max_key_size=max_size_bits,
        )
    if len(additional) > max_sae_ids:
        raise bad_request(
            f"{len(additional)} additional slave SAE IDs exceed max_SAE_ID_count {max_sae_ids}",
            max_SAE_ID_count=max_sae_ids,
        )
    seen = {caller, slave}
    for extra in additional:
        if not isinstance(extra, str) or extra not in saes:
            raise bad_request(f"additional slave SAE {extra!r} is unknown", additional_slave_SAE_ID=str(extra))
        if extra in seen:
            raise bad_request(f"additional slave SAE {extra!r} is named twice or is the master/slave SAE")
        seen.add(extra)
    return size, (slave, *additional)


def validate_dec(
    *, node: str, saes: Mapping[str, str], caller: str, master: str, key_ids: tuple[str, ...], max_keys: int
) -> tuple[str, ...]:
    """The canonical key ids of a valid dec request, else KmsError (400/401)."""
    if saes.get(caller) != node:
        raise unauthorized(f"SAE {caller!r} is not attached to KME {node!r}", slave_SAE_ID=caller)
    if master not in saes:
        raise bad_request(f"master SAE {master!r} is unknown", master_SAE_ID=master)
    if not key_ids:
        raise bad_request("no key_ID given")
    if len(key_ids) > max_keys:
        raise bad_request(MSG_TOO_MANY_KEYS, number=len(key_ids), max_key_per_request=max_keys)
    out: list[str] = []
    for kid in key_ids:
        try:
            canonical = str(uuid.UUID(kid)) if isinstance(kid, str) and len(kid) <= 64 else None
        except ValueError:
            canonical = None
        if canonical is None:
            raise key_not_found(str(kid)[:64])
        if canonical in out:
            raise bad_request(f"key_ID {canonical} is named twice", key_ID=canonical)
        out.append(canonical)
    return tuple(out)


def assign_aad(
    src: str, dst: str, rid: str, master: str, slaves: tuple[str, ...], policy: str, size_bits: int,
    epoch_id: int | None, keys: list[tuple[str, tuple[str, ...]]], mac_ids: tuple[str, ...],
) -> tuple[str | int | None, ...]:  # fmt: skip
    """Every field of an assignment the slave side acts on, in a fixed order (for its MAC)."""
    fields: list[str | int | None] = [src, dst, rid, master, policy, size_bits, epoch_id, len(slaves), *slaves]
    fields.append(len(keys))
    for key_id, parts in keys:
        fields += [key_id, len(parts), *parts]
    fields += [len(mac_ids), *mac_ids]
    return tuple(fields)


def context_extra(policy: str, size_bits: int, master: str, slaves: tuple[str, ...]) -> tuple[str, ...]:
    """What the CatKDF context binds besides key id and transcript hash (both KMEs build the same)."""
    return (policy, str(size_bits), master, str(len(slaves)), *slaves)
