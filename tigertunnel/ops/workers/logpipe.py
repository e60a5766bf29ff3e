"""A worker's log, carried to its supervisor as JSON lines.

A worker logs through :func:`worker_log_observer`: each event becomes one
JSON line (``eventAsJSON``) on its standard output, written without ever
blocking the worker. When the worker serves it publishes the ready event
(:func:`announce_ready`), which the supervisor takes as "up" and does not
log.

The supervisor reads the worker's standard output and error through a
:class:`LineBuffer` and turns each line into an event (:func:`decode_line`):
a line of ours is the worker's event as it was logged; any other text (a
traceback, a start-up error of the console script) becomes an event of its
own, at error level when it is a ``tigertunnel: error:`` line, else a
warning. Nothing here raises on odd input.
"""

import errno
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

#: The field of the event a worker publishes once it serves.
READY_FIELD = "tigertunnel_worker_ready"
#: The field of the event with a worker's figures (:func:`report_figures`).
FIGURES_FIELD = "tigertunnel_worker_figures"
#: Longest line kept from a worker's output.
MAX_LINE = 64 * 1024
#: Log bytes a worker holds while its supervisor does not read; past that,
#: lines are dropped (and counted) rather than stalling the worker.
LOG_BUFFER_LIMIT = 1 << 20
#: The namespace of the events this package makes up (the ready event,
#: text lines of a worker).
NAMESPACE = "tigertunnel.workers"

_LEVELS = tuple(LogLevel.iterconstants())


@implementer(ILogObserver)
class JSONLinesObserver:
    """Write each event as one JSON line to a worker's standard output.

    Writes never block: the descriptor is non-blocking, what the supervisor
    has not read yet is held up to :data:`LOG_BUFFER_LIMIT` bytes, and lines
    beyond that are dropped and counted in the next line that gets through.
    A failure's traceback is turned into text first (JSON cannot carry it).

    :ivar dropped: lines dropped since the last note about dropped lines.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self._pending = bytearray()
        self.dropped = 0

    def __call__(self, event: LogEvent) -> None:
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            event = dict(event)
            del event["log_failure"]
            event["log_format"] = (str(event.get("log_format") or "")
                                   + "\n{log_traceback}")
            event["log_traceback"] = failure.getTraceback()
        try:
            line = eventAsJSON(event).encode("utf-8") + b"\n"
        except (TypeError, ValueError, RecursionError):
            return
        self.flush()
        if self.dropped and len(self._pending) < LOG_BUFFER_LIMIT // 2:
            note = {"log_level": LogLevel.warn, "log_namespace":
                    "tigertunnel.ops.workers", "log_format": "{count} log lines "
                    "dropped: the supervisor was not reading",
                    "count": self.dropped, "log_time": event.get("log_time", 0)}
            self._pending += eventAsJSON(note).encode("utf-8") + b"\n"
            self.dropped = 0
        if len(self._pending) + len(line) > LOG_BUFFER_LIMIT:
            self.dropped += 1
        else:
            self._pending += line
        self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now."""
        while self._pending:
            try:
                n = os.write(self._fd, self._pending)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self._pending.clear()  # supervisor gone: nobody to tell
                return
            del self._pending[:n]


def worker_log_observer(fd: Optional[int] = None) -> JSONLinesObserver:
    """The log observer of a worker: JSON lines on ``fd`` (its standard output)."""
    return JSONLinesObserver(sys.stdout.fileno() if fd is None else fd)


def announce_ready(publish: Callable[[LogEvent], None] = globalLogPublisher) -> None:
    """In a worker: tell the supervisor this worker serves (whatever the
    log level; the supervisor does not log it)."""
    publish({READY_FIELD: True, "log_level": LogLevel.info,
             "log_namespace": NAMESPACE, "log_format": "ready",
             "log_time": 0.0})


def report_figures(figures: Dict[str, Any],
                   publish: Callable[[LogEvent], None] = globalLogPublisher) -> None:
    """In a worker: send a part of its report
    (:func:`tigertunnel.ops.figures.report_parts`) to the supervisor.

    Like the ready event it bypasses the log level, and the supervisor keeps
    it instead of logging it.
    """
    publish({FIGURES_FIELD: figures, "log_level": LogLevel.info,
             "log_namespace": NAMESPACE, "log_format": "figures",
             "log_time": 0.0})


def figures_of(event: LogEvent) -> Optional[Dict[str, Any]]:
    """The figures a worker's event carries, or ``None`` for any other event."""
    figures = event.get(FIGURES_FIELD)
    return figures if isinstance(figures, dict) else None


class LineBuffer:
    """Cuts a worker's output, per descriptor, into lines.

    A line longer than :data:`MAX_LINE` is cut there rather than held.
    """

    def __init__(self) -> None:
        self._partial: Dict[int, bytes] = {1: b"", 2: b""}

    def feed(self, fd: int, data: bytes) -> List[bytes]:
        """Return the non-blank lines ``data`` completes on ``fd``."""
        *lines, rest = (self._partial.get(fd, b"") + data).split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        return [line for line in lines if line.strip()]

    def close(self) -> List[Tuple[int, bytes]]:
        """Return the unfinished last line of each descriptor, as ``(fd, line)``."""
        rest = [(fd, line) for fd, line in self._partial.items() if line.strip()]
        self._partial = {}
        return rest


def _is_level(value: Any) -> bool:
    return any(value is level for level in _LEVELS)


def decode_line(fd: int, line: bytes, now: float) -> LogEvent:
    """The event one line of a worker's output stands for.

    :param fd: 1 (standard output, where a worker's JSON events go) or 2.
    :param now: the ``log_time`` of an event made up for a text line.
    """
    text = line.decode("utf-8", "replace")
    if fd == 1:
        try:
            event = eventFromJSON(text)
        except Exception:  # any JSON, however odd, must not stop the relay
            event = None
        if isinstance(event, dict) and (event.get(READY_FIELD) is True
                                        or _is_level(event.get("log_level"))):
            return event
    level = (LogLevel.error if text.startswith("tigertunnel: error:")
             else LogLevel.warn)
    return {"log_level": level, "log_namespace": NAMESPACE,
            "log_format": "{line}", "line": text, "log_time": now}


def is_ready(event: LogEvent) -> bool:
    """Whether ``event`` is a worker's announcement that it serves."""
    return event.get(READY_FIELD) is True


def worker_system(index: int, event: LogEvent) -> str:
    """The ``log_system`` of a relayed event: ``worker I/namespace#level``."""
    return (f"worker {index}/{event.get('log_namespace', '-')}"
            f"#{event['log_level'].name}")
