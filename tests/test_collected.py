"""Nothing a session or a pool connection holds outlives it, on both data paths.

A tunnel serves millions of short TB sessions: whichever way one ends, its
protocol objects, its encoder (with any partial frame) and, for a pool
connection, its codec must be freed. The data-path types of the compiled
extension take part in the cyclic GC (a session's encoder holds the
session's own watch callback, a cycle); sessions and pool connections drop
what they hold when they end.

The end-to-end cases run a tunnel in memory (``tests/memnet.py``) with the
TB watch set, as a real tunnel end has it, and check with weak references
that every session and pool connection of each kind of end is collected.
"""

import gc
import tracemalloc
import weakref
from typing import Any, List

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import Implementation, ImplementationMixin, on_both
from tests.memnet import TBPeer, Tunnel
from tigertunnel.errors import FrameError, MuxError
from tigertunnel.net.frame_protocol import FrameProtocol
from tigertunnel.ops.tbmetrics import watch_pairs
from tigertunnel.tools.tbframes import sized_tb_frame
from tigertunnel.wire import codec

KEY = bytes(range(16))
NONCE = bytes(range(100, 116))
#: Half of a 64 KiB TB frame: what an abandoned session leaves behind.
HALF_FRAME = sized_tb_frame(65536, 7)[:32768]
#: The start of a sealed 64 KiB data frame on a pool connection: mux
#: header, tag, clear size, 1000 bytes (PROTOCOL.md 6.2, 7.1).
PARTIAL_MUX_FRAME = (b"XUMZ" + (1).to_bytes(4, "little") + bytes(4) + bytes(16)
                     + (65536).to_bytes(4, "little") + bytes(1000))


class _Holder:
    """Stands for a session: owns an encoder whose watch is its own method."""

    def __init__(self, impl: Implementation) -> None:
        sealer = impl.FrameSealer(KEY, NONCE)
        self.encoder = impl.FrameEncoder(1, sealer, True, None, self.watch)
        self.seen = 0

    def watch(self, header: bytes) -> None:
        self.seen += 1


class DataPathTests(ImplementationMixin):
    """The data-path objects are freed, also through a cycle and with a partial frame."""

    impl: Implementation

    def test_tracked_by_the_collector(self) -> None:
        """The parser, encoder and receiver, which hold Python objects, are tracked by the cyclic GC."""
        impl = self.impl
        for made in (impl.FrameParser(), impl.FrameEncoder(1, None, True),
                     impl.MuxReceiver(None),
                     impl.MuxReceiver(impl.FrameOpener(KEY, NONCE))):
            self.assertTrue(gc.is_tracked(made), type(made))

    def test_cycle_through_the_watch_is_collected(self) -> None:
        """An encoder whose watch is a method of its owner, holding half a frame, is collected with its owner."""
        holder = _Holder(self.impl)
        holder.encoder.encode(sized_tb_frame(1024, 1) + HALF_FRAME)
        self.assertEqual((holder.seen, holder.encoder.buffered()), (1, len(HALF_FRAME)))
        ref = weakref.ref(holder)
        del holder
        gc.collect()
        self.assertIsNone(ref())

    def test_many_dropped_keep_no_memory(self) -> None:
        """Thousands of encoders and receivers dropped with partial frames, failed or not, leave no memory behind."""
        impl = self.impl
        opener = impl.FrameOpener(KEY, NONCE)
        bad = bytes(300)  # a bad TB size and a bad mux magic

        def churn(count: int) -> None:
            for i in range(count):
                holder = _Holder(impl)
                receiver = impl.MuxReceiver(opener, True)
                if i % 2:
                    self.assertRaises(FrameError, holder.encoder.encode, bad)
                    self.assertRaises(MuxError, receiver.feed, bad)
                else:
                    holder.encoder.encode(HALF_FRAME)
                    receiver.feed(PARTIAL_MUX_FRAME)
                del holder, receiver

        churn(50)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            churn(2000)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        # 2,000 leaked partial frames would be over 60 MiB.
        self.assertLess(after - before, 1 << 20)


PureDataPathTests, CompiledDataPathTests = on_both(DataPathTests)


class EndedTests(ImplementationMixin):
    """Every session and pool connection of a tunnel, however it ended, is collected."""

    impl: Implementation

    def setUp(self) -> None:
        self.patch(codec, "IMPLEMENTATION", self.impl)
        self.refs: List["weakref.ref[Any]"] = []

    def tunnel(self, **kwargs: Any) -> Tunnel:
        """A started in-memory tunnel whose sessions are recorded as they are made."""
        t = Tunnel(**kwargs)
        watch_pairs([t.client, t.server], t.clock.seconds)
        for mux in (t.client, t.server):
            self.record(mux)
        t.start()
        self.assertTrue(t.client.pool_connections or t.net.refusing)
        return t

    def record(self, mux: Any) -> None:
        """Keep a weak reference to every session ``mux`` makes."""
        make = mux.new_session

        def new_session() -> FrameProtocol:
            session = make()
            self.refs.append(weakref.ref(session))
            return session

        mux.new_session = new_session
        if hasattr(mux, "frame_factory"):
            mux.frame_factory.new_session = new_session

    def assert_collected(self, t: Tunnel, sessions: int) -> None:
        """Every recorded session ended having dropped its encoder, and was
        collected (the caller dropped its TB peers)."""
        t.net.flush()
        self.assertEqual(len(self.refs), sessions)
        for ref in self.refs:
            session = ref()
            if session is not None:
                self.assertEqual(session.state.name, "CLOSED")
                self.assertIsNone(session._encoder)
            del session
        t.backend.peers.clear()
        gc.collect()
        self.assertEqual([r() for r in self.refs if r() is not None], [])

    def session(self, t: Tunnel) -> TBPeer:
        """A TB client whose first frame was echoed."""
        client = t.tb_client()[0]
        client.send(sized_tb_frame(1024, 1))
        t.net.flush()
        self.assertEqual(len(client.received), 1)
        return client

    def test_clean(self) -> None:
        """A session whose TB client closes after its echo."""
        t = self.tunnel()
        client = self.session(t)
        client.transport.loseConnection()
        del client
        self.assert_collected(t, sessions=2)

    def test_abandoned_mid_frame(self) -> None:
        """A session whose TB client closes after half of a 64 KiB frame."""
        t = self.tunnel()
        client = self.session(t)
        client.transport.write(HALF_FRAME)
        t.net.flush()
        session = self.refs[0]()
        assert session is not None and session._encoder is not None
        self.assertEqual(session._encoder.buffered(), len(HALF_FRAME))
        del session
        client.transport.loseConnection()
        del client
        self.assert_collected(t, sessions=2)

    def test_refused_by_the_client(self) -> None:
        """A session the tunnel client refuses (no pool connection)."""
        t = self.tunnel()
        t.net.refusing.add(t.server_addr)
        for link in list(t.client.pool_connections):
            link.transport.loseConnection()
        del link
        t.net.flush()
        client = t.tb_client()[0]
        self.assertTrue(client.lost)
        del client
        self.assert_collected(t, sessions=1)

    def test_refused_by_the_server(self) -> None:
        """A session whose stream the tunnel server refuses (-m reached)."""
        t = self.tunnel(server_cfg={"max_sessions": 1})
        first = self.session(t)
        client = t.tb_client()[0]
        client.send(sized_tb_frame(1024, 2))
        t.net.flush()
        self.assertTrue(client.lost)
        first.transport.loseConnection()
        del first, client
        self.assert_collected(t, sessions=3)

    def test_backend_refused(self) -> None:
        """A session whose backend connection is refused."""
        t = self.tunnel()
        t.net.refusing.add(t.backend_addr)
        client = t.tb_client()[0]
        client.send(sized_tb_frame(1024, 1))
        t.net.flush()
        self.assertTrue(client.lost)
        del client
        self.assert_collected(t, sessions=2)

    def test_cut_by_the_backend(self) -> None:
        """A session whose backend closes the connection."""
        t = self.tunnel()
        client = self.session(t)
        t.backend.peers[0].transport.loseConnection()
        t.net.flush()
        self.assertTrue(client.lost)
        del client
        self.assert_collected(t, sessions=2)

    def test_cut_by_the_pool(self) -> None:
        """Sessions whose pool connection is lost, and that pool connection on both ends."""
        t = self.tunnel(pool_size=1)
        client = self.session(t)
        client.transport.write(HALF_FRAME)
        t.net.flush()
        ends = [weakref.ref(t.client.pool_connections[0]),
                weakref.ref(t.server.pool_connections[0])]
        t.client.pool_connections[0].transport.loseConnection()
        t.net.flush()
        self.assertTrue(client.lost)
        for ref in ends:
            connection = ref()
            assert connection is not None
            self.assertEqual(connection.state.name, "CLOSED")
            self.assertIsNone(connection.codec)
            del connection
        del client
        self.assert_collected(t, sessions=2)
        self.assertEqual([r() for r in ends if r() is not None], [])
        # The pool came back with a new connection, which works.
        t.net.advance(0.5)
        self.session(t)


PureEndedTests, CompiledEndedTests = on_both(EndedTests)
