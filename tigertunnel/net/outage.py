"""How a tunnel client reports a tunnel server it cannot reach (sans-IO).

With the server down, every pool slot retries with backoff, so logging each
failed connect would give ``-n`` lines per retry round. A
:class:`PoolOutage` per proxy pair turns that into a few lines, each with
its level:

* ``lost`` (warning): the pair's last established pool connection is gone;
* ``first`` (warning, or info while other pool connections of the pair are
  up): the first failed connect, with its reason;
* ``summary`` (same levels): at most every :data:`SUMMARY_INTERVAL` seconds,
  the attempts so far, the last reason and the next retry;
* ``recovered`` (info): a pool connection is up again, ending the outage.

So at ``--log-level warn`` a pair that has no pool connection, or cannot get
one, shows, and its recovery is one info line. It only decides what to say
and at which level (:attr:`OutageReport.format`, :meth:`OutageReport.fields`);
its caller logs it.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

from twisted.logger import LogLevel

from tigertunnel.logs import LogRateLimit

#: Minimum seconds between two summary lines of one outage.
SUMMARY_INTERVAL = 30.0


#: The log line of each kind of report (its fields: :meth:`OutageReport.fields`).
FORMATS = {
    "lost": "client {pair}: lost its last pool connection ({pool_connection}) "
            "to {target}; new TB connections are refused until one comes back",
    "first": "client {pair}: cannot connect pool connection {slot} to {target}: "
             "{reason}; retrying (a summary at most every {interval:.0f} s)",
    "summary": "client {pair}: still cannot connect to {target}: {attempts} "
               "failed attempts in {seconds:.0f} s, last: {reason}; next retry "
               "in {delay:.1f} s",
    "recovered": "client {pair}: pool connection to {target} up again after "
                 "{seconds:.0f} s ({attempts} failed connects)",
}


@dataclass(frozen=True)
class OutageReport:
    """A line to log: ``kind`` is ``lost``, ``first``, ``summary`` or
    ``recovered`` (see the module docstring), at ``level``.

    :ivar seconds: since the outage began.
    :ivar up: the pair's established pool connections at the failure.
    """

    kind: str
    level: LogLevel
    pair: str
    target: str
    attempts: int
    seconds: float
    reason: str = ""
    next_retry: float = 0.0
    slot: int = 0
    up: int = 0
    pool_connection: str = ""

    @property
    def format(self) -> str:
        """The line's format string."""
        return FORMATS[self.kind]

    def fields(self) -> Dict[str, Any]:
        """The line's fields (for the format, and for JSON logs)."""
        fields: Dict[str, Any] = {"pair": self.pair, "target": self.target,
                                  "attempts": self.attempts, "seconds": self.seconds}
        if self.kind == "lost":
            fields["pool_connection"] = self.pool_connection
        elif self.kind != "recovered":
            fields.update(slot=self.slot, reason=self.reason, delay=self.next_retry,
                          interval=SUMMARY_INTERVAL, up=self.up)
        return fields


class PoolOutage:
    """One pair's failed pool connects between two healthy moments.

    :param pair: the pair's name; :param target: its tunnel server (for the lines).
    """

    def __init__(self, pair: str = "", target: str = "") -> None:
        self.pair = pair
        self.target = target
        #: Failed connects in this outage.
        self.attempts = 0
        #: When the outage began (its first failure or the loss of the last
        #: pool connection); ``None`` while there is none.
        self._since: Optional[float] = None
        #: Whether a failure was reported as a warning in this outage.
        self._warned = False
        self._summaries = LogRateLimit(SUMMARY_INTERVAL)

    def lost_last(self, now: float, pool_connection: str = "") -> OutageReport:
        """The pair's last established pool connection (named
        ``pool_connection``) is gone."""
        if self._since is None:
            self._since = now
        return OutageReport("lost", LogLevel.warn, self.pair, self.target,
                            self.attempts, now - self._since,
                            pool_connection=pool_connection)

    def failed(self, now: float, reason: str, next_retry: float, up: int = 0,
               slot: int = 0) -> Optional[OutageReport]:
        """A pool connect of ``slot`` failed; returns the line to log now, if any.

        :param next_retry: seconds until the slot tries again.
        :param up: the pair's established pool connections: with none the
            line is a warning, else (only some slots fail) info.
        """
        self.attempts += 1
        if self._since is None:
            self._since = now
        level = LogLevel.warn if up == 0 else LogLevel.info
        if self.attempts == 1 or (level is LogLevel.warn and not self._warned):
            kind = "first"
            self._summaries.reset()
            self._summaries.allow(now)
        elif self._summaries.allow(now) is not None:
            kind = "summary"
        else:
            return None
        if level is LogLevel.warn:
            self._warned = True
        return OutageReport(kind, level, self.pair, self.target, self.attempts,
                            now - self._since, reason, next_retry, slot, up)

    def recovered(self, now: float) -> Optional[OutageReport]:
        """A pool connection is up; returns the line to log if an outage ends."""
        if self._since is None:
            return None
        report = OutageReport("recovered", LogLevel.info, self.pair, self.target,
                              self.attempts, now - self._since)
        self.attempts = 0
        self._since = None
        self._warned = False
        return report
