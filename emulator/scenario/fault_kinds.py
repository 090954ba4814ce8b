"""Fault kinds: the closed vocabulary a scenario's `faults` list and the runtimes share.

Theory of operation
-------------------
A fault is injected by the runtime at the *container or process boundary*
(issue 3, part 4): it kills, stops or pauses a node it started, or cuts a
classical link; or (issue 4) it cuts a whole fibre (the classical link and the
broker's physics on it), or switches on an eavesdropper in the broker's optics of
a QKD link. Each kind is two steps, *apply* at `at` and *revert*
at `at + for`:

==================== ===================== ============== ====================================
kind                 apply                 revert         without `for`
==================== ===================== ============== ====================================
node-crash           kill (SIGKILL)        start again    stays down until the run ends
node-restart         graceful stop         start again    start again at once (downtime 0)
node-freeze          pause (SIGSTOP)       resume         frozen until the run ends
link-cut             cut the link          restore it     cut until the run ends
fibre-cut            cut link and fibre    splice both    cut until the run ends
qkd-intercept-resend Eve on (`fraction`)   Eve off        on until the run ends
qkd-pns              Eve on (PNS)          Eve off        on until the run ends
==================== ===================== ============== ====================================

`fibre-cut` is a `link-cut` plus the broker's half: the runtime cuts the
classical channel exactly as for `link-cut` and sends the broker's admin session
`fibre_cut` (docs/protocol.md §4.5), after which the broker delivers no heralded
pair, loses every qubit and passes no QKD photon on that link (dark counts only);
the revert splices the fibre and restores the channel. It works on any link and in
every runtime, and since both kinds hold the classical channel a `fibre-cut` may
not overlap a `link-cut` or another `fibre-cut` of the same link; it may overlap
the `qkd-*` kinds.

The two `qkd-*` kinds act on the broker, not on a node or the network: the
runtime sends the broker's admin session `qkd_eve` (docs/protocol.md §4.7) with
the switches on at apply and all off at revert. They therefore work in every
runtime (local, docker, a compose project), need a link with a `qkd` section,
and, since they set the link's eavesdropper as a whole, may not overlap each
other on one link; they may overlap a `link-cut` of the same link, which acts on
the classical channel, not on the photons (and a `fibre-cut`, during which Eve
simply sees no photon). Only `qkd-intercept-resend` takes a
`fraction` (the share of pulses Eve intercepts, in (0, 1]).

This module holds only the enum and its per-kind facts, with no pydantic and
no I/O, so that the scenario schema (validation), the sans-IO planner
(`emulator.runtime.orchestrator`, `emulator.runtime.faults`) and the runtimes
all read the same table without importing each other.
"""

from __future__ import annotations

import enum

__all__ = ["FaultKind", "FaultTarget"]


class FaultTarget(enum.StrEnum):
    """What a fault acts on: a node (process or container) or a link (its classical
    channel, its whole fibre, or the eavesdropper of its QKD optics)."""

    NODE = "node"
    LINK = "link"


class FaultKind(enum.StrEnum):
    """A fault the runtime injects; see the table in the module docstring."""

    NODE_CRASH = "node-crash"
    NODE_RESTART = "node-restart"
    NODE_FREEZE = "node-freeze"
    LINK_CUT = "link-cut"
    FIBRE_CUT = "fibre-cut"
    QKD_INTERCEPT_RESEND = "qkd-intercept-resend"
    QKD_PNS = "qkd-pns"

    @property
    def target(self) -> FaultTarget:
        """Whether the fault names a `node` or a `link`."""
        return FaultTarget.NODE if self.value.startswith("node-") else FaultTarget.LINK

    @property
    def eavesdrops(self) -> bool:
        """The fault switches the eavesdropper of a QKD link (broker admin `qkd_eve`).

        Its link must have a `qkd` section; it needs no node and no container engine.
        """
        return self in (FaultKind.QKD_INTERCEPT_RESEND, FaultKind.QKD_PNS)

    @property
    def cuts_classical(self) -> bool:
        """The fault cuts the link's classical channel (the runtime's `link-cut` path).

        Two such faults on one link may not overlap: both hold the same channel.
        """
        return self in (FaultKind.LINK_CUT, FaultKind.FIBRE_CUT)

    @property
    def cuts_fibre(self) -> bool:
        """The fault also cuts the link's fibre in the broker (admin `fibre_cut`): no
        heralded pair, no qubit, no QKD photon crosses it while in force."""
        return self is FaultKind.FIBRE_CUT

    @property
    def takes_fraction(self) -> bool:
        """The fault needs a `fraction` (and no other kind accepts one)."""
        return self is FaultKind.QKD_INTERCEPT_RESEND

    @property
    def lasts_to_end_without_for(self) -> bool:
        """True: without `for` the fault stays in force until the run ends.

        False (node-restart): without `for` the node is started again at once.
        """
        return self is not FaultKind.NODE_RESTART

    @property
    def takes_node_down(self) -> bool:
        """The node's process or container is gone between apply and revert."""
        return self in (FaultKind.NODE_CRASH, FaultKind.NODE_RESTART)

    @property
    def undo_before_shutdown(self) -> bool:
        """A fault still in force when the run ends must be reverted before shutdown.

        A frozen process cannot act on a stop request and a cut link (`link-cut`, the
        classical half of `fibre-cut`) may hold up a node's goodbye; a crashed or
        stopped node is simply not started again, and an eavesdropper ends with the
        broker.
        """
        return self is FaultKind.NODE_FREEZE or self.cuts_classical

    @property
    def apply_verb(self) -> str:
        """What applying the fault does, in one word (for events and reports)."""
        return _VERBS[self][0]

    @property
    def revert_verb(self) -> str:
        """What reverting the fault does, in one word (for events and reports)."""
        return _VERBS[self][1]

    @property
    def description(self) -> str:
        """One sentence for the scenario reference."""
        return _DESCRIPTIONS[self]


_VERBS: dict[FaultKind, tuple[str, str]] = {
    FaultKind.NODE_CRASH: ("kill", "start"),
    FaultKind.NODE_RESTART: ("stop", "start"),
    FaultKind.NODE_FREEZE: ("pause", "resume"),
    FaultKind.LINK_CUT: ("cut", "restore"),
    FaultKind.FIBRE_CUT: ("cut", "splice"),
    FaultKind.QKD_INTERCEPT_RESEND: ("intercept", "withdraw"),
    FaultKind.QKD_PNS: ("split", "withdraw"),
}

_DESCRIPTIONS: dict[FaultKind, str] = {
    FaultKind.NODE_CRASH: "kill the node (SIGKILL / `docker kill`); started again after `for`, "
                          "down until the run ends without it.",
    FaultKind.NODE_RESTART: "stop the node gracefully, then start it again after `for` (default 0: at once).",
    FaultKind.NODE_FREEZE: "pause the node (SIGSTOP / `docker pause`); resumed after `for`, "
                           "frozen until the run ends without it.",
    FaultKind.LINK_CUT: "cut the classical link (`docker network disconnect` / the link shaper drops "
                        "everything); restored after `for`, cut until the run ends without it.",
    FaultKind.FIBRE_CUT: "cut the link's fibre: its classical channel as `link-cut` does, and in the broker (admin "
                         "`fibre_cut`) no heralded EPR pair, every qubit sent over it lost, no QKD photon (dark "
                         "counts only); spliced and restored after `for`, cut until the run ends without it. "
                         "Any link; may not overlap a `link-cut` of the same link.",
    FaultKind.QKD_INTERCEPT_RESEND: "an eavesdropper on the link's QKD optics intercepts the share `fraction` of "
                                    "the pulses, measures each in a random basis and resends her result (the "
                                    "QBER rises by about fraction/4); the broker's admin `qkd_eve`, so it works "
                                    "in every runtime; withdrawn after `for`, on until the run ends without it. "
                                    "The link needs a `qkd` section.",
    FaultKind.QKD_PNS: "an eavesdropper on the link's QKD optics splits one photon off every multi-photon pulse "
                       "and forwards the rest losslessly (photon-number splitting, Brassard et al., PRL 85, "
                       "1330 (2000)); the broker's admin `qkd_eve`; withdrawn after `for`, on until the run ends "
                       "without it. The link needs a `qkd` section.",
}
