"""tigertunnel.logs: the level filter, the output formats, the rate limit and
the accept-error limiter."""

import io
import json
import os
import re
import sys
from importlib.util import find_spec
from typing import Any, Dict, List, Tuple

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel import logs
from tigertunnel.config.model import Role
from tigertunnel.logs import (
    EMFILE_REPORT_INTERVAL,
    AcceptErrorLimiter,
    LogRateLimit,
    SyslogWriter,
    format_json,
    format_line,
    on_journal,
    output_observer,
)

#: A classic text line's timestamp, as Twisted writes it.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def event(level: Any = LogLevel.warn, **fields: Any) -> Dict[str, Any]:
    """A log event as a tigertunnel logger makes it."""
    base = {"log_level": level, "log_namespace": "tigertunnel.net.multiplexer",
            "log_format": "client {pair}: pool connection {pool_connection} lost",
            "log_time": 1796677740.25, "pair": "pair0",
            "pool_connection": "pair0/1#3"}
    base.update(fields)
    return base


class AcceptErrorLimiterTests(SynchronousTestCase):
    """Twisted's per-connection EMFILE lines become one warning per interval."""

    def setUp(self) -> None:
        self.forwarded: List[Dict[str, Any]] = []
        self.published: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.published.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.published.append)
        self.clock = Clock()
        self.limiter = AcceptErrorLimiter(self.forwarded.append, self.clock)

    def emfile_burst(self, count: int) -> None:
        port = {"log_namespace": "twisted.internet.tcp.Port"}
        self.limiter({"log_format": "EMFILE encountered; releasing reserved file descriptor.",
                      **port})
        for i in range(count):
            self.limiter({"log_format": "EMFILE recovery: Closed socket from {address}",
                          "address": ("127.0.0.1", i), **port})
        self.limiter({"log_format": "Re-reserving EMFILE recovery file descriptor.", **port})

    def warnings(self) -> List[Dict[str, Any]]:
        return [e for e in self.published
                if e.get("log_namespace") == "tigertunnel.net.listeners"]

    def test_one_warning_per_interval_with_count(self) -> None:
        """Hundreds of closed connections give one warning with their count, then silence until the interval ends."""
        self.clock.advance(100)
        self.emfile_burst(300)
        self.assertEqual(len(self.warnings()), 1)
        self.assertEqual(self.warnings()[0]["count"], 1)
        self.emfile_burst(50)
        self.assertEqual(len(self.warnings()), 1)
        self.clock.advance(EMFILE_REPORT_INTERVAL)
        self.emfile_burst(1)
        self.assertEqual(len(self.warnings()), 2)
        # Reported at the first EMFILE event of the new interval.
        self.assertEqual(self.warnings()[1]["count"], 299 + 50)
        self.assertEqual(self.forwarded, [])

    def test_other_events_pass(self) -> None:
        """Events that are not accept errors of Twisted's ports are forwarded unchanged."""
        events = [{"log_format": "TunnelFactory starting on {port}", "port": 3000,
                   "log_namespace": "twisted.internet.tcp.Port"},
                  {"log_format": "EMFILE from elsewhere", "log_namespace": "tigertunnel.x"}]
        for e in events:
            self.limiter(e)
        self.assertEqual(self.forwarded, events)
        self.assertEqual(self.warnings(), [])

    def test_in_front_of_the_output(self) -> None:
        """The observer that writes the log limits a real tcp.Port's EMFILE lines:
        a burst of them is one warning, written once."""
        self.addCleanup(logs.set_level, "info")
        logs.set_level("info")
        out = io.StringIO()
        observer = output_observer(out, "text", {})
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        from twisted.logger import Logger

        port = Logger(namespace="twisted.internet.tcp.Port")  # as tcp.Port logs
        for i in range(20):
            port.info("EMFILE recovery: Closed socket from {address}",
                      address=("127.0.0.1", i))
        text = out.getvalue()
        self.assertNotIn("Closed socket", text)
        self.assertEqual(text.count("out of file descriptors: closed 1 new connections"), 1,
                         text)


class LogRateLimitTests(SynchronousTestCase):
    """At most ``burst`` lines per interval; the next line learns how many were left out."""

    def test_burst_then_count(self) -> None:
        """Of 10 events in one window, 3 pass; the first event of the next window reports 7 held back."""
        limit = LogRateLimit(10.0, burst=3)
        said = [limit.allow(1.0 + i * 0.1) for i in range(10)]
        self.assertEqual(said, [0, 0, 0] + [None] * 7)
        self.assertEqual(limit.allow(11.0), 7)
        self.assertEqual(limit.allow(11.5), 0)

    def test_quiet_source(self) -> None:
        """Events further apart than the interval all pass, reporting nothing held."""
        limit = LogRateLimit(10.0)
        self.assertEqual([limit.allow(t) for t in (0.0, 10.0, 25.0, 40.0)], [0, 0, 0, 0])

    def test_bad_burst(self) -> None:
        """A burst below 1 is refused, naming the value."""
        error = self.assertRaises(ValueError, LogRateLimit, 1.0, 0)
        self.assertIn("0", str(error))


class PortMessageTests(SynchronousTestCase):
    """Twisted's TCP port start/stop lines follow --log-level."""

    def listen_and_stop(self) -> List[str]:
        """Listen on a real 127.0.0.1 port and close it; return the port
        lines the output observer wrote."""
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        out = io.StringIO()
        observer = output_observer(out, "text", {})
        globalLogPublisher.addObserver(observer)
        try:
            port = reactor.listenTCP(0, Factory.forProtocol(Protocol),  # type: ignore[attr-defined]
                                     interface="127.0.0.1")
            port.stopReading()
            port.connectionLost(None)  # what stopListening does once the reactor runs
        finally:
            globalLogPublisher.removeObserver(observer)
        return [line for line in out.getvalue().splitlines()
                if "starting on" in line or "Closed" in line]

    def test_quiet_at_warn(self) -> None:
        """At --log-level warn, neither the "starting on" nor the "Closed" line is written."""
        self.addCleanup(logs.set_level, "info")
        logs.set_level("warn")
        self.assertEqual(self.listen_and_stop(), [])

    def test_shown_at_info(self) -> None:
        """At info level both lines are written, as [NAMESPACE#LEVEL] like every line."""
        logs.set_level("info")
        lines = self.listen_and_stop()
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual([line.split("] ")[0].split(" [")[1] for line in lines],
                         ["log_legacy#info"] * 2, lines)


class PerKindRateLimitTests(SynchronousTestCase):
    """One window per kind of line."""

    def test_one_kind_does_not_silence_another(self) -> None:
        """A flood of one kind leaves another kind's first line through, and each counts its own held lines."""
        limit = LogRateLimit(10.0)
        self.assertEqual(limit.allow(0.0, "no pool"), 0)
        self.assertEqual([limit.allow(0.1 * i, "no pool") for i in range(1, 5)], [None] * 4)
        self.assertEqual(limit.allow(0.5, "out of fds"), 0)
        self.assertIsNone(limit.allow(0.6, "out of fds"))
        self.assertEqual(limit.allow(10.0, "no pool"), 4)
        self.assertEqual(limit.allow(10.5, "out of fds"), 1)

    def test_reset(self) -> None:
        """After reset a kind's next line passes at once."""
        limit = LogRateLimit(30.0)
        limit.allow(0.0, "k")
        self.assertIsNone(limit.allow(1.0, "k"))
        limit.reset("k")
        self.assertEqual(limit.allow(2.0, "k"), 0)


class FormatTests(SynchronousTestCase):
    """The three forms of a line: text, the journal's, JSON."""

    def test_text_has_timestamp_and_level(self) -> None:
        """A text line is Twisted's classic one: timestamp, [namespace#level], message."""
        line = format_line(event())
        assert line is not None
        self.assertRegex(line, TIMESTAMP)
        self.assertIn("[tigertunnel.net.multiplexer#warn] client pair0: pool "
                      "connection pair0/1#3 lost\n", line)

    def test_journal_priorities_and_no_timestamp(self) -> None:
        """On the journal each level gets its sd-daemon priority and no timestamp."""
        expected = {LogLevel.critical: "<2>", LogLevel.error: "<3>",
                    LogLevel.warn: "<4>", LogLevel.info: "<6>", LogLevel.debug: "<7>"}
        for level, prefix in expected.items():
            line = format_line(event(level), journal=True)
            assert line is not None
            self.assertTrue(line.startswith(prefix + "[tigertunnel.net.multiplexer#"), line)
            self.assertNotRegex(line[len(prefix):], TIMESTAMP)
        self.assertTrue(format_line({"log_format": "no level"}, journal=True)
                        .startswith("<6>"))  # type: ignore[union-attr]

    def test_journal_traceback_lines_keep_the_priority(self) -> None:
        """Every line of a logged failure carries the priority, so journalctl -p err shows it whole."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        line = format_line(event(LogLevel.critical, log_format="while testing",
                                 log_failure=failure), journal=True)
        assert line is not None
        rows = line.rstrip("\n").split("\n")
        self.assertGreater(len(rows), 2)
        self.assertTrue(all(row.startswith("<2>") for row in rows), rows)
        self.assertIn("ZeroDivisionError", rows[-1])

    def test_json_is_flat_with_fields(self) -> None:
        """A JSON line holds time, level, namespace, message and the event's fields."""
        record = json.loads(format_json(event(role=Role.CLIENT, count=3)))
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "tigertunnel.net.multiplexer")
        self.assertEqual(record["message"], "client pair0: pool connection pair0/1#3 lost")
        self.assertEqual(record["time"], "2026-12-07T21:09:00.250000+00:00")
        self.assertEqual((record["pair"], record["pool_connection"], record["count"]),
                         ("pair0", "pair0/1#3", 3))
        self.assertEqual(record["role"], str(Role.CLIENT))
        self.assertTrue(all(not isinstance(v, (dict, list)) for v in record.values()))

    def test_json_leaves_out_objects_and_keeps_big_ids_exact(self) -> None:
        """Objects are left out (the message renders them), u64 ids are strings, and a field cannot overwrite a reserved key."""
        logged = event(log_format="key {key_id} on {obj}", key_id=1796677740593560132,
                       obj=object(), message="spoof", ratio=float("nan"))
        logged["level"] = "spoof"
        record = json.loads(format_json(logged))
        self.assertEqual(record["key_id"], "1796677740593560132")
        self.assertNotIn("obj", record)
        self.assertEqual(record["level"], "warn")
        self.assertTrue(record["message"].startswith("key 1796677740593560132 on <object"))
        self.assertEqual(record["ratio"], "nan")
        self.assertNotIn("log_format", record)

    def test_json_on_the_journal(self) -> None:
        """On the journal a JSON line gets the priority in front and still parses after it."""
        line = format_line(event(LogLevel.error), "json", journal=True)
        assert line is not None
        self.assertTrue(line.startswith("<3>{"))
        self.assertEqual(json.loads(line[3:])["level"], "error")


class JournalStreamTests(SynchronousTestCase):
    """JOURNAL_STREAM decides the journal form, by the stream's device and inode."""

    def stream(self) -> Tuple[Any, str]:
        path = self.mktemp()
        f = open(path, "w")
        self.addCleanup(f.close)
        info = os.fstat(f.fileno())
        return f, f"{info.st_dev}:{info.st_ino}"

    def test_matching_stream(self) -> None:
        """The stream whose DEVICE:INODE JOURNAL_STREAM names is the journal; another is not."""
        f, ident = self.stream()
        other, _ = self.stream()
        self.assertTrue(on_journal(f, {"JOURNAL_STREAM": ident}))
        self.assertFalse(on_journal(other, {"JOURNAL_STREAM": ident}))
        self.assertFalse(on_journal(f, {}))
        for bad in ("", "12", "a:b", "1:2:3"):
            self.assertFalse(on_journal(f, {"JOURNAL_STREAM": bad}), bad)
        self.assertFalse(on_journal(io.StringIO(), {"JOURNAL_STREAM": ident}))

    def test_observer_writes_the_journal_form(self) -> None:
        """The output observer writes <N> lines to the journal stream, timestamped text elsewhere."""
        f, ident = self.stream()
        output_observer(f, "text", {"JOURNAL_STREAM": ident})(event())
        f.flush()
        with open(f.name) as r:
            self.assertEqual(r.read(), "<4>[tigertunnel.net.multiplexer#warn] client "
                                       "pair0: pool connection pair0/1#3 lost\n")
        plain = io.StringIO()
        output_observer(plain, "text", {"JOURNAL_STREAM": ident})(event())
        self.assertRegex(plain.getvalue(), TIMESTAMP)


class OutputLevelTests(SynchronousTestCase):
    """The output observer applies --log-level to every namespace, Twisted's too."""

    def test_twisted_lines_follow_the_level(self) -> None:
        """At warn, Twisted's 'reactor class' and 'Main loop terminated.' lines are not written; warnings are."""
        self.addCleanup(logs.set_level, "info")
        out = io.StringIO()
        observer = output_observer(out, "text", {})
        logs.set_level("warn")
        observer({"log_level": LogLevel.info, "log_format": "reactor class: {r}.",
                  "r": "x", "log_namespace": "twisted.scripts._twistd_unix.UnixAppLogger"})
        observer({"log_level": LogLevel.info, "log_format": "Main loop terminated.",
                  "log_namespace": "twisted.internet.base"})
        observer(event(LogLevel.warn))
        self.assertEqual(len(out.getvalue().splitlines()), 1)
        self.assertIn("lost", out.getvalue())
        logs.set_level("info")
        observer({"log_level": LogLevel.info, "log_format": "Main loop terminated.",
                  "log_namespace": "twisted.internet.base"})
        self.assertIn("Main loop terminated.", out.getvalue())


class SyslogTests(SynchronousTestCase):
    """twistd --syslog: each line at its level's priority."""

    def test_priorities(self) -> None:
        """Warnings go out at LOG_WARNING, errors at LOG_ERR, info at LOG_INFO, one call per line."""
        import syslog

        sent: List[Tuple[int, str]] = []
        writer = SyslogWriter("text", lambda p, line: sent.append((p, line)),
                              syslog.LOG_DAEMON)
        writer(event(LogLevel.warn))
        writer(event(LogLevel.error, log_format="a\nb"))
        writer(event(LogLevel.info))
        self.assertEqual([p for p, _ in sent],
                         [syslog.LOG_WARNING | syslog.LOG_DAEMON,
                          syslog.LOG_ERR | syslog.LOG_DAEMON,
                          syslog.LOG_ERR | syslog.LOG_DAEMON,
                          syslog.LOG_INFO | syslog.LOG_DAEMON])
        self.assertEqual(sent[0][1], "[tigertunnel.net.multiplexer#warn] client pair0: "
                                     "pool connection pair0/1#3 lost")

    def test_json(self) -> None:
        """With --log-format json the syslog message is the JSON object."""
        sent: List[Tuple[int, str]] = []
        SyslogWriter("json", lambda p, line: sent.append((p, line)), 0)(event())
        self.assertEqual(json.loads(sent[0][1])["pair"], "pair0")


class TwistdObserverTests(SynchronousTestCase):
    """What twistd gets as its log observer."""

    def test_syslog(self) -> None:
        """twistd --syslog --prefix P opens syslog as P (facility user) and sends at the level's priority, through the level filter."""
        import syslog

        opened: List[Tuple[Any, ...]] = []
        sent: List[Tuple[int, str]] = []
        self.patch(syslog, "openlog", lambda *args: opened.append(args))
        self.patch(syslog, "syslog", lambda p, line: sent.append((p, line)))
        self.addCleanup(logs.set_level, "info")
        logs.set_level("warn")
        observer = logs.twistd_observer({"syslog": True, "prefix": "tt-client"}, "text")
        observer(event(LogLevel.info))
        observer(event(LogLevel.warn))
        self.assertEqual(opened, [("tt-client", 0, syslog.LOG_USER)])
        self.assertEqual([p for p, _ in sent], [syslog.LOG_WARNING | syslog.LOG_USER])

    def test_named_factory(self) -> None:
        """use_for_twistd names a factory twistd can import; a --logger of the user's is kept."""
        options: Dict[str, Any] = {"logger": None, "logfile": "-", "nodaemon": True}
        logs.use_for_twistd(options, "json")
        self.assertIs(namedAny(options["logger"]), logs.twistd_log_observer)
        theirs = {"logger": "my.observer"}
        logs.use_for_twistd(theirs, "json")
        self.assertEqual(theirs["logger"], "my.observer")

    def test_log_file(self) -> None:
        """--logfile FILE gets the chosen format in that file."""
        import signal

        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        path = os.path.abspath(self.mktemp())
        observer = logs.twistd_observer({"logfile": path}, "json")
        self.addCleanup(observer.forward._observer._outFile.close)  # type: ignore[attr-defined]
        observer(event())
        with open(path) as f:
            self.assertEqual(json.loads(f.readline())["pool_connection"], "pair0/1#3")

    def test_stdout_needs_nodaemon(self) -> None:
        """--logfile=- without -n stops start-up, as twistd does."""
        self.assertRaises(SystemExit, logs.twistd_observer, {"logfile": "-"}, "text")
        self.assertIs(logs.twistd_observer({"logfile": "-", "nodaemon": True},
                                           "text").forward._observer._outFile,  # type: ignore[attr-defined]
                      sys.stdout)


class NamespaceTests(SynchronousTestCase):
    """Log namespaces name modules."""

    def test_every_namespace_is_a_module(self) -> None:
        """Each logger(...) and namespace string in the package names a module that exists."""
        root = os.path.dirname(logs.__file__)
        pattern = re.compile(r'(?:logger\(|namespace=|NAMESPACE = |"log_namespace":\s*)"([\w.]+)"')
        found = []
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(folder, name)) as f:
                        found += [(name, n) for n in pattern.findall(f.read())]
        self.assertGreater(len(found), 3)
        missing = [(where, n) for where, n in found if find_spec(n) is None]
        self.assertEqual(missing, [])
