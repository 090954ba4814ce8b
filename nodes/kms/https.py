"""HTTPS with mutual TLS for the KME's key delivery APIs: a thin trio shell around hypercorn.

Theory of operation
-------------------
`serve_https(app, tls=...)` binds one TCP socket (127.0.0.1, port 0 by default), reports
the bound port through `task_status.started(port)`, and serves the ASGI `app` (ETSI GS
QKD 014 or SKIP) over HTTP/1.1 or HTTP/2 inside TLS >= 1.2 with a client certificate
required and verified against the run CA (ETSI GS QKD 014 §5.1: HTTPS, TLS 1.2 or
higher, mutual authentication of SAE and KME). HTTP itself is hypercorn's (its trio `TCPServer` and h11/h2 protocol
machinery); nothing here parses HTTP.

Why not `hypercorn.trio.serve`: it builds its listeners and TLS context from a `Config`
(certificate *files*) and hands the application no information about the peer's
certificate (hypercorn 0.18 fills no TLS extension in the scope). The KME needs the
caller's identity from the verified certificate, so this shell runs the accept loop
itself, one task per connection:

1. TLS handshake with `server_ssl_context(tls)` under a timeout. A client without a
   certificate, or with one the CA did not sign, fails here; the failure is logged (peer
   address and OpenSSL reason) and only that connection is dropped, the server goes on;
2. the verified leaf certificate is put into the ASGI TLS extension
   (`scope["extensions"]["tls"]`, asgiref "TLS" extension: `client_cert_chain` as PEM,
   `client_cert_name` as an RFC 4514 string, `client_cert_error` None, `tls_version`)
   of every request on that connection, where `tls_identity` reads the subject CN;
3. hypercorn's `TCPServer` serves HTTP on the established TLS stream (its own
   `do_handshake` call then returns at once). No access log is written; errors go to
   this module's logger; request and response bodies are never logged.

Key material for TLS: Python's `ssl` loads certificate chains only from files. The PEM
(certificate + private key) is written to an anonymous in-memory file (`memfd_create`,
Linux) and loaded through /proc/self/fd; where that is unavailable, to a file in a
fresh private directory (0700, file 0600) that is removed right after loading.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from starlette.types import ASGIApp, Receive, Scope, Send

from nodes.kms.etsi014 import tls_identity

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "ServerTls",
    "client_ssl_context",
    "serve_https",
    "server_ssl_context",
    "tls_identity",
]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S: Final = 10.0  # a peer that stalls the handshake longer is dropped
_BACKLOG: Final = 128
# TLS 1.2 suites: forward-secret AEAD only (TLS 1.3 suites are all AEAD already).
_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"
_ALPN: Final = ["h2", "http/1.1"]
_TLS_VERSION_CODES: Final = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}  # RFC 8446 §4.2.1


PemData = bytes | str


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The server's certificate chain and private key, and the CA that signs client certs (PEM)."""

    cert_pem: PemData
    key_pem: PemData = field(repr=False)
    ca_pem: PemData


def _as_bytes(pem: PemData) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else bytes(pem)


def _load_cert_chain(context: ssl.SSLContext, cert_pem: PemData, key_pem: PemData) -> None:
    """`context.load_cert_chain` from memory (see module docstring)."""
    chain = bytearray(_as_bytes(cert_pem).rstrip(b"\n") + b"\n" + _as_bytes(key_pem))
    try:
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is not None:
            fd = memfd_create("qnetem-tls", os.MFD_CLOEXEC)
            try:
                view = memoryview(chain)
                while view:
                    view = view[os.write(fd, view) :]
                path = f"/proc/self/fd/{fd}"
                if os.path.exists(path):
                    context.load_cert_chain(path)
                    return
            finally:
                os.close(fd)  # the last reference: the anonymous file is gone
        with tempfile.TemporaryDirectory(prefix="qnetem-tls-") as private_dir:  # mkdtemp: mode 0700
            path = os.path.join(private_dir, "chain.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(chain)
            context.load_cert_chain(path)
    finally:
        chain[:] = bytes(len(chain))  # best effort: do not leave the private key in this buffer


def server_ssl_context(tls: ServerTls) -> ssl.SSLContext:
    """Server side: TLS >= 1.2, client certificate required and verified against `tls.ca_pem`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_COMPRESSION  # RFC 7540 §9.2.1
    context.set_ciphers(_TLS12_CIPHERS)
    context.set_alpn_protocols(_ALPN)
    context.load_verify_locations(cadata=_as_bytes(tls.ca_pem).decode("ascii"))
    _load_cert_chain(context, tls.cert_pem, tls.key_pem)
    return context


def client_ssl_context(cert_pem: PemData | None, key_pem: PemData | None, ca_pem: PemData) -> ssl.SSLContext:
    """Client side: TLS >= 1.2, server verified against `ca_pem` (hostname checked).

    `cert_pem`/`key_pem` are the client's certificate and key; None for both makes a
    client without a certificate (which a KME refuses in the handshake).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=_as_bytes(ca_pem).decode("ascii"))
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("give both cert_pem and key_pem, or neither")
    if cert_pem is not None and key_pem is not None:
        _load_cert_chain(context, cert_pem, key_pem)
    return context


def _tls_extension(stream: trio.SSLStream[trio.SocketStream], server_cert_pem: str) -> dict[str, Any]:
    """The asgiref TLS extension for a connection whose handshake has completed."""
    der = stream.getpeercert(binary_form=True)
    chain: list[str] = []
    name = None
    if der:
        cert = x509.load_der_x509_certificate(der)
        chain = [cert.public_bytes(Encoding.PEM).decode("ascii")]
        name = cert.subject.rfc4514_string()
    return {
        "server_cert": server_cert_pem,
        "client_cert_chain": chain,  # leaf only: Python 3.11 exposes no verified chain
        "client_cert_name": name,
        "client_cert_error": None,  # CERT_REQUIRED: an unverified client never gets here
        "tls_version": _TLS_VERSION_CODES.get(stream.version() or ""),
        "cipher_suite": None,  # the ssl module does not expose the IANA suite number
    }


class _WithTls:
    """ASGI wrapper adding one connection's TLS extension to each http/websocket scope."""

    def __init__(self, app: ASGIApp, tls: Mapping[str, Any]) -> None:
        self._app = app
        self._tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": dict(self._tls)}}
        await self._app(scope, receive, send)


def _hypercorn_config() -> Config:
    config = Config()
    config.accesslog = None  # no per-request log lines
    config.errorlog = log  # a Logger instance is used as is (hypercorn.logging._create_logger)
    config.include_server_header = False
    return config


async def _open_listener(host: str, port: int) -> trio.SocketListener:
    family, socktype, proto, _, address = (
        await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE)
    )[0]
    sock = trio.socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind(address)
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _send_pending_alert(stream: trio.SSLStream[trio.SocketStream], tcp_stream: trio.SocketStream) -> None:
    """Send the fatal alert OpenSSL queued when the handshake failed (RFC 8446 §6.2 SHOULD).

    trio's SSLStream drops the bytes still in its outgoing memory BIO when the handshake
    raises; without them the client sees a bare EOF instead of "certificate required" or
    "unknown CA". Reading that BIO relies on a trio internal (`_outgoing`), so this is best
    effort: if it is absent the connection is just closed.
    """
    outgoing = getattr(stream, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO):
        return
    alert = outgoing.read()
    if not alert:
        return
    with trio.move_on_after(1.0):
        try:
            await tcp_stream.send_all(alert)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


async def serve_https(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ServerTls,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` over mutual-TLS HTTPS until cancelled; `task_status.started(bound_port)`."""
    ssl_context = server_ssl_context(tls)
    config = _hypercorn_config()
    worker_context = WorkerContext(None)
    server_cert_pem = _as_bytes(tls.cert_pem).decode("ascii")
    listener = await _open_listener(host, port)
    bound_port = int(listener.socket.getsockname()[1])

    async def serve_connection(tcp_stream: trio.SocketStream) -> None:
        peer = _peer_name(tcp_stream)
        stream = trio.SSLStream(tcp_stream, ssl_context, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            reason = getattr(exc.__cause__, "reason", None) or type(exc).__name__
            log.info("TLS handshake with %s failed: %s", peer, reason)
            await _send_pending_alert(stream, tcp_stream)
            await trio.aclose_forcefully(stream)
            return
        try:
            app_with_tls = _WithTls(app, _tls_extension(stream, server_cert_pem))
            await TCPServer(ASGIWrapper(app_with_tls), config, worker_context, ConnectionState({}), stream).run()
        except Exception:
            # One broken connection must not take the server down with it.
            log.exception("connection with %s failed", peer)
            await trio.aclose_forcefully(stream)

    async with listener, trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, serve_connection, [listener])
        log.info("serving HTTPS (mutual TLS) on %s:%d", host, bound_port)
        task_status.started(bound_port)
