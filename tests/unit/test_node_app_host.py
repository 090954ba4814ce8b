"""The app host (nodes/apps/host.py): starting apps, routing replies, events and peer messages."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import pytest

from emulator.wire import (
    AppMsg,
    EprAccepted,
    EprDelivered,
    EprDone,
    EprListen,
    EprRequest,
    LinkInfo,
    Message,
    Ok,
    RemoteProtocolError,
)
from nodes.apps import App, AppContext, AppHost, AppParamError, AppState, HostBrokerRequest, HostPeerSend

LINKS = {"bob": LinkInfo(peer="bob", length_km=1.0, attenuation_db_per_km=0.2, jitter_s=0.0, udp_loss=0.0, entanglement=True)}


class Recorder(App):
    """Test app: asks for what `params` says, records every input."""

    KIND = "recorder"

    @classmethod
    def parse_params(cls, params: Mapping[str, Any], ctx: AppContext) -> dict[str, Any]:
        if "bad" in params:
            raise AppParamError("bad", "is bad")
        return dict(params)

    def __init__(self, ctx: AppContext, params: dict[str, Any]) -> None:
        super().__init__(ctx, params)
        self.seen: list[tuple[str, Any]] = []

    def _on_start(self, now: float) -> None:
        if self.params.get("listen"):
            self._request("listen", EprListen(peer="bob", accept=True))
        if self.params.get("request"):
            self._request("req", EprRequest(peer="bob", pairs=2))
        if self.params.get("timer") is not None:
            self._set_timer(self.params["timer"])

    def _on_reply(self, tag: Hashable, message: Message, now: float) -> None:
        self.seen.append(("reply", (tag, message.TYPE)))

    def _on_event(self, message: Message, now: float) -> None:
        self.seen.append(("event", message.TYPE))
        if isinstance(message, EprDone):
            self._finish(now)

    def _on_peer_message(self, peer: str, body: Mapping[str, Any], now: float) -> None:
        if body.get("boom"):
            raise ZeroDivisionError("app bug")
        self.seen.append(("peer", (peer, dict(body))))
        self._send_peer(peer, "other", {"echo": True})

    def _on_timer(self, now: float) -> None:
        self.seen.append(("timer", now))

    def results(self) -> dict[str, Any]:
        return {"n": len(self.seen)}


def make_host() -> AppHost:
    return AppHost(
        {"recorder": Recorder},
        lambda name: AppContext(node="alice", name=name, seed=0, time_scale=1.0, memory_qubits=4, links=LINKS),
    )


def actions(host: AppHost) -> list[Any]:
    out = []
    while (a := host.next_action()) is not None:
        out.append(a)
    return out


def delivered(request: int, initiator: str) -> EprDelivered:
    return EprDelivered(
        request=request,
        initiator=initiator,
        peer="bob",
        pair_ids=np.array([1]),
        qubits=np.array([7]),
        bell=np.array([2], np.uint8),
        herald_s=np.array([0.5]),
    )


def test_start_validation() -> None:
    host = make_host()
    with pytest.raises(RemoteProtocolError) as exc:
        host.start_app("nope", "a", {}, 0.0)
    assert exc.value.code.value == "unknown_app"
    with pytest.raises(RemoteProtocolError) as exc:
        host.start_app("recorder", "a", {"bad": 1}, 0.0)
    assert exc.value.code.value == "bad_field" and exc.value.message == "params.bad: is bad"
    host.start_app("recorder", "a", {}, 0.0)
    with pytest.raises(RemoteProtocolError):
        host.start_app("recorder", "a", {}, 0.0)
    with pytest.raises(RemoteProtocolError) as exc:
        host.status("zzz")
    assert exc.value.code.value == "unknown_app"


def test_request_replies_come_back_with_the_app_tag_and_bind_epr_events() -> None:
    host = make_host()
    host.start_app("recorder", "a", {"request": True}, 0.0)
    (req,) = actions(host)
    assert isinstance(req, HostBrokerRequest) and req.tag == ("a", "req")
    # A delivery before our epr_accepted is processed is held, then released in order.
    host.handle_broker_event(delivered(42, "alice"), 0.5)
    app = host.app("a")
    assert isinstance(app, Recorder) and app.seen == []
    host.handle_broker_reply(req.tag, EprAccepted(request=42, now_s=0.1), 0.5)
    assert app.seen == [("reply", ("req", "epr_accepted")), ("event", "epr_delivered")]
    host.handle_broker_event(
        EprDone(request=42, initiator="alice", peer="bob", delivered=1, reason="complete", now_s=0.6), 0.6
    )
    assert app.state is AppState.DONE
    assert host.status("a").state == "done"
    # Someone else's request never reaches this app.
    host.handle_broker_event(delivered(43, "alice"), 0.7)
    assert app.seen[-1] == ("event", "epr_done")


def test_listener_gets_deliveries_of_requests_the_peer_initiated() -> None:
    host = make_host()
    host.start_app("recorder", "l", {"listen": True}, 0.0)
    (listen,) = actions(host)
    host.handle_broker_reply(listen.tag, Ok(), 0.0)
    host.handle_broker_event(delivered(7, "bob"), 0.1)
    host.handle_broker_event(
        EprDone(request=7, initiator="bob", peer="bob", delivered=1, reason="complete", now_s=0.2), 0.2
    )
    app = host.app("l")
    assert isinstance(app, Recorder)
    assert app.seen[1:] == [("event", "epr_delivered"), ("event", "epr_done")]


def test_listener_gets_the_end_of_a_request_that_delivered_nothing() -> None:
    """epr_done names initiator and peer, so it reaches the listener without a prior delivery."""
    host = make_host()
    host.start_app("recorder", "l", {"listen": True}, 0.0)
    (listen,) = actions(host)
    host.handle_broker_reply(listen.tag, Ok(), 0.0)
    host.handle_broker_event(
        EprDone(request=9, initiator="bob", peer="bob", delivered=0, reason="cancelled", now_s=0.1), 0.1
    )
    app = host.app("l")
    assert isinstance(app, Recorder) and app.seen[1:] == [("event", "epr_done")]


def test_peer_messages_are_routed_by_app_name_and_app_bugs_only_fail_that_app() -> None:
    host = make_host()
    host.start_app("recorder", "a", {}, 0.0)
    host.start_app("recorder", "b", {}, 0.0)
    host.handle_peer_message("bob", AppMsg(app="a", body={"x": 1}), 1.0)
    (send,) = actions(host)
    assert isinstance(send, HostPeerSend) and send.peer == "bob" and send.message == AppMsg(app="other", body={"echo": True})
    host.handle_peer_message("bob", AppMsg(app="nobody", body={}), 1.0)
    assert host.dropped_peer_messages == 1
    host.handle_peer_message("bob", AppMsg(app="b", body={"boom": True}), 1.0)
    status = host.status("b")
    assert status.state == "failed" and "ZeroDivisionError" in status.results["error"]
    assert host.status("a").state == "running"
    assert host.summary() == {"a": {"kind": "recorder", "state": "running"}, "b": {"kind": "recorder", "state": "failed"}}


def test_timers() -> None:
    host = make_host()
    host.start_app("recorder", "t1", {"timer": 2.0}, 0.0)
    host.start_app("recorder", "t2", {"timer": 1.0}, 0.0)
    assert host.get_timer() == 1.0
    host.handle_timer(1.5)
    t2 = host.app("t2")
    assert isinstance(t2, Recorder) and t2.seen == [("timer", 1.5)]
    assert host.get_timer() == 2.0
