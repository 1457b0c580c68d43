"""Restart back-off for supervised containers: exponential, capped, reset after a good run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RestartBackoff:
    """Delay before the next restart: `initial * factor**n`, at most `maximum`.

    A container that ran for at least `reset_after` seconds before exiting counts as
    healthy again and restarts after `initial`.
    """

    initial: float = 0.25
    factor: float = 2.0
    maximum: float = 30.0
    reset_after: float = 30.0
    _failures: int = field(default=0, init=False)
    _started_at: float | None = field(default=None, init=False)

    def started(self, now: float) -> None:
        self._started_at = now

    def exited(self, now: float) -> float:
        """Record an exit at `now`; return how long to wait before starting again."""
        ran = now - self._started_at if self._started_at is not None else 0.0
        if ran >= self.reset_after:
            self._failures = 0
        delay = min(self.maximum, self.initial * self.factor**self._failures)
        self._failures += 1
        return delay
