"""Tests for the tunnel server's unproven streams: no backend before a stream authenticates.

A bare stream_open (the reference's, sent by version-1 clients and by our
client before the server confirmed version 2) carries no tag. The server
records its id and opens the backend, the session and its ``-m`` slot only
when the stream's first data frame authenticates (see
:mod:`tigertunnel.net.tunnel_protocol`). The pool connections here are real
TunnelProtocols on StringTransports (:class:`tests.test_protocols.Ends`).
"""

from typing import List, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import send_frame
from tests.memnet import psk_store
from tests.test_protocols import Ends, frames_in, tb_frame
from tigertunnel.net.pool_client import ClientPoolProtocol
from tigertunnel.net.pool_server import ServerPoolProtocol
from tigertunnel.net.streams import MAX_UNPROVEN_STREAMS
from tigertunnel.tools.traces import CLUSTER3, SINGLE, load_trace
from tigertunnel.wire.handshake import ClientHandshake
from tigertunnel.wire.muxframes import FrameType, encode_header

Link = Tuple[ClientPoolProtocol, StringTransport, ServerPoolProtocol, StringTransport]


def reference_link(ends: Ends) -> Link:
    """A pool connection from a version-1 (reference) client: it sends bare stream_opens."""
    client = ClientPoolProtocol(ClientHandshake(*psk_store().first(), version=1,
                                                now=ends.clock.seconds),
                                ends.client, "v1")
    server = ends.server.tunnel_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5))
    ct, st = StringTransport(), StringTransport()
    client.makeConnection(ct)
    server.makeConnection(st)
    ends.links.append((client, ct, server, st))
    ends.flush()
    assert client.established and server.established
    return client, ct, server, st


def open_bare(ends: Ends, client: ClientPoolProtocol) -> Tuple[int, object]:
    """Open a stream from the client side (bare stream_open); return its id and session."""
    session = ends.client.new_session()
    stream_id = client.open_stream(session)
    ends.flush()
    return stream_id, session


class LazyBackendTests(SynchronousTestCase):
    """The backend of a bare stream_open waits for the stream's first data frame."""

    def test_nothing_before_data(self) -> None:
        """A bare stream_open opens no backend and takes no session or -m slot; the first data frame does, and is delivered."""
        ends = Ends()
        client, _, server, _ = reference_link(ends)
        stream_id, _ = open_bare(ends, client)
        self.assertEqual(ends.backends.sessions, [])
        self.assertEqual(ends.server.sessions, set())
        self.assertEqual(server.unproven, {stream_id})
        send_frame(client, stream_id, tb_frame(1))
        ends.flush()
        self.assertEqual(len(ends.backends.sessions), 1)
        self.assertEqual(server.unproven, set())
        self.assertEqual(frames_in(ends.backends.transports[0]), [tb_frame(1)])

    def test_first_frame_waits_for_connect(self) -> None:
        """The proving frame and the frames after it are written, in order, once the backend connects."""
        ends = Ends()
        ends.backends.hold = True
        client, _, _, _ = reference_link(ends)
        stream_id, _ = open_bare(ends, client)
        for tag in (1, 2, 3):
            send_frame(client, stream_id, tb_frame(tag))
        ends.flush()
        (proto, d), = ends.backends.held
        transport = ends.backends.make(proto)
        d.callback(proto)
        self.assertEqual(frames_in(transport), [tb_frame(1), tb_frame(2), tb_frame(3)])

    def test_close_forgets(self) -> None:
        """A stream_close for an unproven stream forgets it: no backend ever, later data dropped."""
        ends = Ends()
        client, _, server, _ = reference_link(ends)
        stream_id, session = open_bare(ends, client)
        client.end_stream(stream_id, session)  # type: ignore[arg-type]
        ends.flush()
        self.assertEqual(server.unproven, set())
        send_frame(client, stream_id, tb_frame(2))  # a late frame for the forgotten id
        ends.flush()
        self.assertEqual(ends.backends.sessions, [])
        self.assertTrue(server.established)

    def test_sealed_open_at_once(self) -> None:
        """A version-2 client's sealed stream_open opens the backend at once, before any data."""
        ends = Ends()
        ends.link()
        ends.tb_client()
        self.assertEqual(len(ends.backends.sessions), 1)
        self.assertEqual(ends.links[0][2].unproven, set())

    def test_plaintext_opens_at_once(self) -> None:
        """In plaintext mode (nothing is authenticated) a stream_open opens the backend at once."""
        ends = Ends(encrypted=False)
        ends.link()
        ends.tb_client()
        self.assertEqual(len(ends.backends.sessions), 1)

    def test_unproven_outside_max_sessions(self) -> None:
        """Unproven streams take no -m slot: with -m 1 and ten unproven streams a proven one still opens."""
        ends = Ends(max_sessions=1)
        client, _, server, _ = reference_link(ends)
        for _ in range(10):
            open_bare(ends, client)
        stream_id, _ = open_bare(ends, client)
        send_frame(client, stream_id, tb_frame(4))
        ends.flush()
        self.assertEqual(len(ends.server.sessions), 1)
        self.assertEqual(len(server.unproven), 10)
        self.assertEqual(frames_in(ends.backends.transports[0]), [tb_frame(4)])


class CapTests(SynchronousTestCase):
    """At most MAX_UNPROVEN_STREAMS per pool connection; forged opens cost nothing more."""

    def test_cap(self) -> None:
        """MAX_UNPROVEN_STREAMS bare opens wait; one more closes the pool connection, with no backend opened."""
        ends = Ends()
        client, _, server, st = reference_link(ends)
        server.dataReceived(b"".join(encode_header(n, FrameType.OPEN)
                                     for n in range(1, MAX_UNPROVEN_STREAMS + 1)))
        self.assertEqual(len(server.unproven), MAX_UNPROVEN_STREAMS)
        self.assertTrue(server.established)
        server.dataReceived(encode_header(MAX_UNPROVEN_STREAMS + 1, FrameType.OPEN))
        self.assertFalse(server.established)
        self.assertTrue(st.disconnecting)
        self.assertEqual(server.unproven, set())
        self.assertEqual(ends.backends.sessions, [])

    def test_duplicate_open(self) -> None:
        """A second bare stream_open for an unproven id closes the pool connection."""
        ends = Ends()
        _, _, server, st = reference_link(ends)
        server.dataReceived(encode_header(7, FrameType.OPEN) * 2)
        self.assertTrue(st.disconnecting)
        self.assertFalse(server.established)

    def test_bare_open_after_confirmation(self) -> None:
        """On a confirmed version-2 pool connection an injected bare stream_open closes it."""
        ends = Ends()
        _, _, server, st = ends.link()
        server.dataReceived(encode_header(9, FrameType.OPEN))
        self.assertTrue(st.disconnecting)
        self.assertEqual(ends.backends.sessions, [])

    def test_unknown_stream_data_ignored(self) -> None:
        """Authenticated data for a stream never opened opens nothing."""
        ends = Ends()
        client, _, server, _ = reference_link(ends)
        send_frame(client, 42, tb_frame(5))
        ends.flush()
        self.assertEqual(ends.backends.sessions, [])
        self.assertTrue(server.established)


class TraceTests(SynchronousTestCase):
    """Deferring the backend connect is invisible to TB: a TB peer always sends first."""

    def test_first_frame_goes_up(self) -> None:
        """In both recorded TB 0.17.8 traces the first frame of every connection comes from the connecting side."""
        firsts: List[Tuple[str, str]] = []
        for name in (SINGLE, CLUSTER3):
            seen = set()
            for frame in load_trace(name):
                key = (frame.link, frame.conn)
                if key not in seen:
                    seen.add(key)
                    firsts.append((frame.dir, frame.command))
        self.assertEqual(len(firsts), 7)
        self.assertEqual({direction for direction, _ in firsts}, {"up"})
