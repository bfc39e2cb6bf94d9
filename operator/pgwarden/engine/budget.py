"""The blast radius over time: actions on one target per policy in any window of length `interval`.

`maxActionsPerCycle` and `maxFractionPerCycle` bound the actions on one target in any window of length
`interval`, not per cycle: with deadline-aware scheduling a loop may wake many times an interval, and each
wake-up must not bring a fresh allowance (a backlog of 40 sessions would otherwise drain at the cap per
*second*). The caller's long-lived state (`TargetSession`, shared by every policy on a connection) keeps
one `ActionBudget`; a cycle asks how many actions the window already holds and records the ones it took.
Pure: the caller passes the monotonic time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

_EMPTY: deque[float] = deque(maxlen=0)
"""The window of a policy that took no action: shared, and never written (its maxlen is 0)."""


@dataclass
class ActionBudget:
    """When each action of the last window was taken, per policy (monotonic seconds)."""

    _taken: dict[str, deque[float]] = field(default_factory=dict)
    """Only policies with an action in the window: an empty deque is ~600 bytes, and most policies on most
    targets act on nothing (20 policies x 200 pods held 4,000 of them)."""

    def _window(self, policy: str, window: float, now: float) -> deque[float]:
        taken = self._taken.get(policy)
        if taken is None:
            return _EMPTY
        while taken and taken[0] <= now - window:  # an action exactly `window` ago is out of this one
            taken.popleft()
        if not taken:
            del self._taken[policy]
        return taken

    def used(self, policy: str, window: float, now: float) -> int:
        """Actions `policy` took in the `window` seconds before `now`."""
        return len(self._window(policy, window, now))

    def record(self, policy: str, count: int, at: float) -> None:
        """`count` actions taken, all at `at` (record once every signal was accepted: never early)."""
        if count > 0:
            self._taken.setdefault(policy, deque()).extend([at] * count)

    def frees_at(self, policy: str, window: float, now: float) -> float | None:
        """Seconds after `now` when the oldest action leaves the window (a slot frees); None if none held."""
        taken = self._window(policy, window, now)
        return taken[0] + window - now if taken else None
