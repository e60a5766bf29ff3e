"""tigertunnel.logs: the level filter and the accept-error limiter."""

from typing import Any, Dict, List

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.logs import EMFILE_REPORT_INTERVAL, AcceptErrorLimiter, LogRateLimit


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
        self.limiter({"log_format": "EMFILE encountered; releasing reserved file descriptor."})
        for i in range(count):
            self.limiter({"log_format": "EMFILE recovery: Closed socket from {address}",
                          "address": ("127.0.0.1", i)})
        self.limiter({"log_format": "Re-reserving EMFILE recovery file descriptor."})

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
        """Events that are not accept errors are forwarded unchanged."""
        event = {"log_format": "TunnelFactory starting on {port}", "port": 3000}
        self.limiter(event)
        self.assertEqual(self.forwarded, [event])


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

    def listen_and_stop(self) -> List[Dict[str, Any]]:
        """Listen on a real 127.0.0.1 port and close it; return the port lines logged."""
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.testing import EventLoggingObserver

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")
        port.stopReading()
        port.connectionLost(None)  # what stopListening does once the reactor runs
        return [e for e in events if "starting on" in str(e.get("text", e.get("log_format")))
                or "Closed" in str(e.get("text", e.get("log_format")))]

    def test_quiet_at_warn(self) -> None:
        """At --log-level warn, neither the "starting on" nor the "Closed" line is published."""
        from tigertunnel import logs

        self.addCleanup(logs.set_level, "info")
        logs.filter_port_messages()
        logs.set_level("warn")
        self.assertEqual(self.listen_and_stop(), [])

    def test_shown_at_info(self) -> None:
        """At info level both lines are published, under twisted.internet.tcp."""
        from tigertunnel import logs

        logs.filter_port_messages()
        logs.set_level("info")
        lines = self.listen_and_stop()
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual({e["log_namespace"] for e in lines}, {"twisted.internet.tcp"})
