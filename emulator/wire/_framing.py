"""Length-prefixed framing for stream transports (docs/protocol.md §2).

A frame is a 4-byte big-endian unsigned length followed by that many bytes of payload
(one msgpack map). `FrameDecoder` is sans-IO: feed it whatever bytes the socket gave,
then pull complete payloads. A length above the limit raises `RemoteProtocolError`
with code `frame_too_large` before any payload is buffered, so a hostile peer cannot
make the receiver allocate the announced size.
"""

from __future__ import annotations

import struct

from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "HEADER_BYTES", "FrameDecoder", "encode_frame"]

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024  # DESIGN §4
HEADER_BYTES = 4
_HEADER = struct.Struct(">I")
_MAX_ENCODABLE = (1 << 32) - 1  # what a 4-byte length can say


def encode_frame(payload: bytes, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Prefix `payload` with its length; refuse payloads the peer would reject."""
    limit = min(max_frame_bytes, _MAX_ENCODABLE)
    if len(payload) > limit:
        raise LocalProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {len(payload)} bytes exceeds the limit of {limit}",
        )
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Reassembles frames from a byte stream.

    After a `frame_too_large` error the decoder is poisoned: the stream position is
    lost, so the only safe continuation is to close the connection. A poisoned decoder
    drops its buffer and whatever is fed to it afterwards, and every `next_frame` raises.
    """

    __slots__ = ("_buffer", "_max_frame_bytes", "_poisoned")

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_frame_bytes = max_frame_bytes
        self._poisoned = False

    def feed(self, data: bytes) -> None:
        if not self._poisoned:  # a poisoned stream is never read again: do not hoard it
            self._buffer += data

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or None if more bytes are needed."""
        if self._poisoned:
            raise RemoteProtocolError(ErrorCode.BAD_FRAME, "stream is unusable after a framing error")
        if len(self._buffer) < HEADER_BYTES:
            return None
        (length,) = _HEADER.unpack_from(self._buffer, 0)
        if length > self._max_frame_bytes:
            self._poisoned = True
            self._buffer.clear()
            raise RemoteProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame of {length} bytes exceeds the limit of {self._max_frame_bytes}",
            )
        end = HEADER_BYTES + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER_BYTES:end])
        del self._buffer[:end]
        return payload
