"""A tunnel client that cannot reach its server logs the outage, not every retry."""

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
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


class OutageLevelTests(SynchronousTestCase):
    """The level of each line: warnings while a pair has no pool connection, info for the rest."""

    def test_no_pool_connection_warns_and_recovery_is_info(self) -> None:
        """With nothing up the first failure and the summaries are warnings; the recovery is info."""
        outage = PoolOutage()
        reports = [outage.failed(float(s), "refused", 1.0, up=0) for s in range(0, 31)]
        said = [(r.kind, r.level) for r in reports if r is not None]
        self.assertEqual(said, [("first", LogLevel.warn), ("summary", LogLevel.warn)])
        recovered = outage.recovered(40.0)
        assert recovered is not None
        self.assertEqual((recovered.kind, recovered.level, recovered.attempts),
                         ("recovered", LogLevel.info, 31))

    def test_some_slots_failing_is_info_until_none_is_up(self) -> None:
        """A slot failing while others are up is info; once none is up the next failure is a warning."""
        outage = PoolOutage()
        first = outage.failed(0.0, "refused", 1.0, up=3)
        assert first is not None
        self.assertEqual((first.kind, first.level), ("first", LogLevel.info))
        self.assertIsNone(outage.failed(1.0, "refused", 1.0, up=3))
        warned = outage.failed(2.0, "refused", 1.0, up=0)
        assert warned is not None
        self.assertEqual((warned.kind, warned.level, warned.attempts),
                         ("first", LogLevel.warn, 3))
        self.assertIsNone(outage.failed(3.0, "refused", 1.0, up=0))

    def test_losing_the_last_connection_starts_an_outage(self) -> None:
        """Losing the last pool connection is a warning, and being up again right after is one info line."""
        outage = PoolOutage()
        lost = outage.lost_last(100.0)
        self.assertEqual((lost.kind, lost.level), ("lost", LogLevel.warn))
        recovered = outage.recovered(100.5)
        assert recovered is not None
        self.assertEqual((recovered.kind, recovered.level, recovered.attempts,
                          recovered.seconds), ("recovered", LogLevel.info, 0, 0.5))
        self.assertIsNone(outage.recovered(101.0))


class OutageLineTests(SynchronousTestCase):
    """Each report is a complete log line with its fields."""

    def test_every_kind_renders(self) -> None:
        """lost, first, summary and recovered render with their own fields, naming pair and target."""
        from twisted.logger import formatEvent

        outage = PoolOutage("pair1", "10.0.0.2:3000")
        reports = [outage.lost_last(0.0, "pair1/0#4"),
                   outage.failed(0.5, "refused", 0.2, up=0, slot=3),
                   outage.failed(31.0, "timeout", 10.0, up=0, slot=1),
                   outage.recovered(40.0)]
        lines = []
        for report in reports:
            assert report is not None
            event = dict(report.fields(), log_format=report.format)
            lines.append(formatEvent(event))
            self.assertEqual((event["pair"], event["target"]), ("pair1", "10.0.0.2:3000"))
        self.assertEqual(lines, [
            "client pair1: lost its last pool connection (pair1/0#4) to 10.0.0.2:3000; "
            "new TB connections are refused until one comes back",
            "client pair1: cannot connect pool connection 3 to 10.0.0.2:3000: refused; "
            "retrying (a summary at most every 30 s)",
            "client pair1: still cannot connect to 10.0.0.2:3000: 2 failed attempts in "
            "31 s, last: timeout; next retry in 10.0 s",
            "client pair1: pool connection to 10.0.0.2:3000 up again after 40 s "
            "(2 failed connects)"])


class PairOutageLogTests(SynchronousTestCase):
    """What a client pair logs, and at which level, on the in-memory network."""

    def test_server_down_from_the_start_warns(self) -> None:
        """Unreachable from the start: the first failure and the summaries are warnings, the recovery one info line."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        t = Tunnel(pool_size=4)
        del t.net.listeners[t.server_addr]
        t.client.startService()
        for _ in range(350):
            t.net.advance(0.1)
        down = [e for e in events if e.get("log_namespace") == "tigertunnel.net.multiplexer"
                and "connect" in e.get("log_format", "")]
        self.assertEqual([e["log_level"] for e in down], [LogLevel.warn, LogLevel.warn])
        t.net.listen(t.server_addr, t.server.tunnel_factory)
        t.server.startService()
        for _ in range(150):
            t.net.advance(0.1)
        up = [e for e in events if "up again" in e.get("log_format", "")]
        self.assertEqual([e["log_level"] for e in up], [LogLevel.info])

    def test_losing_the_last_pool_connection_warns(self) -> None:
        """A pair whose pool connections are all cut warns once for the loss and once for the failed reconnect; back up, one info line."""
        t = Tunnel(pool_size=2)
        t.start()
        self.assertEqual(len(t.client.pool_connections), 2)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        del t.net.listeners[t.server_addr]  # the server is gone ...
        for connection in list(t.client.pool_connections):
            connection.transport.abortConnection()  # ... and so are its connections
        for _ in range(20):
            t.net.advance(0.1)
        warnings = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(len(warnings), 2, [e["log_format"] for e in warnings])
        self.assertIn("lost its last pool connection", warnings[0]["log_format"])
        self.assertEqual(warnings[0]["pair"], "pair0")
        self.assertIn("cannot connect", warnings[1]["log_format"])
        t.net.listen(t.server_addr, t.server.tunnel_factory)
        for _ in range(150):
            t.net.advance(0.1)
        up = [e for e in events if "up again" in e.get("log_format", "")]
        self.assertEqual([e["log_level"] for e in up], [LogLevel.info])
        self.assertEqual(len(t.client.pool_connections), 2)

    def test_stopping_does_not_warn(self) -> None:
        """A client that stops closes its pool connections without a warning."""
        t = Tunnel(pool_size=2)
        t.start()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        t.stop()
        for _ in range(20):
            t.net.advance(0.1)
        self.assertEqual([e["log_format"] for e in events
                          if e["log_level"] is LogLevel.warn], [])
