"""Tests for :mod:`tigertunnel.net.heartbeat` and the version-2 heartbeat of pool connections.

The timer alone runs on a ``Clock``; the wiring runs on the in-memory
network (:mod:`tests.memnet`), where a frozen peer is a pump that stops
moving bytes while its kernel (the other side's transport) keeps taking them.
"""

from typing import Any, List, Optional, Tuple

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import StreamData, feed, send_frame
from tests.memnet import BackendFactory, Tunnel, psk_store
from tests.strategies import make_tb_frame
from tigertunnel.net.heartbeat import TICK, Heartbeat
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.wire.codec import SERVER, PoolCodec, Pong, StreamOpened
from tigertunnel.wire.handshake import (
    SERVER_HELLO_SIZE,
    Accepted,
    ClientHandshake,
    ServerHandshake,
)
from tigertunnel.wire.liveness import DEAD_AFTER, FIRST_FRAME_WITHIN, PING_INTERVAL
from tigertunnel.wire.muxframes import FrameType, encode_header


def frame(tag: int) -> bytes:
    """A small TB frame recognisable by its tag."""
    return make_tb_frame(bytes([tag]) * 40, bytes([tag]) * 64)


class Recorder:
    """What a Heartbeat did: pings sent and the silence it reported dead."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.counter = 0
        self.pings: List[float] = []
        self.dead: List[Tuple[float, float]] = []

    def ping(self) -> None:
        self.pings.append(self.clock.seconds())

    def died(self, silence: float) -> None:
        self.dead.append((self.clock.seconds(), silence))

    def heartbeat(self, first: Optional[float] = None) -> Heartbeat:
        """A Heartbeat reading this recorder's counter."""
        return Heartbeat(self.clock, lambda: self.counter, self.ping, self.died, first)


class RawPeer(Protocol):
    """A TCP peer that records the raw bytes it receives and whether it was closed."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


def run(clock: Clock, until: float, step: float = 0.25) -> None:
    """Advance ``clock`` to ``until`` in small steps."""
    while clock.seconds() < until - 1e-9:
        clock.advance(min(step, until - clock.seconds()))


class TimerTests(SynchronousTestCase):
    """The timer on a Clock."""

    def test_silent_peer(self) -> None:
        """With no frame at all: pings at 5 s and 10 s, dead at 15 s with 15 s of silence, then no timer."""
        clock = Clock()
        rec = Recorder(clock)
        beat = rec.heartbeat()
        run(clock, 40)
        self.assertEqual(rec.pings, [PING_INTERVAL, 2 * PING_INTERVAL])
        self.assertEqual(rec.dead, [(DEAD_AFTER, DEAD_AFTER)])
        self.assertFalse(beat.running)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_traffic_keeps_it_quiet(self) -> None:
        """A counter that moves every second means no ping and no death, and one timer at a time."""
        clock = Clock()
        rec = Recorder(clock)
        rec.heartbeat()
        for second in range(60):
            rec.counter += 1
            clock.advance(1)
            self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual((rec.pings, rec.dead), ([], []))

    def test_dead_within_tick_of_deadline(self) -> None:
        """A peer last heard at 30.4 s is dead no earlier than 15 s and no later than 15 s plus one tick after that."""
        clock = Clock()
        rec = Recorder(clock)
        rec.heartbeat()
        while clock.seconds() < 30.4 - 1e-9:  # steady traffic until 30.4 s
            clock.advance(0.2)
            rec.counter += 1
        run(clock, 60)
        (when, silence), = rec.dead
        self.assertGreaterEqual(when, 30.4 + DEAD_AFTER)
        self.assertLessEqual(when, 30.4 + DEAD_AFTER + TICK)
        self.assertLessEqual(silence, DEAD_AFTER)

    def test_first_frame_deadline(self) -> None:
        """A server's first ping unanswered: dead at 5 s, with no further ping."""
        clock = Clock()
        rec = Recorder(clock)
        rec.heartbeat(first=FIRST_FRAME_WITHIN)
        run(clock, 20)
        self.assertEqual(rec.pings, [])
        self.assertEqual([when for when, _ in rec.dead], [FIRST_FRAME_WITHIN])

    def test_first_frame_answered(self) -> None:
        """Once the first frame arrived, the first-frame deadline no longer applies."""
        clock = Clock()
        rec = Recorder(clock)
        rec.heartbeat(first=FIRST_FRAME_WITHIN)
        clock.advance(0.5)
        rec.counter += 1
        run(clock, 12)
        self.assertEqual(rec.dead, [])

    def test_stop(self) -> None:
        """stop cancels the timer for good, even if called while a ping is being sent."""
        clock = Clock()
        rec = Recorder(clock)
        beat = rec.heartbeat()
        beat._send_ping = beat.stop  # the pool connection fails while pinging
        run(clock, 40)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(rec.dead, [])


class FirstPingTests(SynchronousTestCase):
    """The server's first ping and what a client makes of it."""

    def server_bytes(self, version: int) -> bytes:
        """The bytes a server pool connection writes after a ClientHello of ``version``."""
        t = Tunnel()
        connection = t.server.tunnel_factory.buildProtocol(None)
        transport = StringTransport()
        connection.makeConnection(transport)
        hello = ClientHandshake(*psk_store().first(), version=version,
                                now=t.clock.seconds).start()
        connection.dataReceived(hello)
        return transport.value()

    def test_ping_with_server_hello(self) -> None:
        """To a version-2 client the ServerHello and a 268-byte ping go out in one write."""
        out = self.server_bytes(2)
        self.assertEqual(len(out), SERVER_HELLO_SIZE + 268)
        self.assertEqual(out[SERVER_HELLO_SIZE:SERVER_HELLO_SIZE + 4], b"XUMZ")
        self.assertEqual(out[SERVER_HELLO_SIZE + 8], FrameType.PING)

    def test_no_ping_for_reference_client(self) -> None:
        """A version-1 (reference) client gets the bare ServerHello and nothing else, ever."""
        t = Tunnel()
        t.start()
        link, received = t.reference_client_link()
        self.assertEqual(len(self.server_bytes(1)), SERVER_HELLO_SIZE)
        t.net.advance(3 * DEAD_AFTER)
        self.assertEqual(received, [])
        self.assertTrue(link.established)
        server_link = t.server.pool_connections[-1]
        self.assertIsNone(server_link.heartbeat)

    def test_both_ends_confirmed(self) -> None:
        """After the handshake both ends of a pool connection run a heartbeat and the client seals its opens."""
        t = Tunnel(pool_size=1)
        t.start()
        client, server = t.client.pool_connections[0], t.server.pool_connections[0]
        self.assertIsNotNone(client.heartbeat)
        self.assertIsNotNone(server.heartbeat)
        assert client.codec is not None and server.codec is not None
        self.assertTrue(client.codec.seals_open)
        self.assertTrue(server.codec.peer_confirmed)


class IdleTests(SynchronousTestCase):
    """A healthy idle pool connection stays up."""

    def test_idle_minute(self) -> None:
        """Idle for 60 s, the pool connections exchange pings, stay up and carry a session afterwards."""
        t = Tunnel(pool_size=2)
        t.start()
        links = list(t.client.pool_connections)
        counters = [link.codec.receive_counter for link in links]  # type: ignore[union-attr]
        t.net.advance(60)
        self.assertEqual(t.client.pool_connections, links)
        self.assertEqual(len(t.server.pool_connections), 2)
        grown = [link.codec.receive_counter - c  # type: ignore[union-attr]
                 for link, c in zip(links, counters)]
        self.assertTrue(all(5 <= g <= 30 for g in grown), grown)
        self.assertEqual(t.client.stats.pool_timeouts + t.server.stats.pool_timeouts, 0)
        peer, _ = t.tb_client()
        peer.send(frame(1))
        t.net.flush()
        self.assertEqual(peer.received, [frame(1)])


class FrozenPeerTests(SynchronousTestCase):
    """A peer that stops running while its kernel keeps taking bytes."""

    def freeze(self, t: Tunnel, link: TunnelProtocol) -> iosim.IOPump:
        """Stop moving bytes on ``link``'s pump (both ways); return the pump."""
        pump = next(p for p in t.net.pumps if link in (p.client, p.server))
        t.net.pumps.remove(pump)
        return pump

    def test_frozen_server(self) -> None:
        """A frozen server: the client closes the pool connection and its 3 sessions within 15-17 s, then its slot reconnects."""
        t = Tunnel(pool_size=1)
        t.start()
        link = t.client.pool_connections[0]
        peers = [t.tb_client()[0] for _ in range(3)]
        for i, peer in enumerate(peers):
            peer.send(frame(i))
        t.net.flush()
        self.assertEqual([p.received for p in peers], [[frame(i)] for i in range(3)])
        frozen_at = t.clock.seconds()
        pump = self.freeze(t, link)
        closed_at = None
        while closed_at is None and t.clock.seconds() < frozen_at + 20:
            t.net.advance(0.25)
            if all(p.lost for p in peers):
                closed_at = t.clock.seconds()
        assert closed_at is not None, "sessions still open 20 s after the freeze"
        self.assertGreaterEqual(closed_at - frozen_at, DEAD_AFTER)
        self.assertLessEqual(closed_at - frozen_at, DEAD_AFTER + 2 * TICK)
        self.assertEqual(t.client.stats.pool_timeouts, 1)
        self.assertNotIn(link, t.client.pool_connections)
        self.assertTrue(pump.clientIO.disconnecting)
        # The server thaws (SIGCONT): the abort reaches it, the slot reconnects
        # on a new pool connection, which works.
        t.net.pumps.append(pump)
        t.net.advance(1)
        self.assertEqual(len(t.client.pool_connections), 1)
        self.assertIsNot(t.client.pool_connections[0], link)
        peer, _ = t.tb_client()
        peer.send(frame(9))
        t.net.flush()
        self.assertEqual(peer.received, [frame(9)])

    def test_frozen_client(self) -> None:
        """A frozen client: the server closes the pool connection and its backend connections."""
        t = Tunnel(pool_size=1, backend=BackendFactory())
        t.start()
        client_link = t.client.pool_connections[0]
        server_link = t.server.pool_connections[0]
        peers = [t.tb_client()[0] for _ in range(2)]
        for i, peer in enumerate(peers):
            peer.send(frame(i))
        t.net.flush()
        self.assertEqual(len(t.backend.peers), 2)
        self.freeze(t, client_link)
        t.net.advance(DEAD_AFTER + 2 * TICK)
        self.assertTrue(all(b.lost for b in t.backend.peers))
        self.assertNotIn(server_link, t.server.pool_connections)
        self.assertEqual(t.server.stats.pool_timeouts, 1)


class ReplayedHelloTests(SynchronousTestCase):
    """A recorded version-2 ClientHello sent again by someone without the keys."""

    def test_replayer_closed_without_backend(self) -> None:
        """The replayer cannot answer the first ping: its connection ends after 5-6 s, and forged stream_opens open no backend."""
        backend = BackendFactory()
        t = Tunnel(backend=backend)
        t.server.startService()
        hello = ClientHandshake(*psk_store().first(), now=t.clock.seconds).start()
        replayer = RawPeer()
        pump = t.net.dial(t.server_addr, replayer)
        replayer.transport.write(hello + b"".join(encode_header(n, FrameType.OPEN)
                                                  for n in range(1, 41)))
        t.net.flush()
        self.assertEqual(len(t.server.pool_connections), 1)
        self.assertEqual(backend.peers, [])
        self.assertEqual(t.server.sessions, set())
        t.net.advance(FIRST_FRAME_WITHIN - 0.5)
        self.assertFalse(pump.serverIO.disconnecting)
        t.net.advance(1 + TICK)
        self.assertTrue(replayer.lost)
        self.assertEqual(t.server.pool_connections, [])
        self.assertEqual(backend.peers, [])
        self.assertEqual(len(replayer.received), SERVER_HELLO_SIZE + 268)


class ReferenceServerTests(SynchronousTestCase):
    """Our client against a server that never sends anything new (the Zig server)."""

    def client_hello(self) -> Tuple[Tunnel, Any, StringTransport, Accepted]:
        """A client pool connection on a StringTransport and the server's
        acceptance of its hello (not yet delivered to it)."""
        t = Tunnel(pool_size=1)
        link = t.client.new_pool_connection(0)
        transport = StringTransport()
        link.makeConnection(transport)
        hello = transport.value()
        transport.clear()
        accepted = ServerHandshake(psk_store(), now=t.clock.seconds).feed(hello)
        assert isinstance(accepted, Accepted)
        return t, link, transport, accepted

    def test_client_sends_nothing_new(self) -> None:
        """Without the server's ping, the client sends bare stream_opens, data and stream_close only, and never pings."""
        t, link, transport, accepted = self.client_hello()
        # A reference server: accepts version 2 (it only hashes it) and never pings.
        reference = PoolCodec(SERVER, accepted.established.keys, peer_extended=False)
        link.dataReceived(accepted.reply)
        self.assertTrue(link.established)
        self.assertIsNone(link.heartbeat)
        session = t.client.new_session()
        stream_id = link.open_stream(session)
        send_frame(link, stream_id, frame(1))
        t.clock.advance(3 * DEAD_AFTER)
        link.end_stream(stream_id, session)
        # The reference decoder refuses any frame type above 2; this one accepts all.
        events = feed(reference, transport.value())
        self.assertEqual([type(e).__name__ for e in events],
                         ["StreamOpened", "StreamData", "StreamClosed"])
        self.assertEqual(events[0], StreamOpened(stream_id, sealed=False))
        self.assertEqual(events[1], StreamData(stream_id, frame(1)))
        self.assertTrue(link.established)
        self.assertIsNone(link.heartbeat)

    def test_first_ping_answered(self) -> None:
        """The client starts its heartbeat at the server's first ping and answers it with a pong."""
        t, link, transport, accepted = self.client_hello()
        server = PoolCodec(SERVER, accepted.established.keys, peer_extended=True)
        link.dataReceived(accepted.reply)
        self.assertIsNone(link.heartbeat)
        link.dataReceived(b"".join(server.encode_ping()))
        self.assertIsNotNone(link.heartbeat)
        self.assertEqual(feed(server, transport.value()), [Pong(0)])
