"""Fault kinds: the closed vocabulary a scenario's `faults` list and the runtimes share.

Theory of operation
-------------------
A fault is injected by the runtime at the *container or process boundary*
(issue 3, part 4): it kills, stops or pauses a node it started, or cuts a
classical link.  Each kind is two steps, *apply* at `at` and *revert* at
`at + for`:

============== ================== ============== ====================================
kind           apply              revert         without `for`
============== ================== ============== ====================================
node-crash     kill (SIGKILL)     start again    stays down until the run ends
node-restart   graceful stop      start again    start again at once (downtime 0)
node-freeze    pause (SIGSTOP)    resume         frozen until the run ends
link-cut       cut the link       restore it     cut until the run ends
============== ================== ============== ====================================

This module holds only the enum and its per-kind facts, with no pydantic and
no I/O, so that the scenario schema (validation), the sans-IO planner
(`emulator.runtime.orchestrator`, `emulator.runtime.faults`) and the runtimes
all read the same table without importing each other.
"""

from __future__ import annotations

import enum

__all__ = ["FaultKind", "FaultTarget"]


class FaultTarget(enum.StrEnum):
    """What a fault acts on: a node (process or container) or a classical link."""

    NODE = "node"
    LINK = "link"


class FaultKind(enum.StrEnum):
    """A fault the runtime injects; see the table in the module docstring."""

    NODE_CRASH = "node-crash"
    NODE_RESTART = "node-restart"
    NODE_FREEZE = "node-freeze"
    LINK_CUT = "link-cut"

    @property
    def target(self) -> FaultTarget:
        """Whether the fault names a `node` or a `link`."""
        return FaultTarget.LINK if self is FaultKind.LINK_CUT else FaultTarget.NODE

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

        A frozen process cannot act on a stop request and a cut link may hold up a
        node's goodbye; a crashed or stopped node is simply not started again.
        """
        return self in (FaultKind.NODE_FREEZE, FaultKind.LINK_CUT)

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
}

_DESCRIPTIONS: dict[FaultKind, str] = {
    FaultKind.NODE_CRASH: "kill the node (SIGKILL / `docker kill`); started again after `for`, "
                          "down until the run ends without it.",
    FaultKind.NODE_RESTART: "stop the node gracefully, then start it again after `for` (default 0: at once).",
    FaultKind.NODE_FREEZE: "pause the node (SIGSTOP / `docker pause`); resumed after `for`, "
                           "frozen until the run ends without it.",
    FaultKind.LINK_CUT: "cut the classical link (`docker network disconnect` / the link shaper drops "
                        "everything); restored after `for`, cut until the run ends without it.",
}
