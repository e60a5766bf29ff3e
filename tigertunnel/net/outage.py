"""How a tunnel client reports a tunnel server it cannot reach (sans-IO).

With the server down, every pool slot retries with backoff, so logging each
failed connect would give ``-n`` lines per retry round. A
:class:`PoolOutage` per proxy pair turns that into: the first failure, then
a summary at most every :data:`SUMMARY_INTERVAL` seconds (attempts so far,
the last reason, the next retry), and one line when a pool connection is up
again. It only decides what to say; its caller logs it.
"""

from dataclasses import dataclass
from typing import Optional

#: Minimum seconds between two summary lines of one outage.
SUMMARY_INTERVAL = 30.0


@dataclass(frozen=True)
class OutageReport:
    """A line to log: ``kind`` is ``first``, ``summary`` or ``recovered``."""

    kind: str
    attempts: int
    seconds: float
    reason: str = ""
    next_retry: float = 0.0


class PoolOutage:
    """Counts one pair's failed pool connects between two healthy moments."""

    def __init__(self) -> None:
        self.attempts = 0
        self._started = 0.0
        self._last_report = 0.0

    def failed(self, now: float, reason: str, next_retry: float) -> Optional[OutageReport]:
        """A pool connect failed; returns the line to log now, if any."""
        self.attempts += 1
        if self.attempts == 1:
            self._started = self._last_report = now
            return OutageReport("first", 1, 0.0, reason, next_retry)
        if now - self._last_report >= SUMMARY_INTERVAL:
            self._last_report = now
            return OutageReport("summary", self.attempts, now - self._started,
                                reason, next_retry)
        return None

    def recovered(self, now: float) -> Optional[OutageReport]:
        """A pool connection is up; returns the line to log if an outage ends."""
        if not self.attempts:
            return None
        report = OutageReport("recovered", self.attempts, now - self._started)
        self.attempts = 0
        return report
