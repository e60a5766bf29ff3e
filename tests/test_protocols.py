"""Tests for :mod:`tigertunnel.net.frame_protocol`, :mod:`tigertunnel.net.tunnel_protocol` and :mod:`tigertunnel.net.sockets` with StringTransports and a MemoryReactorClock.

The protocols are built the way the services build them (a real
ClientMultiplexer / ServerMultiplexer on a MemoryReactorClock); every socket
is a ``StringTransport`` whose bytes the tests move by hand, so pausing,
slow peers and connections that never finish closing can be shown exactly.
"""

import socket
from typing import Any, List, Tuple

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.memnet import psk_store
from tests.strategies import make_tb_frame
from tigertunnel.config.model import Address, ProxyPair, TunnelConfig
from tigertunnel.errors import HandshakeError
from tigertunnel.wire.frames import FrameParser
from tigertunnel.net.frame_protocol import CLOSE_TIMEOUT, SESSION_BUFFER_LIMIT, FrameProtocol
from tigertunnel.net.heartbeat import Heartbeat
from tigertunnel.net.sockets import KEEPALIVE, USER_TIMEOUT_MS, tune_socket
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.net.multiplexer import ClientMultiplexer, ServerMultiplexer

CLIENT_PAIR = ProxyPair(0, Address("127.0.0.1", 4000), Address("127.0.0.1", 3000))
SERVER_PAIR = ProxyPair(0, Address("127.0.0.1", 3000), Address("127.0.0.1", 3001))
MIB = 1 << 20


def tb_frame(tag: int, body: int = 10) -> bytes:
    """A valid TB frame that crosses the tunnel unchanged (zero nonce_reserved and cluster)."""
    fill = bytearray((tag + i) & 0xFF for i in range(256))
    fill[64:80] = bytes(16)
    return make_tb_frame(bytes((tag * 5 + i) & 0xFF for i in range(body)), bytes(fill))


def frames_in(transport: StringTransport) -> List[bytes]:
    """The TB frames written to ``transport`` so far."""
    return FrameParser().feed(transport.value())


def timers(clock: MemoryReactorClock) -> List[Any]:
    """The delayed calls of ``clock`` other than the pool connections' heartbeats."""
    return [call for call in clock.getDelayedCalls()
            if not isinstance(getattr(call.func, "__self__", None), Heartbeat)]


def lost(protocol: Protocol) -> None:
    """Tell ``protocol`` its connection closed (StringTransport never does)."""
    protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class BackendEndpoint:
    """Connects each server-side session to a new StringTransport, at once or on request."""

    def __init__(self) -> None:
        self.transports: List[StringTransport] = []
        self.sessions: List[FrameProtocol] = []
        self.hold = False
        self.held: List[Tuple[Any, "Deferred[Any]"]] = []

    def endpoint_for(self, pair: ProxyPair) -> "BackendEndpoint":
        """The endpoint of every pair."""
        return self

    def connect(self, factory: Factory) -> "Deferred[Any]":
        proto = factory.buildProtocol(None)
        self.sessions.append(proto)
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((proto, d))
            return d
        self.make(proto)
        return succeed(proto)

    def make(self, proto: Protocol) -> StringTransport:
        """Complete the connection of ``proto``."""
        transport = StringTransport()
        self.transports.append(transport)
        proto.makeConnection(transport)
        return transport


class Ends:
    """A tunnel client and server multiplexer on one clock, and helpers to join them."""

    def __init__(self, encrypted: bool = True, **server_cfg: Any) -> None:
        self.clock = MemoryReactorClock()
        self.backends = BackendEndpoint()
        keys = psk_store() if encrypted else None
        self.client = ClientMultiplexer(
            TunnelConfig("client", [CLIENT_PAIR], psk=keys, pool_size=0), CLIENT_PAIR,
            self.clock, endpoint_for=self.backends.endpoint_for)
        self.server = ServerMultiplexer(
            TunnelConfig("server", [SERVER_PAIR], psk=keys, **server_cfg), SERVER_PAIR,
            self.clock, endpoint_for=self.backends.endpoint_for)
        self.links: List[Tuple[TunnelProtocol, StringTransport,
                               TunnelProtocol, StringTransport]] = []

    def link(self) -> Tuple[TunnelProtocol, StringTransport, TunnelProtocol, StringTransport]:
        """Connect a new pool connection and complete its handshake."""
        client = self.client.new_pool_connection(0)
        server = self.server.tunnel_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5))
        ct, st = StringTransport(), StringTransport()
        client.makeConnection(ct)
        server.makeConnection(st)
        self.links.append((client, ct, server, st))
        self.flush()
        return client, ct, server, st

    def flush(self) -> None:
        """Move bytes between the two ends of every pool connection until none are left."""
        moved = True
        for _ in range(10_000):
            if not moved:
                return
            moved = False
            for client, ct, server, st in self.links:
                up, down = ct.value(), st.value()
                ct.clear()
                st.clear()
                if up and not st.disconnecting:
                    server.dataReceived(up)
                    moved = True
                if down and not ct.disconnecting:
                    client.dataReceived(down)
                    moved = True
        raise AssertionError("the pool connections never went quiet")

    def tb_client(self) -> Tuple[FrameProtocol, StringTransport]:
        """Accept a TB client on the tunnel client's listener."""
        session = self.client.frame_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6))
        transport = StringTransport()
        session.makeConnection(transport)
        self.flush()
        return session, transport


class BackpressureTests(SynchronousTestCase):
    """A full pool-connection socket pauses reading from the TB peers of its sessions only."""

    def test_pause_and_resume_all_sessions(self) -> None:
        """pauseProducing on a pool connection pauses every TB transport on it; resumeProducing resumes them."""
        ends = Ends()
        client, ct, _, _ = ends.link()
        sessions = [ends.tb_client() for _ in range(3)]
        self.assertIs(ct.producer, client)
        ct.producer.pauseProducing()
        self.assertEqual([t.producerState for _, t in sessions], ["paused"] * 3)
        ct.producer.resumeProducing()
        self.assertEqual([t.producerState for _, t in sessions], ["producing"] * 3)

    def test_other_pool_connection_unaffected(self) -> None:
        """Sessions on another pool connection keep reading while one pool connection is paused."""
        ends = Ends()
        first, ct1, _, _ = ends.link()
        _, ct2, _, _ = ends.link()
        sessions = [ends.tb_client() for _ in range(4)]  # round-robin: 2 per link
        ct1.producer.pauseProducing()
        states = sorted((s.pool_connection is first, t.producerState) for s, t in sessions)
        self.assertEqual(states, [(False, "producing"), (False, "producing"),
                                  (True, "paused"), (True, "paused")])

    def test_session_joining_paused_link(self) -> None:
        """A TB connection placed on a paused pool connection starts paused, and resumes with it."""
        ends = Ends()
        _, ct, _, _ = ends.link()
        ct.producer.pauseProducing()
        _, transport = ends.tb_client()
        self.assertEqual(transport.producerState, "paused")
        ct.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_server_side_backends_paused(self) -> None:
        """On the tunnel server a paused pool connection pauses reading from its backends."""
        ends = Ends()
        _, _, _, st = ends.link()
        for _ in range(2):
            ends.tb_client()
        self.assertEqual(len(ends.backends.transports), 2)
        st.producer.pauseProducing()
        self.assertEqual([t.producerState for t in ends.backends.transports], ["paused"] * 2)
        st.producer.resumeProducing()
        self.assertEqual([t.producerState for t in ends.backends.transports],
                         ["producing"] * 2)


class SlowPeerTests(SynchronousTestCase):
    """A TB peer that stops reading loses its own session, never its neighbours'."""

    def setUp(self) -> None:
        self.ends = Ends()
        self.client_link, self.ct, _, _ = self.ends.link()
        self.slow, self.slow_transport = self.ends.tb_client()
        self.other, self.other_transport = self.ends.tb_client()
        self.slow_backend, self.other_backend = self.ends.backends.sessions
        self.big = tb_frame(1, MIB - 256)

    def reply(self, backend: FrameProtocol, frame: bytes, count: int = 1) -> None:
        """Make ``backend`` send ``frame`` ``count`` times through the tunnel."""
        for _ in range(count):
            backend.dataReceived(frame)
        self.ends.flush()

    def test_write_watcher_registered(self) -> None:
        """Each TB transport has a producer that reports the peer's reading state to the session."""
        self.assertIsNotNone(self.slow_transport.producer)
        self.assertTrue(self.slow_transport.streaming)

    def test_session_lost_past_the_buffer_limit(self) -> None:
        """A slow TB peer keeps its session up to SESSION_BUFFER_LIMIT queued bytes and loses it beyond."""
        self.assertEqual(SESSION_BUFFER_LIMIT, 8 * MIB)
        self.slow_transport.producer.pauseProducing()  # the peer stopped reading
        self.reply(self.slow_backend, self.big, 8)
        self.assertFalse(self.slow_transport.disconnecting)
        self.reply(self.slow_backend, tb_frame(2, 0))
        self.assertTrue(self.slow_transport.disconnected)  # aborted, not a graceful close
        self.assertEqual(len(frames_in(self.slow_transport)), 9)

    def test_neighbours_untouched(self) -> None:
        """When a slow session is aborted the pool connection and other sessions carry on."""
        self.slow_transport.producer.pauseProducing()
        self.reply(self.slow_backend, self.big, 9)
        self.assertTrue(self.slow_transport.disconnected)
        self.reply(self.slow_backend, self.big)  # frames for the dead session are dropped
        self.assertEqual(len(frames_in(self.slow_transport)), 9)
        frames = [tb_frame(3, 100), tb_frame(4, 0)]
        for frame in frames:
            self.reply(self.other_backend, frame)
        self.assertEqual(frames_in(self.other_transport), frames)
        self.assertFalse(self.other_transport.disconnecting)
        self.assertFalse(self.ct.disconnecting)
        self.assertIn(self.client_link, self.ends.client.pool_connections)
        self.assertEqual(self.other_transport.producerState, "producing")

    def test_draining_resets_count(self) -> None:
        """Bytes count against the limit only while the peer is not reading; draining starts over."""
        self.slow_transport.producer.pauseProducing()
        self.reply(self.slow_backend, self.big, 6)
        self.slow_transport.producer.resumeProducing()
        self.reply(self.slow_backend, self.big, 4)
        self.slow_transport.producer.pauseProducing()
        self.reply(self.slow_backend, self.big, 6)
        self.assertFalse(self.slow_transport.disconnecting)

    def test_fast_peer_never_limited(self) -> None:
        """A TB peer that keeps reading receives any amount."""
        self.reply(self.slow_backend, self.big, 12)
        self.assertFalse(self.slow_transport.disconnecting)
        self.assertEqual(len(frames_in(self.slow_transport)), 12)

    def test_slow_backend_on_server(self) -> None:
        """On the server a backend that stops reading loses its stream; the client is told and closes its TB peer."""
        backend_transport = self.ends.backends.transports[0]
        backend_transport.producer.pauseProducing()
        self.slow.dataReceived(self.big * 9)
        self.ends.flush()
        self.assertTrue(backend_transport.disconnected)
        lost(self.slow_backend)
        self.ends.flush()
        self.assertTrue(self.slow_transport.disconnecting)
        self.assertFalse(self.other_transport.disconnecting)


class CloseTests(SynchronousTestCase):
    """Closing sessions: close propagation and the close timer."""

    def test_backend_close_closes_tb_client(self) -> None:
        """A backend that closes makes the client close its TB connection gracefully (stream_close extension)."""
        ends = Ends()
        ends.link()
        session, transport = ends.tb_client()
        lost(ends.backends.sessions[0])
        ends.flush()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.assertIsNone(session.pool_connection)

    def test_close_timer_aborts_undrained_tb_client(self) -> None:
        """A TB connection that never finishes closing is aborted CLOSE_TIMEOUT seconds later."""
        ends = Ends()
        ends.link()
        _, transport = ends.tb_client()
        lost(ends.backends.sessions[0])
        ends.flush()
        ends.clock.advance(CLOSE_TIMEOUT - 0.01)
        self.assertFalse(transport.disconnected)
        ends.clock.advance(0.01)
        self.assertTrue(transport.disconnected)

    def test_close_timer_on_server(self) -> None:
        """A backend that never finishes closing after its TB client left is aborted after CLOSE_TIMEOUT."""
        ends = Ends()
        ends.link()
        session, _ = ends.tb_client()
        lost(session)
        ends.flush()
        backend = ends.backends.transports[0]
        self.assertTrue(backend.disconnecting)
        self.assertFalse(backend.disconnected)
        ends.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(backend.disconnected)

    def test_close_timer_cancelled(self) -> None:
        """A session that finishes closing in time leaves no timer behind."""
        ends = Ends()
        ends.link()
        session, transport = ends.tb_client()
        lost(ends.backends.sessions[0])
        ends.flush()
        self.assertEqual(len(timers(ends.clock)), 1)
        lost(session)
        self.assertEqual(timers(ends.clock), [])
        self.assertFalse(transport.disconnected)

    def test_lost_pool_connection_aborts_sessions(self) -> None:
        """Losing a pool connection aborts every session on it at both ends."""
        ends = Ends()
        client, _, server, _ = ends.link()
        transports = [ends.tb_client()[1] for _ in range(3)]
        client.connectionLost(Failure(ConnectionLost()))
        server.connectionLost(Failure(ConnectionLost()))
        self.assertEqual([t.disconnected for t in transports], [True] * 3)
        self.assertEqual([t.disconnected for t in ends.backends.transports], [True] * 3)
        self.assertEqual((ends.client.pool_connections, ends.server.pool_connections), ([], []))

    def test_frames_before_backend_connects(self) -> None:
        """Frames for a stream whose backend is still connecting are written, in order, once it connects."""
        ends = Ends()
        ends.link()
        ends.backends.hold = True
        session, _ = ends.tb_client()
        frames = [tb_frame(i, i * 10) for i in range(3)]
        session.dataReceived(b"".join(frames))
        ends.flush()
        proto, d = ends.backends.held[0]
        transport = ends.backends.make(proto)
        d.callback(proto)
        self.assertEqual(frames_in(transport), frames)

    def test_close_before_backend_connects(self) -> None:
        """A stream closed while its backend is connecting cancels the connection attempt."""
        ends = Ends()
        ends.link()
        ends.backends.hold = True
        session, _ = ends.tb_client()
        _, d = ends.backends.held[0]
        self.assertFalse(d.called)
        self.assertEqual(len(ends.server.sessions), 1)
        lost(session)
        ends.flush()
        self.assertTrue(d.called)  # cancelled: the connect_failed errback consumed it
        self.assertEqual(ends.server.sessions, set())
        self.assertEqual(ends.backends.transports, [])


class HandshakeTests(SynchronousTestCase):
    """The handshake phase of a pool connection."""

    def test_server_handshake_timeout(self) -> None:
        """A pool connection that sends no ClientHello is closed after the handshake timeout."""
        ends = Ends(handshake_timeout=3.0)
        server = ends.server.tunnel_factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        ends.clock.advance(2.99)
        self.assertFalse(transport.disconnecting)
        ends.clock.advance(0.01)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(ends.server.handshake_failures, 1)
        self.assertEqual(ends.server.pool_connections, [])

    def test_client_handshake_timeout(self) -> None:
        """A server that never answers makes the client's ready fail and its connection close."""
        ends = Ends()
        link = ends.client.new_pool_connection(0)
        errors: List[Failure] = []
        link.ready.addErrback(errors.append)
        transport = StringTransport()
        link.makeConnection(transport)
        self.assertEqual(len(transport.value()), 66)
        ends.clock.advance(ends.client.handshake_timeout)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(errors), 1)
        errors[0].trap(HandshakeError)
        self.assertIn("timed out", errors[0].getErrorMessage())

    def test_timer_cancelled_when_established(self) -> None:
        """A completed handshake cancels the timeout on both ends."""
        ends = Ends()
        client, ct, server, st = ends.link()
        self.assertTrue(client.established and server.established)
        self.assertEqual(timers(ends.clock), [])
        for _ in range(100):  # the heartbeats keep both ends up meanwhile
            ends.clock.advance(1)
            ends.flush()
        self.assertFalse(ct.disconnecting or st.disconnecting)

    def bad_server_hello(self, reply: bytes) -> Tuple[List[Failure], StringTransport,
                                                      ClientMultiplexer]:
        """Feed ``reply`` to a client pool connection; return what its ready observer saw."""
        ends = Ends()
        link = ends.client.new_pool_connection(0)
        errors: List[Failure] = []
        link.ready.addErrback(errors.append)
        transport = StringTransport()
        link.makeConnection(transport)
        link.dataReceived(reply)
        return errors, transport, ends.client

    def test_rejection_status(self) -> None:
        """A ServerHello with a failure status fails ready with HandshakeError carrying the status."""
        for status in (1, 2, 3, 4, 5, 9, 255):
            errors, transport, mux = self.bad_server_hello(bytes([status]))
            self.assertEqual(len(errors), 1)
            error = errors[0].trap(HandshakeError) and errors[0].value
            self.assertEqual(error.status, status)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(mux.pool_connections, [])
            self.assertEqual(mux.handshake_failures, 1)

    def test_wrong_auth_hash(self) -> None:
        """A ServerHello whose auth hash does not verify fails ready with HandshakeError."""
        errors, transport, mux = self.bad_server_hello(bytes(49))
        self.assertEqual(len(errors), 1)
        errors[0].trap(HandshakeError)
        self.assertTrue(transport.disconnecting)

    def test_ready_failure_seen_later(self) -> None:
        """After a rejected handshake, ready still holds the HandshakeError for observers added later."""
        ends = Ends()
        link = ends.client.new_pool_connection(0)
        link.makeConnection(StringTransport())
        link.dataReceived(b"\x04")
        self.failureResultOf(link.ready, HandshakeError)

    def test_ready_fires_with_link(self) -> None:
        """A completed handshake fires ready with the pool connection, which is then in the mux's links."""
        ends = Ends()
        client, _, server, _ = ends.link()
        self.assertIs(self.successResultOf(client.ready), client)
        self.assertEqual(ends.client.pool_connections, [client])
        self.assertEqual(ends.server.pool_connections, [server])
        self.assertEqual(server.peer_version, 2)

    def test_bad_client_hello(self) -> None:
        """A ClientHello with an unknown operation closes the server's pool connection without reply."""
        ends = Ends()
        server = ends.server.tunnel_factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        server.dataReceived(b"\x01\x55" + bytes(64))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(ends.server.handshake_failures, 1)

    def test_plaintext_needs_no_handshake(self) -> None:
        """In plaintext mode a pool connection is usable at once, with no timer."""
        ends = Ends(encrypted=False)
        link = ends.client.new_pool_connection(0)
        link.makeConnection(StringTransport())
        self.assertIs(self.successResultOf(link.ready), link)
        self.assertFalse(link.encrypted)
        self.assertEqual(ends.clock.getDelayedCalls(), [])


class TuneSocketTests(SynchronousTestCase):
    """TCP options on real sockets."""

    def socket_pair(self) -> Tuple[socket.socket, socket.socket]:
        """A connected TCP socket pair on 127.0.0.1."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        self.addCleanup(server.close)
        return client, server

    def test_options_set(self) -> None:
        """tune_socket on a Twisted TCP transport sets NODELAY, keepalive 5/4/3 and TCP_USER_TIMEOUT."""
        for sock in self.socket_pair():
            transport = tcp.Connection(sock, Protocol(), reactor=MemoryReactorClock())
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
            tune_socket(transport)
            self.assertNotEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
            self.assertNotEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
            if not hasattr(socket, "TCP_KEEPIDLE"):
                continue
            self.assertEqual(KEEPALIVE, (5, 4, 3))
            self.assertEqual(
                [sock.getsockopt(socket.IPPROTO_TCP, option) for option in
                 (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)], [5, 4, 3])
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                                 USER_TIMEOUT_MS)

    def test_no_socket(self) -> None:
        """Transports without a socket (in-memory tests) are left alone without error."""
        transport = StringTransport()
        tune_socket(transport)
        self.assertEqual(transport.value(), b"")

    def test_protocols_tune_their_sockets(self) -> None:
        """Pool connections and TB connections tune their transport when they connect."""
        ends = Ends(encrypted=False)
        ends.link()
        for sock, make in zip(self.socket_pair(), [
                lambda: ends.client.new_pool_connection(0),
                lambda: ends.client.frame_factory.buildProtocol(None)]):
            proto = make()
            transport = tcp.Connection(sock, proto, reactor=MemoryReactorClock())
            proto.makeConnection(transport)
            self.assertNotEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
            self.assertNotEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
