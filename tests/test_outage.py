"""A tunnel client that cannot reach its server logs the outage, not every retry."""

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.memnet import Tunnel
from tigertunnel.net.outage import SUMMARY_INTERVAL, PoolOutage


class PoolOutageTests(SynchronousTestCase):
    """The outage bookkeeping alone."""

    def test_first_summary_recovered(self) -> None:
        """The first failure is reported, then one summary per interval, then the recovery."""
        outage = PoolOutage()
        kinds = []
        for second in range(0, 65):
            report = outage.failed(float(second), "refused", 1.0)
            if report is not None:
                kinds.append((report.kind, report.attempts, report.seconds))
        self.assertEqual(kinds, [("first", 1, 0.0), ("summary", 31, 30.0),
                                 ("summary", 61, 60.0)])
        recovered = outage.recovered(70.0)
        assert recovered is not None
        self.assertEqual((recovered.kind, recovered.attempts, recovered.seconds),
                         ("recovered", 65, 70.0))
        self.assertIsNone(outage.recovered(71.0))
        self.assertEqual(outage.failed(80.0, "refused", 1.0).kind, "first")  # type: ignore[union-attr]


class UnreachableServerTests(SynchronousTestCase):
    """A client pair whose server is down, on the in-memory network."""

    def test_few_lines_while_down_and_one_when_up(self) -> None:
        """With 4 slots retrying for 65 s the pair logs 1 line + 2 summaries, and one line once up."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        t = Tunnel(pool_size=4)
        del t.net.listeners[t.server_addr]  # the server is down
        t.client.startService()
        for _ in range(650):
            t.net.advance(0.1)
        lines = [e for e in events if e.get("log_namespace") == "tigertunnel.net.multiplexer"
                 and "connect" in e.get("log_format", "")]
        self.assertEqual(len(lines), 3, [e["log_format"] for e in lines])
        self.assertIn("cannot connect pool connection", lines[0]["log_format"])
        self.assertGreater(lines[2]["attempts"], 4 * 6)
        t.net.listen(t.server_addr, t.server.tunnel_factory)
        t.server.startService()
        for _ in range(150):
            t.net.advance(0.1)
        up = [e for e in events if "up again" in e.get("log_format", "")]
        self.assertEqual(len(up), 1)
        self.assertTrue(t.client.pool_connections)
        self.assertEqual(SUMMARY_INTERVAL, 30.0)
