"""Logging for tigertunnel: one level filter, the output formats, one rate limit.

Every module gets its logger from :func:`logger` (``logger(__name__)``: the
namespace of a line is the module that logs it); those loggers publish
through a single :class:`~twisted.logger.FilteringLogObserver` whose level ``--log-level``
sets. The observer that writes the log (:func:`output_observer`, which
``twistd`` gets through :func:`twistd_log_observer` and the console
script builds itself) applies the same level to every event, Twisted's own
start-up and shutdown lines included, and writes one of:

* ``text``: ``TIME [NAMESPACE#LEVEL] MESSAGE``, Twisted's classic lines;
* ``json`` (``--log-format json``): one flat JSON object per event,
  :func:`format_json`;

and, when the output is the journal (``JOURNAL_STREAM`` names the stream
written to, :func:`on_journal`), no timestamp and an sd-daemon ``<N>``
priority in front of every line (:data:`PRIORITIES`), so ``journalctl -p
warning`` filters. Under ``twistd --syslog`` the lines go to syslog with the
same priorities. Log events carry named fields (``pair``,
``pool_connection``, ``stream``, ``peer``); never keys, nonces or payloads.

Repeatable lines are rate limited by :class:`LogRateLimit`, which keeps one
window per kind of line so that one kind never silences another.
"""

import enum
import json
import os
import signal
import sys
from datetime import datetime, timezone
from typing import IO, Any, Callable, Dict, Hashable, List, Mapping, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    eventAsText,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from zope.interface import implementer

LEVELS = {
    "err": LogLevel.error, "error": LogLevel.error,
    "warn": LogLevel.warn, "warning": LogLevel.warn,
    "info": LogLevel.info,
    "debug": LogLevel.debug,
}

#: The namespace of the events of Twisted's legacy ``log.msg``.
LEGACY = "log_legacy"

#: ``--log-format`` values.
FORMATS = ("text", "json")

#: The syslog priority of each level (sd-daemon(3)'s ``<N>`` prefixes).
PRIORITIES = {
    LogLevel.critical: 2, LogLevel.error: 3, LogLevel.warn: 4,
    LogLevel.info: 6, LogLevel.debug: 7,
}

#: The environment variable systemd sets to ``DEVICE:INODE`` of the
#: journal stream it connected to standard output and error.
JOURNAL_STREAM_ENV = "JOURNAL_STREAM"

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


@implementer(ILogObserver)
class _ToGlobal:
    """Forward to whatever the global publisher is at the time of the event."""

    def __call__(self, event: Any) -> None:
        globalLogPublisher(event)


_filtered = FilteringLogObserver(_ToGlobal(), [_predicate])


def set_level(name: str) -> None:
    """Set the minimum level of the log (tigertunnel's and Twisted's lines).

    :param name: ``err``, ``warn``, ``info`` or ``debug``.
    :raises KeyError: unknown level name.
    """
    _predicate.setLogLevelForNamespace("", LEVELS[name])


def logger(namespace: str) -> Logger:
    """Return a logger for ``namespace`` (a module name) that honours ``--log-level``."""
    return Logger(namespace=namespace, observer=_filtered)


# -- formats -------------------------------------------------------------------

#: Integers beyond this are written as strings in JSON (key ids are u64;
#: JSON readers such as jq keep 53 bits of an integer).
_JSON_SAFE_INT = 2 ** 53
#: The keys :func:`format_json` always writes; an event field of the same
#: name is left out.
JSON_KEYS = ("time", "level", "namespace", "message")


_LEVELS = tuple(LogLevel.iterconstants())


def _level(event: LogEvent) -> LogLevel:
    """The event's level (info when it has none)."""
    level: LogLevel = event.get("log_level", LogLevel.info)
    return level if any(level is known for known in _LEVELS) else LogLevel.info


def _json_value(value: Any) -> Any:
    """``value`` as a JSON scalar, or ``None`` to leave the field out."""
    if isinstance(value, enum.Enum):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if -_JSON_SAFE_INT < value < _JSON_SAFE_INT else str(value)
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return None


def event_fields(event: LogEvent) -> Dict[str, Any]:
    """The event's own fields that :func:`format_json` writes: scalar values
    (an enum as its text), not Twisted's ``log_*`` keys, not :data:`JSON_KEYS`."""
    fields = {}
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key in JSON_KEYS:
            continue
        if value is None:
            continue
        scalar = _json_value(value)
        if scalar is not None:
            fields[key] = scalar
    return fields


def format_json(event: LogEvent) -> str:
    """One event as one flat JSON object (no newline).

    ``time`` (ISO 8601, UTC), ``level`` (``debug`` ... ``critical``),
    ``namespace``, ``message`` (the rendered line, a traceback appended) and
    then the event's fields (:func:`event_fields`).
    """
    when = event.get("log_time")
    stamp = (datetime.fromtimestamp(when, timezone.utc).isoformat()
             if isinstance(when, (int, float)) else None)
    record: Dict[str, Any] = {
        "time": stamp, "level": _level(event).name,
        "namespace": event.get("log_namespace", "-"),
        "message": eventAsText(event, includeTimestamp=False, includeSystem=False),
    }
    record.update(event_fields(event))
    return json.dumps(record, ensure_ascii=False, default=str)


def format_line(event: LogEvent, fmt: str = "text", journal: bool = False) -> Optional[str]:
    """The text to write for ``event`` (newline-terminated), or ``None``.

    :param fmt: ``text`` or ``json`` (:data:`FORMATS`).
    :param journal: no timestamp (journald keeps its own) and the sd-daemon
        ``<N>`` priority in front of every line of it.
    """
    if event.get("log_namespace") == LEGACY and event.get("log_system") == "-":
        # A legacy log.msg outside any logging context (a port's "starting
        # on"): [log_legacy#info] like every other line, not Twisted's [-].
        event = {key: value for key, value in event.items() if key != "log_system"}
    if fmt == "json":
        body = format_json(event)
    elif journal:
        body = eventAsText(event, includeTimestamp=False)
    else:
        return formatEventAsClassicLogText(event)
    if not body:
        return None
    if not journal:
        return body + "\n"
    prefix = f"<{PRIORITIES.get(_level(event), 6)}>"
    return "".join(f"{prefix}{line}\n" for line in body.rstrip("\n").split("\n"))


def on_journal(stream: IO[str], environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` is systemd's journal stream: ``JOURNAL_STREAM``
    holds its ``DEVICE:INODE`` (systemd.exec(5)'s documented check)."""
    value = environ.get(JOURNAL_STREAM_ENV, "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def output_observer(stream: IO[Any], fmt: str = "text",
                    environ: Mapping[str, str] = os.environ) -> ILogObserver:
    """The observer that writes the log to ``stream`` in ``fmt``, at the
    ``--log-level`` (every namespace), in the journal's form when
    :func:`on_journal`, with Twisted's accept errors rate limited
    (:class:`AcceptErrorLimiter`)."""
    journal = on_journal(stream, environ)
    writer = FileLogObserver(stream, lambda event: format_line(event, fmt, journal))
    return AcceptErrorLimiter(FilteringLogObserver(writer, [_predicate]))


@implementer(ILogObserver)
class SyslogWriter:
    """Writes each event to syslog at its level's priority (:data:`PRIORITIES`).

    ``twistd --syslog`` without this gives every line ``LOG_INFO`` and every
    failure ``LOG_ALERT``.

    :param send: ``syslog.syslog`` (tests pass a recorder); called with
        ``(priority | facility, line)`` for each line of the event.
    """

    def __init__(self, fmt: str, send: Callable[[int, str], None],
                 facility: int) -> None:
        self._fmt = fmt
        self._send = send
        self._facility = facility

    def __call__(self, event: LogEvent) -> None:
        text = format_line(event, self._fmt, journal=False) if self._fmt == "json" \
            else eventAsText(event, includeTimestamp=False)
        if not text:
            return
        priority = PRIORITIES.get(_level(event), 6) | self._facility
        for line in text.rstrip("\n").split("\n"):
            self._send(priority, line)


def twistd_observer(twistd: Mapping[str, Any], fmt: str = "text") -> ILogObserver:
    """The log observer for ``twistd`` (what ``--logfile``, ``--syslog``,
    ``--prefix`` and ``-n`` ask for, as twistd itself would open it), in
    ``fmt``, filtered by ``--log-level``.

    :raises SystemExit: ``--logfile=-`` without ``-n`` (as twistd says).
    """
    if twistd.get("syslog"):
        import syslog

        syslog.openlog(twistd.get("prefix") or "twisted", 0, syslog.LOG_USER)
        return AcceptErrorLimiter(FilteringLogObserver(
            SyslogWriter(fmt, syslog.syslog, syslog.LOG_USER), [_predicate]))
    path = twistd.get("logfile") or ""
    if path == "-" and not twistd.get("nodaemon"):
        sys.exit("Daemons cannot log to stdout, exiting!")
    if path == "-" or (not path and twistd.get("nodaemon")):
        return output_observer(sys.stdout, fmt)
    from twisted.python.logfile import LogFile

    logfile = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor
            reactor.callFromThread(logfile.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)  # as twistd: SIGUSR1 rotates
    return output_observer(logfile, fmt)


#: What :func:`twistd_log_observer` builds: twistd's options and the
#: ``--log-format`` (set by :func:`use_for_twistd`).
_twistd_settings: Dict[str, Any] = {}


def use_for_twistd(twistd: Dict[str, Any], fmt: str) -> None:
    """Have twistd open its log with :func:`twistd_observer` (unless its
    ``--logger`` names another factory).

    Called while twistd parses its options: twistd then imports the factory
    it is given by name (:func:`twistd_log_observer`) and calls it when it
    starts logging, after ``makeService`` and before daemonizing.
    """
    if twistd.get("logger"):
        return
    _twistd_settings.update(twistd=twistd, fmt=fmt)
    twistd["logger"] = f"{__name__}.twistd_log_observer"


def twistd_log_observer() -> ILogObserver:
    """The factory :func:`use_for_twistd` names to twistd."""
    return twistd_observer(_twistd_settings.get("twistd", {}),
                           _twistd_settings.get("fmt", "text"))


# -- rate limit ----------------------------------------------------------------

class LogRateLimit:
    """Lets at most ``burst`` log lines of each kind through per interval and
    counts the rest.

    For events that can repeat at will (failed handshakes, refused
    sessions, evictions): the first ``burst`` of a kind in an interval are
    logged in full, the others only counted, and the next line of that kind
    says how many were left out. Each kind has its own window, so a flood of
    one kind never hides another.

    :param interval: the length of a window, in seconds.
    :param burst: lines of a kind allowed per window.
    """

    def __init__(self, interval: float, burst: int = 1) -> None:
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.interval = interval
        self.burst = burst
        #: Per kind: [window start, lines used, events held].
        self._slots: Dict[Hashable, List[float]] = {}

    def allow(self, now: float, kind: Hashable = "") -> Optional[int]:
        """Whether to log an event of ``kind`` happening at ``now``.

        :param kind: what the line is about (its format string, say): a
            fixed set chosen in the code, never a value from a peer.
        :returns: ``None`` to leave it out (it is counted), else the number
            of events of ``kind`` left out since its last line logged.
        """
        slot = self._slots.get(kind)
        if slot is None:
            slot = self._slots[kind] = [now, 0, 0]
        elif now - slot[0] >= self.interval:
            slot[0], slot[1] = now, 0
        if slot[1] >= self.burst:
            slot[2] += 1
            return None
        slot[1] += 1
        held, slot[2] = int(slot[2]), 0
        return held

    def reset(self, kind: Hashable = "") -> None:
        """Forget ``kind``'s window: its next event is logged."""
        self._slots.pop(kind, None)


#: Minimum seconds between two reports of connections closed for lack of
#: file descriptors.
EMFILE_REPORT_INTERVAL = 10.0
#: The log namespace of Twisted's TCP ports' events (a ``tcp.Port``'s
#: logger is named after its class).
PORT_NAMESPACE = "twisted.internet.tcp"


@implementer(ILogObserver)
class AcceptErrorLimiter:
    """Rate-limit Twisted's per-connection accept-error messages.

    When a listener runs out of descriptors (EMFILE), Twisted's ``tcp.Port``
    closes every waiting connection through a reserved descriptor and logs up
    to three info lines per connection. This observer, in front of the one
    that writes the log (:func:`output_observer`), counts those events
    (namespace :data:`PORT_NAMESPACE`) and publishes one warning at most
    every :data:`EMFILE_REPORT_INTERVAL` seconds; every other event is
    passed on to ``forward``.
    """

    def __init__(self, forward: Any, clock: Any = None) -> None:
        import time
        #: The observer every other event is passed on to.
        self.forward = forward
        self._now = clock.seconds if clock is not None else time.monotonic
        self._limit = LogRateLimit(EMFILE_REPORT_INTERVAL)
        self._closed = 0
        self._log = logger("tigertunnel.net.listeners")

    def __call__(self, event: Any) -> None:
        fmt = event.get("log_format") or ""
        namespace = event.get("log_namespace") or ""
        if not (namespace.startswith(PORT_NAMESPACE)
                and ("EMFILE" in fmt or fmt.startswith("Could not accept new connection"))):
            self.forward(event)
            return
        if "Closed socket" in fmt or fmt.startswith("Could not accept"):
            self._closed += 1
        if self._closed and self._limit.allow(self._now()) is not None:
            closed, self._closed = self._closed, 0
            self._log.warn("out of file descriptors: closed {count} new "
                           "connections at once since the last report; raise "
                           "the descriptor limit (ulimit -n, LimitNOFILE=) or "
                           "lower -m", count=closed)
