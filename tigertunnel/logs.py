"""Logging for tigertunnel: one level filter in front of twisted.logger.

Every module gets its logger from :func:`logger`; those loggers publish
through a single :class:`FilteringLogObserver` whose level ``--log-level``
sets, so the level works the same under ``twistd`` (whose observers we do not
own) and in the foreground console script. Log events carry named fields
(``pair``, ``link``, ``stream``, ``peer``); never keys, nonces or payloads.
"""

from typing import Any, Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)
from zope.interface import implementer

LEVELS = {
    "err": LogLevel.error, "error": LogLevel.error,
    "warn": LogLevel.warn, "warning": LogLevel.warn,
    "info": LogLevel.info,
    "debug": LogLevel.debug,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


@implementer(ILogObserver)
class _ToGlobal:
    """Forward to whatever the global publisher is at the time of the event."""

    def __call__(self, event: Any) -> None:
        globalLogPublisher(event)


_filtered = FilteringLogObserver(_ToGlobal(), [_predicate])


def set_level(name: str) -> None:
    """Set the minimum level of tigertunnel's log events.

    :param name: ``err``, ``warn``, ``info`` or ``debug``.
    :raises KeyError: unknown level name.
    """
    _predicate.setLogLevelForNamespace("", LEVELS[name])


def logger(namespace: str) -> Logger:
    """Return a logger for ``namespace`` that honours ``--log-level``."""
    return Logger(namespace=namespace, observer=_filtered)


class LogRateLimit:
    """Lets at most ``burst`` log lines of a kind through per interval and
    counts the rest.

    For events an attacker can repeat at will (failed handshakes): the first
    ``burst`` of an interval are logged in full, the others only counted,
    and the next line logged says how many were left out.

    :param interval: the length of a window, in seconds.
    :param burst: lines allowed per window.
    """

    def __init__(self, interval: float, burst: int = 1) -> None:
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.interval = interval
        self.burst = burst
        self._window: Optional[float] = None
        self._used = 0
        self._held = 0

    def allow(self, now: float) -> Optional[int]:
        """Whether to log an event happening at ``now``.

        :returns: ``None`` to leave it out (it is counted), else the number
            of events left out since the last line logged.
        """
        if self._window is None or now - self._window >= self.interval:
            self._window = now
            self._used = 0
        if self._used >= self.burst:
            self._held += 1
            return None
        self._used += 1
        held, self._held = self._held, 0
        return held


#: Minimum seconds between two reports of connections closed for lack of
#: file descriptors.
EMFILE_REPORT_INTERVAL = 10.0


@implementer(ILogObserver)
class AcceptErrorLimiter:
    """Rate-limit Twisted's per-connection accept-error messages.

    When a listener runs out of descriptors (EMFILE), Twisted's ``tcp.Port``
    closes every waiting connection through a reserved descriptor and logs up
    to three info lines per connection, bypassing ``--log-level``. This
    observer counts those events and lets one warning through at most every
    :data:`EMFILE_REPORT_INTERVAL` seconds; everything else passes.
    """

    def __init__(self, forward: Any, clock: Any = None) -> None:
        import time
        self._forward = forward
        self._now = clock.seconds if clock is not None else time.monotonic
        self._last = -EMFILE_REPORT_INTERVAL
        self._closed = 0
        self._log = Logger(namespace="tigertunnel.listeners", observer=_filtered)

    def __call__(self, event: Any) -> None:
        fmt = event.get("log_format") or ""
        if "EMFILE" not in fmt and not fmt.startswith("Could not accept new connection"):
            self._forward(event)
            return
        if "Closed socket" in fmt or fmt.startswith("Could not accept"):
            self._closed += 1
        now = self._now()
        if now - self._last >= EMFILE_REPORT_INTERVAL and self._closed:
            self._last = now
            closed, self._closed = self._closed, 0
            self._log.warn("out of file descriptors: closed {count} new "
                           "connections at once since the last report; raise "
                           "the descriptor limit (ulimit -n, LimitNOFILE=) or "
                           "lower -m", count=closed)


def limit_accept_errors() -> None:
    """Route ``twisted.internet.tcp.Port``'s log through :class:`AcceptErrorLimiter`.

    Twisted looks its ``_logger`` class attribute up on every event, so this
    works under ``twistd`` and in the console script alike. (``_logger`` is
    private to Twisted; tests/integration/test_emfile.py would catch a change.)
    """
    from twisted.internet import tcp

    current = tcp.Port._logger
    if isinstance(current.observer, AcceptErrorLimiter):
        return
    tcp.Port._logger = Logger(namespace=current.namespace,
                              observer=AcceptErrorLimiter(_ToGlobal()))


class _PortChatter:
    """Stands in for ``twisted.python.log`` inside ``twisted.internet.tcp``.

    Twisted's TCP ports announce themselves with the legacy ``log.msg``
    (``"EchoFactory starting on 3000"``, ``"(TCP Port 3000 Closed)"``), which
    goes straight to the global publisher at info level, whatever
    ``--log-level`` says. Here ``msg`` goes through our level filter, under
    the namespace ``twisted.internet.tcp``; everything else (``err``,
    ``deferr`` ...) is the real module's.
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self._log = Logger(namespace="twisted.internet.tcp", observer=_filtered)

    def msg(self, *message: Any, **fields: Any) -> None:
        """Log a legacy message at info level, through the level filter."""
        self._log.info("{text}", text=" ".join(str(m) for m in message))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def filter_port_messages() -> None:
    """Make Twisted's TCP port start/stop lines follow ``--log-level``.

    Replaces the ``log`` module reference of ``twisted.internet.tcp`` (a
    name private to Twisted, looked up at every call, like ``tcp.Port._logger``
    in :func:`limit_accept_errors`; ``tests/test_logs.py`` would catch a
    change) with :class:`_PortChatter`. Idempotent.
    """
    from twisted.internet import tcp

    current = getattr(tcp, "log", None)
    if current is None or isinstance(current, _PortChatter):
        return
    setattr(tcp, "log", _PortChatter(current))
