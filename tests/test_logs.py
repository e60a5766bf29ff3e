"""tigertunnel.logs: the level filter and the accept-error limiter."""

from typing import Any, Dict, List

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.logs import EMFILE_REPORT_INTERVAL, AcceptErrorLimiter


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
                if e.get("log_namespace") == "tigertunnel.listeners"]

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
