"""Tests for how a tunnel server admits pending handshakes and logs failed ones under a flood.

Pool connections are real TunnelProtocols built by the server's factory
with source addresses, on StringTransports (:class:`tests.test_protocols.Ends`).
"""

from typing import List, Optional, Tuple

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.memnet import psk_store
from tests.test_protocols import Ends
from tigertunnel.net.admission import DEFAULT_GRACE, DEFAULT_MAX_PENDING, DEFAULT_PER_GROUP
from tigertunnel.net.multiplexer import HANDSHAKE_LOG_BURST, HANDSHAKE_LOG_INTERVAL
from tigertunnel.stats import HandshakeFailure
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.wire.handshake import ClientHandshake


class WaitingSocket:
    """The socket of a :class:`QueuedTransport`: what the kernel holds
    and the reactor has not read yet, and ``recv`` as a non-blocking socket
    answers it."""

    def __init__(self) -> None:
        self.waiting = bytearray()
        self.recvs = 0

    def recv(self, size: int) -> bytes:
        self.recvs += 1
        if not self.waiting:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        data = bytes(self.waiting[:size])
        del self.waiting[:size]
        return data


class QueuedTransport(StringTransport):
    """A StringTransport with a receive queue the reactor has not read yet."""

    def __init__(self) -> None:
        super().__init__()
        self.socket = WaitingSocket()


def connect(ends: Ends, host: str, port: int,
            transport: Optional[StringTransport] = None,
            ) -> Tuple[TunnelProtocol, StringTransport]:
    """A TCP connection from ``host:port`` accepted by the tunnel server."""
    address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
    connection = ends.server.tunnel_factory.buildProtocol(address)
    transport = transport if transport is not None else StringTransport()
    connection.makeConnection(transport)
    return connection, transport


def hello(ends: Ends) -> bytes:
    """A fresh ClientHello for the test key."""
    return ClientHandshake(*psk_store().first(), now=ends.clock.seconds).start()


def gone(transport: StringTransport) -> bool:
    """Whether the server closed or aborted this connection."""
    return bool(transport.disconnecting or getattr(transport, "disconnected", False))


class FloodTests(SynchronousTestCase):
    """A burst of silent connects from one address does not keep others out."""

    def test_silent_flood_spares_others(self) -> None:
        """500 silent connects from one address evict only that address's silent connections: a client that sent half its hello and one connecting during the flood both complete their handshakes."""
        ends = Ends()
        first = hello(ends)
        early, early_t = connect(ends, "10.0.0.1", 1000)
        early.dataReceived(first[:30])
        flood: List[StringTransport] = []
        late = None
        for n in range(500):
            flood.append(connect(ends, "10.0.0.2", 2000 + n)[1])
            if n == 250:
                late = connect(ends, "10.0.0.3", 1001)
        assert late is not None
        late_conn, late_t = late
        self.assertFalse(gone(early_t) or gone(late_t))
        self.assertEqual(sum(not gone(t) for t in flood), DEFAULT_PER_GROUP)
        self.assertEqual(ends.server.evictions, 500 - DEFAULT_PER_GROUP)
        self.assertEqual(ends.server.stats.handshake_evictions, 500 - DEFAULT_PER_GROUP)
        early.dataReceived(first[30:])
        late_conn.dataReceived(hello(ends))
        self.assertTrue(early.established and late_conn.established)
        self.assertEqual(len(ends.server.pending), DEFAULT_PER_GROUP)

    def test_total_cap_from_many_sources(self) -> None:
        """Past the total cap, fresh connections go from the groups holding most (silent ones there), not the one-connection groups whose connection sent a byte."""
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


class SharedAddressTests(SynchronousTestCase):
    """A client that shares the flooder's address, or its IPv6 /64, is not the one evicted."""

    def test_hello_waiting_unread_is_handled_not_evicted(self) -> None:
        """A connection whose whole hello is in its receive queue, unread by the reactor, is read and established when 500 silent connects from its own address would evict it."""
        ends = Ends()
        transport = QueuedTransport()
        client, _ = connect(ends, "127.0.0.1", 1000, transport)
        transport.socket.waiting += hello(ends)
        flood = [connect(ends, "127.0.0.1", 2000 + n)[1] for n in range(500)]
        self.assertTrue(client.established)
        self.assertFalse(gone(transport))
        self.assertEqual(sum(not gone(t) for t in flood), DEFAULT_PER_GROUP)
        self.assertNotIn(client, ends.server.pending)

    def test_silent_connection_read_once_then_evicted(self) -> None:
        """A pick with nothing waiting is read once and evicted."""
        ends = Ends()
        transport = QueuedTransport()
        connect(ends, "127.0.0.1", 1000, transport)
        for n in range(DEFAULT_PER_GROUP):
            connect(ends, "127.0.0.1", 2000 + n)
        self.assertTrue(gone(transport))
        self.assertEqual(transport.socket.recvs, 1)

    def test_renewed_stallers_do_not_hold_a_client_out(self) -> None:
        """64 one-byte stallers from 4 addresses fill the table: once they are past the grace a new client's silent connection is admitted and completes, a staller goes instead."""
        ends = Ends()
        stallers = []
        for n in range(DEFAULT_MAX_PENDING):
            connection, transport = connect(ends, f"127.0.0.{2 + n % 4}", 3000 + n)
            connection.dataReceived(b"\x02")
            stallers.append(transport)
        ends.clock.advance(DEFAULT_GRACE)
        client, client_t = connect(ends, "127.0.0.1", 1000)
        self.assertFalse(gone(client_t))
        self.assertEqual(sum(gone(t) for t in stallers), 1)
        client.dataReceived(hello(ends))
        self.assertTrue(client.established)

    def test_ipv6_64_is_one_group(self) -> None:
        """500 silent connects from 500 addresses of one IPv6 /64 keep only 16 pending; a client from another /64 that sent half its hello completes it."""
        ends = Ends()
        data = hello(ends)
        client, client_t = connect(ends, "2001:db8:0:2::7", 1000)
        client.dataReceived(data[:30])
        flood = [connect(ends, f"2001:db8:0:1::{n + 1:x}", 2000)[1] for n in range(500)]
        self.assertEqual(sum(not gone(t) for t in flood), DEFAULT_PER_GROUP)
        self.assertFalse(gone(client_t))
        client.dataReceived(data[30:])
        self.assertTrue(client.established)


class FailureLogTests(SynchronousTestCase):
    """Failed handshakes are all counted but not all logged."""

    def test_junk_flood_logs_bounded(self) -> None:
        """200 junk hellos within 10 s: all counted, at most HANDSHAKE_LOG_BURST lines; the next line says how many were left out."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        ends = Ends()
        junk = bytearray(hello(ends))
        junk[-1] ^= 1  # a known key id, a bad hash
        for n in range(200):
            connection, _ = connect(ends, "10.0.0.9", n)
            connection.dataReceived(bytes(junk))
        self.assertEqual(ends.server.stats.handshake_failures[HandshakeFailure.BAD_HASH], 200)
        lines = [e for e in events if "handshake failed" in e.get("log_format", "")]
        self.assertEqual(len(lines), HANDSHAKE_LOG_BURST)
        ends.clock.advance(HANDSHAKE_LOG_INTERVAL)
        connection, _ = connect(ends, "10.0.0.9", 999)
        connection.dataReceived(bytes(junk))
        lines = [e for e in events if "handshake failed" in e.get("log_format", "")]
        self.assertEqual(len(lines), HANDSHAKE_LOG_BURST + 1)
        self.assertEqual(lines[-1]["held"], 200 - HANDSHAKE_LOG_BURST)
        self.assertIn(f"{200 - HANDSHAKE_LOG_BURST} handshake failures before this one "
                      f"not logged", lines[-1]["more"])
