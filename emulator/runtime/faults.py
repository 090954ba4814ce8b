"""The fault schedule: which fault step is due when, without I/O and without a clock.

Theory of operation
-------------------
A scenario's `faults` become `FaultPlan`s in the `RunPlan` (`plan_from_scenario`).
Each fault is two *steps* on its target (a node, a link's classical channel, its fibre
in the broker, or its eavesdropper):

    kind                  APPLY (at `at`)          REVERT (at `at + for`)
    node-crash            kill                     start again
    node-restart          graceful stop            start again (at `at` when there is no `for`)
    node-freeze           pause                    resume
    link-cut              cut                      restore
    fibre-cut             cut (link, broker fibre) splice (broker fibre_cut), restore the link
    qkd-intercept-resend  Eve on (broker qkd_eve)  Eve off (qkd_eve with the defaults)
    qkd-pns               Eve on (broker qkd_eve)  Eve off

A fault with no `for` has no REVERT in the plan, except node-restart, whose
REVERT then falls at `at` itself (see `emulator.scenario.fault_kinds`).

`FaultSchedule` sorts every step of every fault once, at construction, and walks
that list with a cursor. Times in the plan are offsets from the *timeline origin*
(the emulated instant every node had registered, the origin of app `start`s too);
`begin(origin_s)` fixes the origin in broker time, after which the shell

1. sleeps until `next_due_s()` (absolute emulated time, or wakes for other reasons),
2. calls `due(now_s)` and performs the returned `FaultAction`s in the order given,
3. at the end of the run calls `close(now_s)` and performs what it returns (resume
   frozen nodes, restore cut links) before it stops everything.

Guarantees:

* **Exactly once, in time order.** Each planned step is returned by exactly one
  `due` call, the first whose `now_s` has reached `origin + t_s`; a `now_s` that
  goes backwards returns nothing. One call returns every step that has come, so
  a late wake-up catches up in order.
* **Ties.** At equal times, REVERTs of faults applied earlier come first (a target
  freed at t can be hit again at t: the scenario allows back-to-back windows),
  then the faults that start at t in scenario order, each APPLY immediately
  followed by its own REVERT when that falls at the same instant (a node-restart
  with no `for`: stop, then start, in one `due` call).
* **State** is what has been handed out: `active()` lists the faults applied and
  not reverted; `down_nodes`, `frozen_nodes` and `cut_links` derive from it. Given
  a `now_s`, these queries answer as if `due(now_s)` had been called (without
  consuming anything), so a shell that polls node status just before it processes
  due faults still sees a node it is about to kill as down.
* **Closing.** `close(now_s)` stops the schedule: later `due` calls return nothing,
  and it returns the REVERTs of the faults still in force whose kind must be undone
  before shutdown (`FaultKind.undo_before_shutdown`: freezes, link and fibre cuts),
  stamped at `now_s`. Crashed or stopped nodes stay down; nothing restarts them.

Comparisons are made as `origin_s + t_s <= now_s`, the same expression
`next_due_s` returns, so a shell that sleeps exactly until `next_due_s()` and asks
`due` at that instant always gets the step (no rounding gap).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable
from typing import Any

from .orchestrator import FaultKind, FaultPlan

__all__ = ["FaultAction", "FaultSchedule", "FaultStep"]

_frozen = dataclasses.dataclass(frozen=True, slots=True)


class FaultStep(enum.StrEnum):
    """Which half of a fault an action is."""

    APPLY = "apply"
    REVERT = "revert"


@_frozen
class FaultAction:
    """One step of one fault: what the runtime does to the fault's target at `t_s`.

    `t_s` is emulated seconds from the timeline origin: the planned time for actions
    from `due` and `timeline`, the closing time for actions from `close`.
    """

    fault: FaultPlan
    step: FaultStep
    t_s: float

    @property
    def verb(self) -> str:
        """`kill`, `stop`, `pause`, `cut`, `intercept`, `split` (APPLY) or `start`, `resume`,
        `restore`, `splice`, `withdraw` (REVERT)."""
        kind = self.fault.kind
        return kind.apply_verb if self.step is FaultStep.APPLY else kind.revert_verb

    def describe(self) -> str:
        """`fault 1 apply (kill bob): node-crash bob at 2 s for 3 s`."""
        return f"fault {self.fault.index} {self.step.value} ({self.verb} {self.fault.target_label}): {self.fault.describe()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for events.jsonl and results.json); infinity is written None;
        `fraction` only for the kinds that have one."""
        out: dict[str, Any] = {
            "fault": self.fault.index,
            "kind": self.fault.kind.value,
            "step": self.step.value,
            "action": self.verb,
            "t_s": self.t_s if math.isfinite(self.t_s) else None,
            "node": self.fault.node,
            "link": None if self.fault.link is None else list(self.fault.link),
        }
        if self.fault.fraction is not None:
            out["fraction"] = self.fault.fraction
        out["description"] = self.fault.describe()
        return out


def _order_key(action: FaultAction) -> tuple[float, int, int, int]:
    # (time, reverts of earlier-applied faults first, scenario order, APPLY before REVERT)
    carried_over = action.step is FaultStep.REVERT and action.t_s > action.fault.at_s
    return (action.t_s, 0 if carried_over else 1, action.fault.index, 0 if action.step is FaultStep.APPLY else 1)


class FaultSchedule:
    """When each fault of a run is applied and reverted (see the module docstring)."""

    def __init__(self, faults: Iterable[FaultPlan]) -> None:
        self.faults: tuple[FaultPlan, ...] = tuple(faults)
        indices = [f.index for f in self.faults]
        if len(set(indices)) != len(indices):
            raise ValueError(f"fault indices must be unique, got {indices}")
        actions = [FaultAction(f, FaultStep.APPLY, f.at_s) for f in self.faults]
        actions += [FaultAction(f, FaultStep.REVERT, r) for f in self.faults if (r := f.revert_s) is not None]
        self._actions: tuple[FaultAction, ...] = tuple(sorted(actions, key=_order_key))
        self._cursor = 0  # actions[:cursor] have been handed out by `due`
        self._closed_indices: frozenset[int] = frozenset()  # faults reverted by `close`
        self._closed = False
        self.origin_s: float | None = None

    # ------------------------------------------------------------------ driving

    def begin(self, origin_s: float) -> None:
        """Fix the timeline origin (broker emulated time when every node had registered)."""
        if self.origin_s is not None:
            raise RuntimeError("fault schedule already begun")
        if not math.isfinite(origin_s):
            raise ValueError(f"origin must be finite, got {origin_s!r}")
        self.origin_s = origin_s

    def due(self, now_s: float) -> list[FaultAction]:
        """Every action whose time has come and that no earlier call returned, in order."""
        end = self._position(now_s)
        out = list(self._actions[self._cursor : end])
        self._cursor = end
        return out

    def next_due_s(self) -> float | None:
        """Absolute emulated time of the next action (None: not begun, closed or nothing left)."""
        if self.origin_s is None or self._closed or self._cursor >= len(self._actions):
            return None
        return self.origin_s + self._actions[self._cursor].t_s

    def close(self, now_s: float) -> list[FaultAction]:
        """End the schedule at `now_s`; return the reverts to perform before shutdown.

        Those are the REVERTs of the faults in force (as of the last `due`) whose kind
        must be undone before shutdown (freezes, link and fibre cuts), stamped at `now_s`.
        Afterwards `due` returns nothing and those faults are no longer active. A
        second call returns nothing.
        """
        if self._closed:
            return []
        undo = [f for f in self._in_force(self._cursor) if f.kind.undo_before_shutdown]
        self._closed = True
        self._closed_indices = frozenset(f.index for f in undo)
        t_s = self._elapsed(now_s)
        return [FaultAction(f, FaultStep.REVERT, t_s) for f in undo]

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ queries

    def timeline(self) -> list[FaultAction]:
        """Every planned action, in the order `due` hands them out (for the report)."""
        return list(self._actions)

    def active(self, now_s: float | None = None) -> list[FaultPlan]:
        """Faults applied and not reverted, in the order they were applied.

        Without `now_s`: as of the last `due` call; with it: as if `due(now_s)` were
        called now (nothing is consumed).
        """
        return self._in_force(self._query_position(now_s))

    def pending_reverts(self, now_s: float | None = None) -> list[FaultAction]:
        """The REVERT of every fault in force (every kind), in the order they were applied.

        Stamped at `now_s` when given (and the state taken as of `now_s`), else at the
        planned revert time, or inf for a fault that lasts until the run ends. The
        runtime undoes freezes and cuts before it shuts down (`close` returns exactly
        those); crashed or stopped nodes are not started again.
        """
        in_force = self._in_force(self._query_position(now_s))
        if now_s is not None and self.origin_s is not None:
            t_s = self._elapsed(now_s)
            return [FaultAction(f, FaultStep.REVERT, t_s) for f in in_force]
        return [FaultAction(f, FaultStep.REVERT, math.inf if f.revert_s is None else f.revert_s) for f in in_force]

    def down_nodes(self, now_s: float | None = None) -> set[str]:
        """Nodes crashed or stopped and not yet started again (`now_s`: as in `active`)."""
        return {f.node for f in self.active(now_s) if f.kind.takes_node_down and f.node is not None}

    def frozen_nodes(self, now_s: float | None = None) -> set[str]:
        """Nodes paused and not yet resumed (`now_s`: as in `active`)."""
        return {f.node for f in self.active(now_s) if f.kind is FaultKind.NODE_FREEZE and f.node is not None}

    def cut_links(self, now_s: float | None = None) -> set[tuple[str, str]]:
        """Links whose classical channel is cut (`link-cut`, `fibre-cut`) and not yet restored,
        endpoints in scenario order (`now_s`: as in `active`)."""
        return {f.link for f in self.active(now_s) if f.kind.cuts_classical and f.link is not None}

    # ------------------------------------------------------------------ internals

    def _elapsed(self, now_s: float) -> float:
        return 0.0 if self.origin_s is None else now_s - self.origin_s

    def _position(self, now_s: float) -> int:
        """Cursor after handing out everything due at `now_s` (never moves backwards)."""
        if self.origin_s is None or self._closed:
            return self._cursor
        end = self._cursor
        while end < len(self._actions) and self.origin_s + self._actions[end].t_s <= now_s:
            end += 1
        return end

    def _query_position(self, now_s: float | None) -> int:
        return self._cursor if now_s is None else self._position(now_s)

    def _in_force(self, position: int) -> list[FaultPlan]:
        in_force: dict[int, FaultPlan] = {}  # insertion order = apply order
        for action in self._actions[:position]:
            if action.step is FaultStep.APPLY:
                in_force[action.fault.index] = action.fault
            else:
                in_force.pop(action.fault.index, None)
        return [f for i, f in in_force.items() if i not in self._closed_indices]
