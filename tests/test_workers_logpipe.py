"""A worker's log pipe: the non-blocking JSON-lines observer and the supervisor's reading of lines."""

import os
from typing import List, Tuple

from hypothesis import given, strategies as st
from twisted.logger import LogLevel, eventAsJSON, eventFromJSON
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.ops.workers.logpipe import (
    LOG_BUFFER_LIMIT,
    MAX_LINE,
    LineBuffer,
    announce_ready,
    decode_line,
    is_ready,
    worker_log_observer,
    worker_system,
)


class WorkerLogTests(SynchronousTestCase):
    """The worker's JSON log observer on a real pipe."""

    def pipe(self) -> Tuple[int, int]:
        """A pipe closed at the end of the test: ``(read end, write end)``."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        return r, w

    def read_all(self, fd: int) -> bytes:
        """Everything that can be read from ``fd`` now."""
        os.set_blocking(fd, False)
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def test_failure_becomes_text(self) -> None:
        """A logged failure arrives as its traceback text, appended to the format."""
        r, w = self.pipe()
        observer = worker_log_observer(w)
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        observer({"log_level": LogLevel.critical, "log_namespace": "x",
                  "log_format": "while doing it", "log_failure": failure,
                  "log_time": 1.0})
        event = eventFromJSON(self.read_all(r).decode().strip())
        self.assertIn("ZeroDivisionError: division by zero", event["log_traceback"])
        self.assertEqual(event["log_format"], "while doing it\n{log_traceback}")

    def test_full_pipe_never_blocks_and_counts_drops(self) -> None:
        """With nobody reading, lines are held up to the limit, then dropped;
        once the pipe drains, a line tells how many were dropped."""
        r, w = self.pipe()
        observer = worker_log_observer(w)
        event = {"log_level": LogLevel.info, "log_namespace": "x",
                 "log_format": "x" * 1000, "log_time": 1.0}
        for _ in range(5000):  # ~5 MB: more than pipe + LOG_BUFFER_LIMIT
            observer(event)
        self.assertGreater(observer.dropped, 0)
        self.assertLessEqual(len(observer._pending), LOG_BUFFER_LIMIT)
        dropped = observer.dropped
        data, logged = b"", 5000
        for _ in range(1000):  # the supervisor reads again
            data += self.read_all(r)
            if observer.dropped == 0 and not observer._pending:
                break
            observer(event)
            logged += 1
        lines = data.decode().splitlines()
        notes = [eventFromJSON(line) for line in lines if "dropped" in line]
        self.assertEqual([n["count"] for n in notes], [dropped])
        self.assertEqual(len(lines), logged - dropped + 1)


class LineBufferTests(SynchronousTestCase):
    """Cutting a worker's output into lines."""

    @given(st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b and b.strip()),
                    max_size=8), st.lists(st.integers(0, 300), max_size=6))
    def test_any_split_gives_the_same_lines(self, lines: List[bytes], cuts: List[int]) -> None:
        """However the output is split into reads, the same non-blank lines come out, in order."""
        data = b"".join(line + b"\n" for line in lines)
        bounds = [0] + sorted(min(c, len(data)) for c in cuts) + [len(data)]
        buffer = LineBuffer()
        got: List[bytes] = []
        for a, b in zip(bounds, bounds[1:]):
            got += buffer.feed(1, data[a:b])
        self.assertEqual(got, lines)
        self.assertEqual(buffer.close(), [])

    def test_descriptors_kept_apart(self) -> None:
        """Partial lines on stdout and stderr are completed separately."""
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(1, b"out"), [])
        self.assertEqual(buffer.feed(2, b"err\nmore"), [b"err"])
        self.assertEqual(buffer.feed(1, b"put\n"), [b"output"])
        self.assertEqual(buffer.close(), [(2, b"more")])

    def test_overlong_line_cut(self) -> None:
        """A line past MAX_LINE bytes without a newline is handed on rather than held."""
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(2, b"x" * (MAX_LINE + 1)), [b"x" * (MAX_LINE + 1)])
        self.assertEqual(buffer.close(), [])


class DecodeLineTests(SynchronousTestCase):
    """What event a line of a worker's output becomes."""

    def test_json_event_kept(self) -> None:
        """A JSON event on stdout comes back as the worker logged it."""
        event = {"log_level": LogLevel.warn, "log_namespace": "tigertunnel.x",
                 "log_format": "session {stream} closed", "stream": 7, "log_time": 1.0}
        got = decode_line(1, eventAsJSON(event).encode(), now=5.0)
        self.assertEqual((got["log_level"], got["stream"], got["log_time"]),
                         (LogLevel.warn, 7, 1.0))
        self.assertEqual(worker_system(3, got), "worker 3/tigertunnel.x#warn")

    def test_text_lines(self) -> None:
        """Text becomes a warning at the current time; a console-script error line an error."""
        warn = decode_line(2, b"Traceback (most recent call last):", now=5.0)
        self.assertEqual((warn["log_level"], warn["line"], warn["log_time"]),
                         (LogLevel.warn, "Traceback (most recent call last):", 5.0))
        error = decode_line(2, b"tigertunnel: error: cannot use key file: x", now=5.0)
        self.assertEqual(error["log_level"], LogLevel.error)

    def test_json_on_stderr_is_text(self) -> None:
        """Only stdout carries events: JSON on stderr is relayed as text."""
        line = eventAsJSON({"log_level": LogLevel.info, "log_format": "x"}).encode()
        self.assertEqual(decode_line(2, line, now=0.0)["line"], line.decode())

    def test_ready_event(self) -> None:
        """The ready announcement is recognised; ordinary events and text are not."""
        lines: List[bytes] = []
        announce_ready(lambda e: lines.append(eventAsJSON(e).encode()))
        self.assertTrue(is_ready(decode_line(1, lines[0], now=0.0)))
        self.assertFalse(is_ready(decode_line(1, b'{"tigertunnel_worker_ready": 1}', now=0.0)))
        self.assertFalse(is_ready(decode_line(2, lines[0], now=0.0)))

    @given(st.binary(max_size=200))
    def test_any_bytes(self, line: bytes) -> None:
        """Any bytes give an event with a log level, never an exception."""
        event = decode_line(1, line, now=0.0)
        self.assertIn(event["log_level"], list(LogLevel.iterconstants()))
