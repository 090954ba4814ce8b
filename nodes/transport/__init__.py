"""Classical links between neighbours: framing + handshake, shaping, liveness.

Sans-IO cores (importable anywhere):

* `link.LinkConnection` — one TCP link connection: `link_hello`/`link_welcome`
  handshake with the run token, framed `app_msg`s, typed errors for bad input;
* `shaper.StreamShaper` / `shaper.DatagramShaper` — sender-side delay, jitter and UDP
  loss of a link (DESIGN §3);
* `liveness.Liveness` — UDP probes, up/down per neighbour, RTT.

The trio shells `tcp_io` and `udp_io` move their bytes; only the node runtime imports them.
"""

from .link import LinkConnection, LinkRole, LinkState
from .liveness import Liveness, LivenessState
from .shaper import DatagramShaper, ShaperConfig, StreamShaper, shaper_rng

__all__ = [
    "DatagramShaper",
    "LinkConnection",
    "LinkRole",
    "LinkState",
    "Liveness",
    "LivenessState",
    "ShaperConfig",
    "StreamShaper",
    "shaper_rng",
]
