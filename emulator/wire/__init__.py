"""qnetem wire protocol: framing, the closed set of message types and error codes (no I/O).

docs/protocol.md is the normative specification; this package implements it.
Typical use in a sans-IO core::

    decoder = FrameDecoder()
    decoder.feed(data)
    while (payload := decoder.next_frame()) is not None:
        env = decode(payload)          # Envelope(message, id, re) or RemoteProtocolError
    out = encode_framed(Pong(now_s=1.0), re=env.id)
"""

from ._codec import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Address,
    Envelope,
    F64Array,
    I64Array,
    Limits,
    Message,
    Struct,
    U8Array,
    U64Array,
    decode,
    encode,
    encode_datagram,
    encode_framed,
    message_types,
)
from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError, WireError
from ._framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame
from ._messages import (
    AdminHello,
    AdminWelcome,
    Alloc,
    Allocated,
    AppMsg,
    AppStart,
    AppStatus,
    AppStatusRequest,
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
    FibreCut,
    Free,
    Gate,
    GateOp,
    GetStats,
    Hello,
    LinkFault,
    LinkHello,
    LinkInfo,
    LinkWelcome,
    KmsMsg,
    KmsStart,
    KmsStarted,
    Measure,
    Measured,
    NodeStatus,
    Ok,
    PeerDown,
    PeerUp,
    Ping,
    Pong,
    Probe,
    ProbeAck,
    QkdDetections,
    QkdEmitted,
    QkdEve,
    QkdLinkInfo,
    QkdListen,
    QkdStart,
    QkdStop,
    QkdStopped,
    SendQubit,
    Shutdown,
    Stats,
    Status,
    StatusReply,
    QubitTransfer,
    Unitary,
    Welcome,
)

# The closed gate set of `gate`/`circuit` (docs/protocol.md §4.3): name -> (qubits, params).
GATE_ARITY: dict[str, tuple[int, int]] = {
    "i": (1, 0), "x": (1, 0), "y": (1, 0), "z": (1, 0), "h": (1, 0),
    "s": (1, 0), "sdg": (1, 0), "t": (1, 0),
    "rx": (1, 1), "ry": (1, 1), "rz": (1, 1),
    "cnot": (2, 0), "cz": (2, 0), "swap": (2, 0),
}  # fmt: skip

__all__ = [
    "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "DEFAULT_MAX_FRAME_BYTES", "GATE_ARITY",
    "Address", "Envelope", "F64Array", "I64Array", "U8Array", "U64Array", "Limits", "Message", "Struct",
    "decode", "encode", "encode_datagram", "encode_framed", "encode_frame", "message_types",
    "FrameDecoder", "ErrorCode", "WireError", "LocalProtocolError", "RemoteProtocolError",
    "AdminHello", "AdminWelcome", "Alloc", "Allocated", "AppMsg", "AppStart", "AppStatus",
    "AppStatusRequest", "Bye", "Circuit", "Clock", "EprAccepted", "EprCancel", "EprDelivered",
    "EprDone", "EprListen", "EprRequest", "Error", "FibreCut", "Free", "Gate", "GateOp", "GetStats", "Hello",
    "KmsMsg", "KmsStart", "KmsStarted", "LinkFault", "LinkHello", "LinkInfo", "LinkWelcome", "Measure", "Measured", "NodeStatus", "Ok", "PeerDown",
    "PeerUp", "Ping", "Pong", "Probe", "ProbeAck", "QkdDetections", "QkdEmitted", "QkdEve", "QkdLinkInfo",
    "QkdListen", "QkdStart", "QkdStop", "QkdStopped", "SendQubit", "Shutdown", "Stats", "Status",
    "StatusReply", "QubitTransfer", "Unitary", "Welcome",
]  # fmt: skip
