"""qkd: run one QKD link's post-processing, end to end, and report its metrics.

Theory of operation
-------------------
Two instances run, an *initiator* on the link's transmitter (Alice) and a *responder*
on its receiver (Bob). Each owns one end of the link session (nodes/qkd/session.py:
sifting -> estimation -> Cascade -> verification -> privacy amplification, every message
authenticated), fills the node's key pool for the peer (``AppContext.key_pools``), and
drives the broker's optical layer (docs/protocol.md §4.7):

1. Bob sends the broker ``qkd_listen(peer=Alice)``; Alice sends Bob ``{"op": "start"}``
   every ``retry_s`` until Bob answers ``{"op": "ready"}`` (once his listen is acknowledged).
2. Alice sends ``qkd_start``. The broker pushes Bob ``qkd_detections`` per slice and Alice
   ``qkd_emitted``. Bob feeds his windows to his session; both ends exchange the session's
   envelopes as ``{"op": "pp", "seq", "msg", "tag"}`` bodies (``msg`` the canonical
   payload bytes of session.payload_bytes, ``tag`` the 16-byte Wegman–Carter tag).
3. Alice stops the link (``qkd_stop``) after ``duration_s`` of emission or once the pool
   holds ``key_bits`` new bits. On ``qkd_stopped`` Bob announces what is pending and sends
   ``{"op": "drained"}`` behind it (the link keeps order), so Alice knows that no block can
   close after the ones under way. When those are finished (key added or block dropped),
   Alice sends ``{"op": "end", "salt", "check"}`` with check = SHA-256(salt || the pool's
   digest) over a fresh salt; Bob compares it with his own pool and answers
   ``{"op": "ended", "match"}``, withdraws his listen and finishes; Alice finishes on the
   answer (or ``end_wait_s`` later without one). Both report ``pool_match``: the two
   pools were compared by a salted hash, never by their bits.

Link interruptions. The classical link is a TCP connection, but a cut link or a broken
connection can lose the messages in flight, and a peer may see one twice. Every ``pp``
body carries ``ack`` (the sender accepts every envelope of the other direction below
it); an end with nothing to send acknowledges with ``{"op": "ack", "next"}`` after
``_ACK_EVERY`` envelopes or half a retry interval. Envelopes not acknowledged for a whole
``retry_s`` without progress are sent again (``retransmitted``); a receiver passes the
session only the envelope with the sequence number it expects and drops the others
unseen — older ones as ``replayed`` (a retransmission it no longer needs, or a replay:
the two are the same to it), newer ones as ``out_of_order`` (one before them was lost and
will come again) — so neither costs authentication key. ``drained`` waits until Alice has
acknowledged all of Bob's envelopes and is repeated until ``end`` arrives; ``end`` is
repeated until ``ended`` (for ``end_wait_s`` at most). Checks without progress back off
(2, 4, ... 16 retry intervals) so that a long cut does not fill the node's outbox with
copies. Acknowledgements are not authenticated: forging one can stall the link, which
anyone on the channel can do anyway by dropping messages; it cannot make either end
accept a message or a key bit.

Load shedding (Bob). ``qkd_detections`` carries the emulated time its range ended; a
window that reaches Bob more than ``max_lag_s`` after that is dropped unannounced and
counted (``detections_dropped``, ``pulses_dropped``): a post-processor that cannot keep
up with the hardware loses whole windows, as a real one overflowing its buffer would.
Sifting allows gaps (announcements cover only what was kept), so the pulses of dropped
windows count for nothing and the decoy estimates stay unbiased; the secret key rate per
second of emission shows the loss. The broker itself drops events for a receiver that
has not read its connection for a while (§4.7): those show as gaps between windows,
counted in ``pulses_lost_backlog``.

Results (``results()``, counts and rates only — never key bits): final_key_bits
(made by privacy amplification), net_key_bits (of those, what entered the pool after
authentication took its refills),
secret_key_rate_bps (final bits per emulated second of emission), qber / qber_x (signal
QBER of the key / test basis, over every estimated block), qber_last_block,
qber_per_intensity of the last block, sifted_bits, detections, pulses,
blocks_done/aborted/discarded, alarms and the last alarm's reason, cascade_efficiency (f),
single_photon_yield_lower / single_photon_error_upper of the last block,
key_rate_per_pulse, leaked_bits, frame_errors, auth_rejects, protocol_rejects,
auth_refills, detections_dropped, pulses_dropped, pulses_lost_backlog, pool_match; and ``blocks``, the last
``BLOCK_LOG_LENGTH`` finished blocks, each with ``seq`` (1, 2, ... over the run),
``block``, ``outcome`` ("key", "aborted", "discarded"), ``reason``, ``alarm``, pulses,
detections, sifted bits (bases agreed, every class), key bits into reconciliation, QBER
per class and basis, gains, Y1^L, e1^U, f, leaked and final bits, and
the emulated times it was sifted and finished.

Parameters (``app_start`` params): ``role`` ("initiator" on the transmitter, "responder"
on the receiver), ``peer`` (a neighbour over a link with QKD), ``duration_s`` and/or
``key_bits`` (at least one, initiator), ``block_key_bits`` (10^4 .. 2^24, default 10^6),
``cascade`` (nodes.qkd.cascade.CascadeVariant value), ``epsilon_sec``, ``epsilon_cor``,
``qber_threshold``, ``sample_fraction``; rarely needed: ``peer_app``, ``max_lag_s``
(default 2 emulated s), ``announce_interval_s`` (default 0.25: each announcement costs a
128-bit authentication tag, and on a long link a block takes many seconds to fill, so
few large announcements save key; short links fill a batch of 2^18 detections sooner
anyway), ``retry_s``,
``max_start_attempts``, ``end_wait_s``, ``seed``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import itertools
import math
import zlib
from collections import deque
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from emulator.kernels import ChoiceThresholds, get_backend
from emulator.physics import DecoyIntensities, IntensityClass, PhysicsParameterError
from emulator.wire import Error, Message, Ok, QkdDetections, QkdEmitted, QkdLinkInfo, QkdListen, QkdStart
from emulator.wire import QkdStop, QkdStopped
from nodes.qkd.cascade import CascadeVariant
from nodes.qkd.estimation import EstimationError, EstimationParameters
from nodes.qkd.keypool import KeyPool
from nodes.qkd.session import (
    BlockAborted,
    BlockDiscarded,
    BlockEstimated,
    BlockReconciled,
    BlockSifted,
    EavesdropperAlarmRaised,
    Envelope,
    KeyAdded,
    PayloadError,
    QkdLinkAlice,
    QkdLinkBob,
    QkdSessionConfig,
    QkdSessionError,
    message_from_payload,
    payload_bytes,
)
from nodes.qkd.sifting import DetectionWindow

from ._params import int_param, neighbour_param, number_param, peer_app_param, reject_unknown, role_param
from .base import App, AppContext, AppParamError, AppState

__all__ = ["QkdApp", "QkdParams", "QkdRole"]

_MAX_KEY_BITS = 1 << 40
#: Finished blocks kept in `results()["blocks"]` (the orchestrator polls far more often
#: than blocks finish, and turns each new record into a `qkd_block` event).
BLOCK_LOG_LENGTH = 32
_ACK_EVERY = 32  # acknowledge at once after this many envelopes with nothing to piggyback on
_RESEND_BATCH = 256  # envelopes sent again per retransmission round
_SALT_BYTES = 16


class QkdRole(enum.Enum):
    INITIATOR = "initiator"  # the transmitter (Alice)
    RESPONDER = "responder"  # the receiver (Bob)


@dataclasses.dataclass(frozen=True, slots=True)
class QkdParams:
    role: QkdRole
    peer: str
    duration_s: float | None
    key_bits: int | None
    block_key_bits: int
    cascade: CascadeVariant
    epsilon_sec: float
    epsilon_cor: float
    qber_threshold: float
    sample_fraction: float
    peer_app: str
    max_lag_s: float
    announce_interval_s: float
    retry_s: float
    max_start_attempts: int
    end_wait_s: float
    seed: int | None


def _nan_to_none(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


class QkdApp(App):
    """One end of a QKD link run (see the module docstring)."""

    KIND = "qkd"

    @classmethod
    def parse_params(cls, params: Mapping[str, Any], ctx: AppContext) -> QkdParams:
        reject_unknown(params, QkdParams)
        role = role_param(params, QkdRole)
        peer, link = neighbour_param(params, ctx)
        info = link.qkd
        if info is None:
            raise AppParamError("peer", f"the link to {peer!r} has no QKD optical layer")
        transmitter = ctx.node if role is QkdRole.INITIATOR else peer
        if info.transmitter != transmitter:
            raise AppParamError(
                "role", f"the initiator must run on the link's transmitter {info.transmitter!r}, not {transmitter!r}"
            )
        if info.auth_key is None or (role is QkdRole.INITIATOR and info.alice_key is None):
            raise AppParamError("peer", "the broker gave this node no keys for the link")
        duration_s = number_param(params, "duration_s", None, 0.0, 1e9)
        key_bits = int_param(params, "key_bits", None, 1, _MAX_KEY_BITS)
        if role is QkdRole.INITIATOR and duration_s is None and key_bits is None:
            raise AppParamError("duration_s", "give duration_s, key_bits or both")
        try:
            cascade = CascadeVariant(params.get("cascade", CascadeVariant.ORIGINAL.value))
        except ValueError:
            raise AppParamError("cascade", f"must be one of {[v.value for v in CascadeVariant]}") from None
        peer_app = peer_app_param(params, ctx)
        retry_s = number_param(params, "retry_s", 0.5 / ctx.time_scale, 1e-6, 1e6)
        assert retry_s is not None
        parsed = QkdParams(
            role=role,
            peer=peer,
            duration_s=duration_s,
            key_bits=key_bits,
            block_key_bits=int_param(params, "block_key_bits", 1_000_000, 10_000, 1 << 24) or 1_000_000,
            cascade=cascade,
            epsilon_sec=number_param(params, "epsilon_sec", 1e-10, 1e-300, 0.5) or 1e-10,
            epsilon_cor=number_param(params, "epsilon_cor", 1e-15, 1e-300, 0.5) or 1e-15,
            qber_threshold=number_param(params, "qber_threshold", 0.11, 0.0, 0.5) or 0.0,
            sample_fraction=number_param(params, "sample_fraction", 0.05, 1e-6, 0.5) or 0.05,
            peer_app=peer_app,
            max_lag_s=number_param(params, "max_lag_s", 2.0, 0.0, 1e9) or 0.0,
            announce_interval_s=number_param(params, "announce_interval_s", 0.25, 0.0, 1e3) or 0.0,
            retry_s=retry_s,
            max_start_attempts=int_param(params, "max_start_attempts", 40, 1, 10_000) or 40,
            end_wait_s=number_param(params, "end_wait_s", 5.0 / ctx.time_scale, 0.0, 1e6) or 0.0,
            seed=int_param(params, "seed", None, 0, 2**63 - 1),
        )
        try:
            cls._session_config(parsed, info)
        except (EstimationError, PhysicsParameterError, QkdSessionError, ValueError) as exc:
            raise AppParamError("peer", f"the link's QKD parameters do not suit estimation: {exc}") from None
        return parsed

    @staticmethod
    def _session_config(p: QkdParams, info: QkdLinkInfo) -> QkdSessionConfig:
        intensities = DecoyIntensities(info.mu_signal, info.mu_decoy, info.mu_vacuum)
        estimation = EstimationParameters(
            intensities, qber_threshold=p.qber_threshold, epsilon_sec=p.epsilon_sec, epsilon_cor=p.epsilon_cor
        )
        return QkdSessionConfig(
            estimation, block_key_bits=p.block_key_bits, cascade_variant=p.cascade,
            sample_fraction=p.sample_fraction, announce_interval_s=p.announce_interval_s,
        )  # fmt: skip

    def __init__(self, ctx: AppContext, params: QkdParams) -> None:
        super().__init__(ctx, params)
        self.p = params
        info = ctx.links[params.peer].qkd
        assert info is not None and info.auth_key is not None
        self.info = info
        base = params.seed if params.seed is not None else ctx.seed
        self._rng = np.random.default_rng(
            [base & 0xFFFFFFFFFFFFFFFF, zlib.crc32(ctx.node.encode()), zlib.crc32(ctx.name.encode())]
        )
        pool = ctx.key_pools.pool(params.peer) if ctx.key_pools is not None else KeyPool(params.peer)
        self.pool = pool
        self._pool_bits_at_start = pool.bits_added
        config = self._session_config(params, info)
        backend = get_backend()
        self.session: QkdLinkAlice | QkdLinkBob
        if params.role is QkdRole.INITIATOR:
            assert info.alice_key is not None
            thresholds = ChoiceThresholds(
                signal=info.threshold_signal, signal_or_decoy=info.threshold_signal_or_decoy,
                basis_z=info.threshold_basis_z,
            )  # fmt: skip
            self.session = QkdLinkAlice(
                int.from_bytes(info.alice_key, "little"), thresholds, config,
                bootstrap_key=info.auth_key, rng=self._rng, pool=pool, backend=backend,
            )  # fmt: skip
        else:
            self.session = QkdLinkBob(config, bootstrap_key=info.auth_key, rng=self._rng, pool=pool, backend=backend)
        # lifecycle
        self._listening = False  # Bob: listen acknowledged
        self._start_asked = False  # Bob: Alice asked before the listen was acknowledged
        self._ready = False  # Alice: Bob is listening
        self._attempts = 0
        self._started_s: float | None = None  # emission began (qkd_start answered)
        self._stop_sent = False
        self._stopped_s: float | None = None  # qkd_stopped seen
        self._stopped_reason: str | None = None
        self._drained = False  # Alice: Bob announced everything
        self._end_sent_s: float | None = None
        self._pool_match: bool | None = None
        self._unlisten_sent = False
        self._salt = b""
        # metrics
        self._pulses_dropped = 0
        self._detections_dropped = 0
        self._windows = 0
        self._last_end: int | None = None  # end_pulse of the last qkd_detections
        self._pulses_lost_backlog = 0  # pulses of events the broker dropped (gaps)
        self._key_sifted = [0, 0]  # signal disclosed bits, key basis / test basis
        self._key_errors = [0, 0]
        self._last_block_qber: float | None = None
        self._last_alarm: str | None = None
        self._open: dict[int, dict[str, Any]] = {}  # per-block records not finished yet
        self._block_log: deque[dict[str, Any]] = deque(maxlen=BLOCK_LOG_LENGTH)
        self._block_seq = 0
        # the reliable envelope stream (module docstring, "Link interruptions")
        self._unacked: deque[tuple[int, dict[str, Any]]] = deque()  # sent, not acknowledged
        self._peer_next = 0  # the peer has accepted every envelope below this seq
        self._peer_next_at_check = -1  # ... as it was at the last retransmission check
        self._acked_sent = 0  # the highest `ack` we told the peer
        self._replayed = 0  # envelopes below the expected seq: duplicates or replays, dropped
        self._ahead = 0  # envelopes above the expected seq (one before them was lost), dropped
        self._retransmitted = 0
        self._resend_backoff = 1  # retry intervals until the next retransmission check
        self._deadlines: dict[str, float] = {}  # named deadlines; the app's timer is the earliest

    # ------------------------------------------------------------------ inputs

    @property
    def _alice(self) -> bool:
        return self.p.role is QkdRole.INITIATOR

    def _on_start(self, now: float) -> None:
        if self._alice:
            self._ask_start(now)
        else:
            self._request("listen", QkdListen(peer=self.p.peer, accept=True))

    def _ask_start(self, now: float) -> None:
        self._attempts += 1
        self._send_peer(self.p.peer, self.p.peer_app, {"op": "start"})
        self._arm("start", now + self.p.retry_s)

    def _arm(self, name: str, at: float | None) -> None:
        """Set (or with None clear) one named deadline; the app's timer is the earliest."""
        if at is None:
            self._deadlines.pop(name, None)
        else:
            self._deadlines[name] = at
        self._timer = min(self._deadlines.values(), default=None)

    def _on_reply(self, tag: Hashable, message: Message, now: float) -> None:
        if isinstance(message, Error):
            if tag == "listen" and not self._alice:
                self._send_peer(self.p.peer, self.p.peer_app, {"op": "error", "code": message.code})
            self._fail(f"broker refused {tag}: {message.code}: {message.message[:200]}", now)
            return
        if not isinstance(message, Ok):
            return
        if tag == "listen" and not self._listening:
            self._listening = True
            if self._start_asked:
                self._send_peer(self.p.peer, self.p.peer_app, {"op": "ready"})
        elif tag == "qkd_start" and self._started_s is None:
            self._started_s = now
            if self.p.duration_s is not None:
                self._arm("stop", now + self.p.duration_s)
        elif tag == "unlisten":
            self._finish(now)

    def _on_event(self, message: Message, now: float) -> None:
        if isinstance(message, QkdDetections) and not self._alice:
            self._windows += 1
            if self._last_end is not None and message.first_pulse > self._last_end:
                # The broker dropped events while this node was not reading (§4.7).
                self._pulses_lost_backlog += message.first_pulse - self._last_end
            self._last_end = message.end_pulse
            if now - message.now_s > self.p.max_lag_s:
                self._pulses_dropped += message.end_pulse - message.first_pulse
                self._detections_dropped += len(message.pulse)
                return
            window = DetectionWindow.from_detections(message.first_pulse, message.end_pulse, message)
            assert isinstance(self.session, QkdLinkBob)
            self.session.add_detections(window, now)
            self._after_session(now)
        elif isinstance(message, QkdEmitted) and self._alice:
            assert isinstance(self.session, QkdLinkAlice)
            self.session.on_emitted(message.end_pulse)
        elif isinstance(message, QkdStopped):
            self._on_stopped(message, now)

    def _on_stopped(self, message: QkdStopped, now: float) -> None:
        if self._stopped_s is None:
            self._stopped_s = now
            self._stopped_reason = message.reason
        if message.reason != "stopped":
            self._fail(f"the QKD link stopped: {message.reason}", now)
            return
        if not self._alice:
            assert isinstance(self.session, QkdLinkBob)
            self.session.flush(now)
            self._after_session(now)
            self._send_drained(now)
        else:
            self._maybe_end(now)

    def _send_drained(self, now: float) -> None:
        """Bob: tell Alice the stream is complete once she has accepted all of it (checked
        again every retry_s until her `end`)."""
        if not self._unacked:
            self._send_peer(self.p.peer, self.p.peer_app, {"op": "drained"})
        self._arm("drained", now + self.p.retry_s)

    def _on_peer_message(self, peer: str, body: Mapping[str, Any], now: float) -> None:
        if peer != self.p.peer:
            return
        op = body.get("op")
        if op == "pp":
            self._receive_envelope(body, now)
        elif op == "start" and not self._alice:
            self._start_asked = True
            if self._listening:
                self._send_peer(self.p.peer, self.p.peer_app, {"op": "ready"})
        elif op == "ready" and self._alice and not self._ready:
            self._ready = True
            self._arm("start", None)
            self._request("qkd_start", QkdStart(peer=self.p.peer))
        elif op == "error" and self._alice:
            self._fail(f"the receiver could not listen: {str(body.get('code'))[:64]}", now)
        elif op == "ack":
            self._take_ack(body.get("next"), now)
        elif op == "drained" and self._alice:
            self._drained = True
            self._maybe_end(now)
        elif op == "end" and not self._alice:
            self._take_ack(body.get("ack"), now)
            self._arm("drained", None)
            self._check_end(body, now)
        elif op == "ended" and self._alice and self._end_sent_s is not None:
            match = body.get("match")
            self._pool_match = match if isinstance(match, bool) else None
            self._arm("end", None)
            self._finish(now)

    def _receive_envelope(self, body: Mapping[str, Any], now: float) -> None:
        self._take_ack(body.get("ack"), now)
        seq, raw, tag = body.get("seq"), body.get("msg"), body.get("tag")
        if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(raw, bytes) or not isinstance(tag, bytes):
            self._count_bad_envelope("envelope fields of the wrong type", now)
            return
        expected = self.session.next_inbound_seq
        if seq != expected:
            # Below: a retransmission we no longer need, or a replay; above: one before it
            # was lost (the peer resends from the gap). Neither reaches the session.
            if seq < expected:
                self._replayed += 1
            else:
                self._ahead += 1
            self._arm("ack", now)  # tell the peer where we are
            return
        try:
            message = message_from_payload(raw)
        except PayloadError as exc:
            self._count_bad_envelope(exc.message, now)
            return
        self.session.receive(Envelope(seq, message, tag), now)
        unacked_in = self.session.next_inbound_seq - self._acked_sent
        if unacked_in >= _ACK_EVERY:
            self._arm("ack", now)
        elif unacked_in > 0 and "ack" not in self._deadlines:
            self._arm("ack", now + self.p.retry_s / 2)
        self._after_session(now)

    def _take_ack(self, value: object, now: float) -> None:
        """The peer has accepted every envelope below `value`: forget them."""
        if isinstance(value, bool) or not isinstance(value, int) or value <= self._peer_next:
            return
        self._peer_next = value
        while self._unacked and self._unacked[0][0] < value:
            self._unacked.popleft()
        if not self._unacked:
            self._arm("resend", None)
            self._resend_backoff = 1
            if self._alice:
                self._maybe_end(now)
            elif "drained" in self._deadlines:  # Bob was waiting for this to say `drained`
                self._send_drained(now)

    def _send_ack(self) -> None:
        self._acked_sent = self.session.next_inbound_seq
        self._send_peer(self.p.peer, self.p.peer_app, {"op": "ack", "next": self._acked_sent})

    def _count_bad_envelope(self, reason: str, now: float) -> None:
        self.session.reject_unreadable(reason)
        self._after_session(now)

    def _on_timer(self, now: float) -> None:
        if self.state is not AppState.RUNNING:  # finished: nothing more to send or wait for
            self._deadlines.clear()
            self._timer = None
            return
        due = [name for name, at in self._deadlines.items() if at <= now]
        for name in due:
            self._deadlines.pop(name, None)
        self._arm("_", None)  # recompute the timer from what is left
        for name in due:
            if name == "start" and not self._ready:
                if self._attempts >= self.p.max_start_attempts:
                    self._fail(f"the receiver did not get ready after {self._attempts} attempts", now)
                    return
                self._ask_start(now)
            elif name == "stop" and not self._stop_sent and self._stopped_s is None:
                self._stop(now)
            elif name == "ack":
                self._send_ack()
            elif name == "resend":
                self._resend(now)
            elif name == "drained":
                self._send_drained(now)
            elif name == "end":
                if now - (self._end_sent_s or now) >= self.p.end_wait_s:
                    self._finish(now)  # Bob never answered the pool check: pool_match stays unknown
                else:
                    self._send_end(now)

    def _resend(self, now: float) -> None:
        """No acknowledgement progress for a whole retry interval: send the unacknowledged
        envelopes again (at most _RESEND_BATCH; the rest follow once those are acked)."""
        if not self._unacked:
            return
        if self._peer_next == self._peer_next_at_check:
            for _, body in itertools.islice(self._unacked, _RESEND_BATCH):
                self._send_peer(self.p.peer, self.p.peer_app, {**body, "ack": self.session.next_inbound_seq})
                self._retransmitted += 1
            # Still no progress next time (a long cut): wait twice as long, up to 16 intervals,
            # rather than piling copies into the node's outbox.
            self._resend_backoff = min(self._resend_backoff * 2, 16)
        else:
            self._resend_backoff = 1
        self._peer_next_at_check = self._peer_next
        self._arm("resend", now + self._resend_backoff * self.p.retry_s)

    # ------------------------------------------------------------------ the session

    def _after_session(self, now: float) -> None:
        """Send what the session sealed, digest its events, stop or end when due."""
        for env in self.session.messages_to_send():
            body = {"op": "pp", "seq": env.seq, "msg": payload_bytes(env.message), "tag": env.tag}
            self._unacked.append((env.seq, body))
            self._acked_sent = self.session.next_inbound_seq
            self._send_peer(self.p.peer, self.p.peer_app, {**body, "ack": self._acked_sent})
            self._arm("ack", None)  # piggybacked
            if "resend" not in self._deadlines:
                self._peer_next_at_check = self._peer_next
                self._arm("resend", now + self.p.retry_s)
        while (event := self.session.next_event()) is not None:
            self._note(event, now)
        if self._alice:
            target = self.p.key_bits
            if target is not None and self.session.final_bits >= target and not self._stop_sent:
                self._stop(now)
            self._maybe_end(now)

    def _note(self, event: object, now: float) -> None:
        """Run-wide QBER from every sifted block; a per-block record, finished (and
        numbered for the block log) when the block's key is added or it is dropped."""
        if isinstance(event, BlockSifted):
            c = event.counts
            sig = int(IntensityClass.SIGNAL)
            for i, basis in enumerate((c.key_basis, 1 - c.key_basis)):
                self._key_sifted[i] += c.disclosed[sig][basis]
                self._key_errors[i] += c.errors[sig][basis]
            d = c.disclosed[sig][c.key_basis]
            self._last_block_qber = c.errors[sig][c.key_basis] / d if d else None
            self._open[c.block_id] = {
                "block": c.block_id, "pulses": c.pulses, "detections": sum(c.detections),
                "sifted_bits": sum(sum(row) for row in c.sifted), "key_bits_in": c.key_bits,
                "sifted_at_s": round(now, 6),
                "qber_by_class": {  # [Z, X] per intensity class, from the disclosed bits
                    name: [c.errors[k][b] / c.disclosed[k][b] if c.disclosed[k][b] else None for b in (0, 1)]
                    for k, name in enumerate(("signal", "decoy", "vacuum"))
                },
            }  # fmt: skip
        elif isinstance(event, BlockEstimated):
            est = event.estimate
            rec = self._open.setdefault(est.block_id, {"block": est.block_id})
            rec.update({
                "qber": _nan_to_none(est.qber), "qber_x": _nan_to_none(est.test_basis_qber),
                "gains": [_nan_to_none(g) for g in est.gains],
                "single_photon_yield_lower": _nan_to_none(est.bounds.yield_lower),
                "single_photon_error_upper": _nan_to_none(est.bounds.error_rate_upper),
            })  # fmt: skip
        elif isinstance(event, EavesdropperAlarmRaised):
            alarm = event.alarm
            self._last_alarm = alarm.reason.value
            # The session reports the alarm right after the block's abort (same input).
            done = self._block_log[-1] if self._block_log else None
            if done is not None and done["block"] == alarm.block_id:
                done["alarm"] = alarm.reason.value
            else:
                self._open.setdefault(alarm.block_id, {"block": alarm.block_id})["alarm"] = alarm.reason.value
        elif isinstance(event, BlockReconciled):
            self._open.setdefault(event.block_id, {"block": event.block_id}).update(
                {"cascade_efficiency": _nan_to_none(event.efficiency), "leaked_bits": event.leaked_bits,
                 "frame_errors": event.frame_errors}
            )  # fmt: skip
        elif isinstance(event, BlockAborted):
            self._close_block(event.block_id, "aborted", now, reason=event.reason.value)
        elif isinstance(event, BlockDiscarded):
            self._close_block(event.block_id, "discarded", now, reason=event.reason)
        elif isinstance(event, KeyAdded):
            self._close_block(event.block_id, "key", now, final_bits=event.bits)

    def _close_block(self, block_id: int, outcome: str, now: float, **extra: Any) -> None:
        rec = self._open.pop(block_id, {"block": block_id})
        self._block_seq += 1
        rec.update(extra, outcome=outcome, seq=self._block_seq, at_s=round(now, 6))
        rec.setdefault("final_bits", 0)
        self._block_log.append(rec)

    def _stop(self, now: float) -> None:
        self._stop_sent = True
        self._request("qkd_stop", QkdStop(peer=self.p.peer))

    def _maybe_end(self, now: float) -> None:
        """Alice: the link stopped, Bob drained, no block under way -> compare pools, end."""
        s = self.session
        if (
            self._stopped_s is None or not self._drained or self._end_sent_s is not None
            or s.blocks_in_progress or s.messages_waiting or self._unacked or self.state is not AppState.RUNNING
        ):  # fmt: skip
            return
        self._salt = self._rng.bytes(_SALT_BYTES)
        self._end_sent_s = now
        self._send_end(now)

    def _send_end(self, now: float) -> None:
        """Alice: the pool check (again every retry_s until `ended`, for end_wait_s at most)."""
        check = hashlib.sha256(self._salt + self.pool.digest()).digest()
        self._acked_sent = self.session.next_inbound_seq
        self._send_peer(self.p.peer, self.p.peer_app,
                        {"op": "end", "salt": self._salt, "check": check, "ack": self._acked_sent})  # fmt: skip
        self._arm("ack", None)
        assert self._end_sent_s is not None
        self._arm("end", min(now + self.p.retry_s, self._end_sent_s + self.p.end_wait_s))

    def _check_end(self, body: Mapping[str, Any], now: float) -> None:
        salt, check = body.get("salt"), body.get("check")
        if not isinstance(salt, bytes) or not isinstance(check, bytes):
            match = False
        else:
            mine = hashlib.sha256(salt + self.pool.digest()).digest()
            match = hmac.compare_digest(mine, check)
        self._pool_match = match
        self._send_peer(self.p.peer, self.p.peer_app, {"op": "ended", "match": match})
        if self.state is AppState.RUNNING and not self._unlisten_sent:  # a repeated `end` is answered again
            self._unlisten_sent = True
            self._request("unlisten", QkdListen(peer=self.p.peer, accept=False))

    # ------------------------------------------------------------------ outputs

    def results(self) -> dict[str, Any]:
        st = self.session.statistics()
        if self._started_s is not None or not self._alice:
            end = self._stopped_s if self._stopped_s is not None else self._t_last
            start = self._started_s if self._started_s is not None else self._t_start
            running_s = max(0.0, (end or 0.0) - (start or 0.0))
        else:
            running_s = 0.0
        final = st.final_bits
        net = self.pool.bits_added - self._pool_bits_at_start  # final key less the refills
        qber = [e / n if n else None for e, n in zip(self._key_errors, self._key_sifted, strict=True)]
        return {
            "role": self.p.role.value,
            "final_key_bits": final,
            "secret_key_rate_bps": final / running_s if running_s > 0 else 0.0,
            "running_s": running_s,
            "qber": qber[0],
            "qber_x": qber[1],
            "qber_last_block": self._last_block_qber,
            "qber_per_intensity": [_nan_to_none(q) for q in st.qber_per_intensity],
            "sifted_bits": st.sifted_bits,
            "detections": st.detections,
            "pulses": st.pulses,
            "blocks_done": st.blocks_done,
            "blocks_aborted": st.blocks_aborted,
            "blocks_discarded": st.blocks_discarded,
            "alarms": st.alarms,
            "last_alarm": self._last_alarm,
            "cascade_efficiency": _nan_to_none(st.cascade_efficiency),
            "single_photon_yield_lower": _nan_to_none(st.single_photon_yield_lower),
            "single_photon_error_upper": _nan_to_none(st.single_photon_error_upper),
            "key_rate_per_pulse": st.secret_key_rate_per_pulse,
            "leaked_bits": st.leaked_bits,
            "frame_errors": st.frame_errors,
            "auth_rejects": st.auth_rejects,
            "protocol_rejects": st.protocol_rejects,
            "auth_refills": st.auth_refills,
            "replayed": self._replayed,
            "out_of_order": self._ahead,
            "retransmitted": self._retransmitted,
            "detections_dropped": self._detections_dropped,
            "pulses_dropped": self._pulses_dropped,
            "pulses_lost_backlog": self._pulses_lost_backlog,
            "pool_bits_available": self.pool.bits_available,
            "pool_match": self._pool_match,
            "stopped": self._stopped_reason,
            "net_key_bits": net,
            "blocks": list(self._block_log),
        }
