"""Tests for how a tunnel server admits pending handshakes and logs failed ones under a flood.

Pool connections are real TunnelProtocols built by the server's factory
with source addresses, on StringTransports (:class:`tests.test_protocols.Ends`).
"""

from typing import List, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.memnet import psk_store
from tests.test_protocols import Ends
from tigertunnel.net.admission import DEFAULT_MAX_PENDING, DEFAULT_PER_SOURCE
from tigertunnel.net.multiplexer import HANDSHAKE_LOG_BURST, HANDSHAKE_LOG_INTERVAL
from tigertunnel.net.stats import HandshakeFailure
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.wire.handshake import ClientHandshake


def connect(ends: Ends, host: str, port: int) -> Tuple[TunnelProtocol, StringTransport]:
    """A TCP connection from ``host:port`` accepted by the tunnel server."""
    connection = ends.server.tunnel_factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    connection.makeConnection(transport)
    return connection, transport


def gone(transport: StringTransport) -> bool:
    """Whether the server closed or aborted this connection."""
    return bool(transport.disconnecting or getattr(transport, "disconnected", False))


class FloodTests(SynchronousTestCase):
    """A burst of silent connects from one address does not keep others out."""

    def test_silent_flood_spares_others(self) -> None:
        """500 silent connects from one address evict only that address's silent connections: a client that sent half its hello and one connecting during the flood both complete their handshakes."""
        ends = Ends()
        hello = ClientHandshake(*psk_store().first(), now=ends.clock.seconds).start()
        early, early_t = connect(ends, "10.0.0.1", 1000)
        early.dataReceived(hello[:30])
        flood: List[StringTransport] = []
        late = None
        for n in range(500):
            flood.append(connect(ends, "10.0.0.2", 2000 + n)[1])
            if n == 250:
                late = connect(ends, "10.0.0.3", 1001)
        assert late is not None
        late_conn, late_t = late
        self.assertFalse(gone(early_t) or gone(late_t))
        self.assertEqual(sum(not gone(t) for t in flood), DEFAULT_PER_SOURCE)
        self.assertEqual(ends.server.evictions, 500 - DEFAULT_PER_SOURCE)
        self.assertEqual(ends.server.stats.handshake_evictions, 500 - DEFAULT_PER_SOURCE)
        early.dataReceived(hello[30:])
        late_conn.dataReceived(ClientHandshake(*psk_store().first(),
                                               now=ends.clock.seconds).start())
        self.assertTrue(early.established and late_conn.established)
        self.assertEqual(len(ends.server.pending), DEFAULT_PER_SOURCE)

    def test_total_cap_from_many_sources(self) -> None:
        """Past the total cap the busiest source loses its oldest silent connection, never a connection that spoke."""
        ends = Ends()
        spoke = []
        for n in range(8):
            connection, transport = connect(ends, f"10.0.1.{n}", 1)
            connection.dataReceived(b"\x02")
            spoke.append(transport)
        silent = [connect(ends, f"10.0.2.{n % 7}", n)[1] for n in range(DEFAULT_MAX_PENDING)]
        self.assertEqual(len(ends.server.pending), DEFAULT_MAX_PENDING)
        self.assertFalse(any(gone(t) for t in spoke))
        self.assertEqual(sum(gone(t) for t in silent), 8)


class FailureLogTests(SynchronousTestCase):
    """Failed handshakes are all counted but not all logged."""

    def test_junk_flood_logs_bounded(self) -> None:
        """200 junk hellos within 10 s: all counted, at most HANDSHAKE_LOG_BURST lines; the next line says how many were left out."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        ends = Ends()
        hello = bytearray(ClientHandshake(*psk_store().first(), now=ends.clock.seconds).start())
        hello[-1] ^= 1  # a known key id, a bad hash
        for n in range(200):
            connection, _ = connect(ends, "10.0.0.9", n)
            connection.dataReceived(bytes(hello))
        self.assertEqual(ends.server.stats.handshake_failures[HandshakeFailure.BAD_HASH], 200)
        lines = [e for e in events if "handshake failed" in e.get("log_format", "")]
        self.assertEqual(len(lines), HANDSHAKE_LOG_BURST)
        ends.clock.advance(HANDSHAKE_LOG_INTERVAL)
        connection, _ = connect(ends, "10.0.0.9", 999)
        connection.dataReceived(bytes(hello))
        lines = [e for e in events if "handshake failed" in e.get("log_format", "")]
        self.assertEqual(len(lines), HANDSHAKE_LOG_BURST + 1)
        self.assertEqual(lines[-1]["held"], 200 - HANDSHAKE_LOG_BURST)
        self.assertIn(f"{200 - HANDSHAKE_LOG_BURST} handshake failures before this one "
                      f"not logged", lines[-1]["more"])
