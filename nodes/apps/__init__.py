"""Applications a scenario can start on a node (`app_start(kind, name, params)`).

`APP_KINDS` is the registry: the closed map from a kind name to its app class
(CONVENTIONS 7 — names received off the wire are looked up here, never evaluated).
Each app is a sans-IO core (`base.App`) driven by the node's `host.AppHost`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .base import App, AppAction, AppContext, AppParamError, AppState, BrokerRequest, PeerSend
from .epr_test import EprTestApp
from .host import AppHost, HostAction, HostAppIo, HostBrokerRequest, HostPeerSend
from .qkd import QkdApp
from .tunnel import TunnelApp

APP_KINDS: Mapping[str, type[App]] = MappingProxyType(
    {EprTestApp.KIND: EprTestApp, QkdApp.KIND: QkdApp, TunnelApp.KIND: TunnelApp}
)

__all__ = [
    "APP_KINDS",
    "App",
    "AppAction",
    "AppContext",
    "AppHost",
    "AppParamError",
    "AppState",
    "BrokerRequest",
    "EprTestApp",
    "HostAction",
    "HostAppIo",
    "HostBrokerRequest",
    "HostPeerSend",
    "PeerSend",
    "QkdApp",
    "TunnelApp",
]
