"""Error codes and exceptions of the qnetem wire protocol (docs/protocol.md §5).

The set of error codes is closed: a peer can only ever receive one of `ErrorCode`.
Exceptions say whose fault a problem is, in the manner of h11:

* `RemoteProtocolError` — the peer sent something illegal (bad frame, unknown type,
  wrong field). The receiver answers with an `error` frame carrying `code`.
* `LocalProtocolError` — our own caller misused the API (encoding an invalid message).

Messages of these exceptions name the problem (field, type, size) and never carry
payload bytes, so a secret can never leak through an error.
"""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "WireError", "RemoteProtocolError", "LocalProtocolError"]


class ErrorCode(enum.StrEnum):
    """Closed set of error codes carried by `error` frames (docs/protocol.md §5)."""

    BAD_FRAME = "bad_frame"  # not a msgpack map, truncated, or over a decoder limit
    FRAME_TOO_LARGE = "frame_too_large"  # length prefix above the frame limit; connection closes
    UNKNOWN_TYPE = "unknown_type"  # "t" names no message of this version
    BAD_FIELD = "bad_field"  # missing, extra or ill-typed field
    UNSUPPORTED_VERSION = "unsupported_version"  # no common protocol version
    UNAUTHORIZED = "unauthorized"  # wrong token; connection closes
    NOT_REGISTERED = "not_registered"  # request before a successful hello
    ALREADY_REGISTERED = "already_registered"  # a second hello, or a node name already in use
    UNKNOWN_NODE = "unknown_node"  # names a node that is not in the scenario
    NO_LINK = "no_link"  # no quantum/classical link to that peer
    NO_RESOURCE = "no_resource"  # memory full, register limit, too many requests
    UNKNOWN_QUBIT = "unknown_qubit"  # qubit id does not exist
    NOT_OWNER = "not_owner"  # qubit exists but belongs to another node (or is in flight)
    UNKNOWN_GATE = "unknown_gate"  # gate name not in the closed gate set
    REFUSED = "refused"  # the peer did not consent (e.g. no epr_listen)
    UNKNOWN_APP = "unknown_app"  # control API: app kind or name unknown
    TIMEOUT = "timeout"
    INTERNAL = "internal"  # a bug on the answering side; the session survives


class WireError(Exception):
    """Base of every wire-protocol exception; carries the `ErrorCode` to send back."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class RemoteProtocolError(WireError):
    """The peer sent something that violates the protocol."""


class LocalProtocolError(WireError):
    """Our caller tried to send something that violates the protocol."""
