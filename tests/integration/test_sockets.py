"""A tunnel client and server in this process, on real TCP sockets (127.0.0.1).

``build_service`` builds both ends exactly as ``twistd`` would; the test
plays the TB clients and the replicas on real sockets. The recorded
TigerBeetle 0.17.8 traces are replayed connection by connection: the fake TB
client sends the recorded ``up`` frames and the fake replica the recorded
``down`` frames, each side sending its next frame as soon as it has received
every frame the other side sent before it in the recording (so both
directions flow at once where the recording allows). Frames are compared by
SHA-256 digest, in order.
"""

import hashlib
import os
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.integration import procs
from tigertunnel.config.model import Address, ProxyPair, TunnelConfig
from tigertunnel.keys.files import (
    load_kem_public_file,
    load_kem_secret_file,
    load_psk_file,
)
from tigertunnel.keys.generate import kemgen, keygen
from tigertunnel.net.multiplexer import ClientMultiplexer, ServerMultiplexer, build_service
from tigertunnel.tools.traces import CLUSTER3, SINGLE, TraceFrame, load_trace

#: Offset of the TB header's u32 ``size`` field, and the header size (the test's own
#: splitter, independent of tigertunnel.wire.frames).
SIZE_OFFSET = 96
HEADER_SIZE = 256


def digest(frame: bytes) -> str:
    """A short digest, so that a mismatch never prints megabytes."""
    return hashlib.sha256(frame).hexdigest()[:16]


def _reactor() -> Any:
    from twisted.internet import reactor
    return reactor


class FrameSplitter:
    """Cuts a TB byte stream into frames using the header's size field."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[bytes]:
        """Add bytes; return the frames completed by them."""
        self._buffer += data
        frames = []
        start = 0
        while len(self._buffer) - start >= HEADER_SIZE:
            size = int.from_bytes(
                self._buffer[start + SIZE_OFFSET:start + SIZE_OFFSET + 4], "little")
            if size < HEADER_SIZE:
                raise AssertionError(f"TB frame with size field {size}")
            if len(self._buffer) - start < size:
                break
            frames.append(bytes(self._buffer[start:start + size]))
            start += size
        del self._buffer[:start]
        return frames


class Peer(Protocol):
    """A TB client or replica played by the test: records digests of frames."""

    def __init__(self, on_made: Optional[Callable[["Peer"], None]] = None) -> None:
        self.splitter = FrameSplitter()
        self.digests: List[str] = []
        self.on_frame: Optional[Callable[[], None]] = None
        self.on_made = on_made
        self.lost: "defer.Deferred[None]" = defer.Deferred()
        self.is_lost = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        if self.on_made is not None:
            self.on_made(self)

    def dataReceived(self, data: bytes) -> None:
        for frame in self.splitter.feed(data):
            self.digests.append(digest(frame))
        if self.on_frame is not None:
            self.on_frame()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.is_lost = True
        self.lost.callback(None)


class PeerFactory(Factory):
    """Builds :class:`Peer`; as a server, queues every accepted peer."""

    noisy = False

    def __init__(self) -> None:
        self.peers: List[Peer] = []
        self.accepted: "defer.DeferredQueue[Peer]" = defer.DeferredQueue()

    def buildProtocol(self, addr: Any) -> Peer:
        peer = Peer(self.accepted.put)
        self.peers.append(peer)
        return peer


class Replay:
    """One recorded connection, replayed between a fake TB client and replica."""

    def __init__(self, conn: int, frames: List[TraceFrame]) -> None:
        self.conn = conn
        self.up = [f.data for f in frames if f.dir == "up"]
        self.down = [f.data for f in frames if f.dir == "down"]
        # For each frame: how many frames of the other direction precede it.
        self.up_waits: List[int] = []
        self.down_waits: List[int] = []
        ups = downs = 0
        for f in frames:
            if f.dir == "up":
                self.up_waits.append(downs)
                ups += 1
            else:
                self.down_waits.append(ups)
                downs += 1
        self.sent_up = 0
        self.sent_down = 0
        self.client: Optional[Peer] = None
        self.replica: Optional[Peer] = None
        self.done: "defer.Deferred[None]" = defer.Deferred()

    def start(self, client: Peer, replica: Peer) -> None:
        """Bind the two sockets' peers and send what may be sent."""
        self.client, self.replica = client, replica
        client.on_frame = replica.on_frame = self.advance
        client.lost.addCallback(self._lost, "TB client")
        replica.lost.addCallback(self._lost, "replica")
        self.advance()

    def progress(self) -> str:
        """Frames received so far, for failure messages."""
        assert self.client is not None and self.replica is not None
        return (f"conn {self.conn}: replica got {len(self.replica.digests)}/"
                f"{len(self.up)} up frames, TB client got "
                f"{len(self.client.digests)}/{len(self.down)} down frames")

    def advance(self) -> None:
        """Send every frame whose predecessors from the other side arrived."""
        client, replica = self.client, self.replica
        assert client is not None and replica is not None
        batch = []
        while (self.sent_up < len(self.up)
               and len(client.digests) >= self.up_waits[self.sent_up]):
            batch.append(self.up[self.sent_up])
            self.sent_up += 1
        if batch:
            client.transport.writeSequence(batch)
        batch = []
        while (self.sent_down < len(self.down)
               and len(replica.digests) >= self.down_waits[self.sent_down]):
            batch.append(self.down[self.sent_down])
            self.sent_down += 1
        if batch:
            replica.transport.writeSequence(batch)
        if (len(replica.digests) >= len(self.up)
                and len(client.digests) >= len(self.down)
                and not self.done.called):
            self.done.callback(None)

    def _lost(self, _: None, who: str) -> None:
        if not self.done.called:
            self.done.errback(AssertionError(
                f"{who} connection closed early; {self.progress()}"))

    def check(self, case: TestCase) -> None:
        """Assert both directions arrived byte-identical and in order."""
        assert self.client is not None and self.replica is not None
        case.assertEqual(self.replica.digests, [digest(f) for f in self.up],
                         f"conn {self.conn}: up frames differ")
        case.assertEqual(self.client.digests, [digest(f) for f in self.down],
                         f"conn {self.conn}: down frames differ")


def connections(name: str) -> Dict[int, List[TraceFrame]]:
    """The frames of trace ``name`` grouped by recorded connection, in order."""
    conns: Dict[int, List[TraceFrame]] = {}
    for f in load_trace(name):
        conns.setdefault(f.conn, []).append(f)
    return conns


class Harness:
    """A tunnel server and client on real loopback ports, with a fake replica.

    TB clients connect to ``client_port``; the client's pool connects to
    ``server_port``; the server's streams connect to the replica factory.
    """

    def __init__(self, case: TestCase, kem: bool, pool_size: int = 2) -> None:
        self.case = case
        self.kem = kem
        self.pool_size = pool_size
        self.replicas = PeerFactory()
        self.tb_clients: List[Peer] = []
        self.client_mux: Optional[ClientMultiplexer] = None
        self.server_mux: Optional[ServerMultiplexer] = None
        self.backend_port: Optional[IListeningPort] = None
        self.server: Optional[MultiService] = None
        self.client: Optional[MultiService] = None

    def _configs(self, backend_port: int) -> "tuple[TunnelConfig, TunnelConfig]":
        keys = procs.fresh_dir(self.case.mktemp())
        keygen(os.path.join(keys, "psk.key"))
        psk = load_psk_file(os.path.join(keys, "psk.key"))
        server = TunnelConfig("server", [ProxyPair(
            0, Address("127.0.0.1", self.server_port),
            Address("127.0.0.1", backend_port))], psk=psk)
        client = TunnelConfig("client", [ProxyPair(
            0, Address("127.0.0.1", self.client_port),
            Address("127.0.0.1", self.server_port))], psk=psk,
            pool_size=self.pool_size)
        if self.kem:
            prefix = os.path.join(keys, "kem")
            kemgen(prefix)
            # require_kem: a PSK-only handshake would fail.
            server = replace(server, kem_secret=load_kem_secret_file(prefix + ".key"),
                             require_kem=True)
            client = replace(client, kem_public=load_kem_public_file(prefix + ".pub"))
        return server, client

    async def start(self, with_server: bool = True) -> None:
        """Start the replica listener, the server (optionally) and the client.

        Returns once every pool connection is up (with a server).
        """
        reactor = _reactor()
        self.case.addCleanup(self.stop)
        self.backend_port = reactor.listenTCP(0, self.replicas,
                                              interface="127.0.0.1")
        self.server_port, self.client_port = procs.free_ports(2)
        server_cfg, client_cfg = self._configs(self.backend_port.getHost().port)
        self.server = build_service(server_cfg, reactor)
        self.client = build_service(client_cfg, reactor)
        self.server_mux = next(iter(self.server))  # type: ignore[assignment]
        self.client_mux = next(iter(self.client))  # type: ignore[assignment]
        if with_server:
            self.start_server()
        self.client.startService()
        if with_server:
            await self.pool_up(10)

    def start_server(self) -> None:
        """Start the tunnel server (of a harness started without one)."""
        assert self.server is not None
        self.server.startService()

    async def pool_up(self, timeout: float) -> None:
        """Wait until every pool connection of the client is established."""
        mux = self.client_mux
        assert mux is not None
        await procs.wait_until(
            lambda: sum(link.established for link in mux.pool_connections) == self.pool_size,
            timeout, f"{self.pool_size} pool connections up")

    async def tb_client(self) -> Peer:
        """Connect a fake TB client to the tunnel client's listener."""
        endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", self.client_port,
                                      timeout=5)
        factory = PeerFactory()
        peer = await endpoint.connect(factory)
        self.tb_clients.append(peer)
        return peer

    async def next_replica(self) -> Peer:
        """Wait for the server's next backend connection."""
        return await self.replicas.accepted.get().addTimeout(5, _reactor())

    async def stop(self) -> None:
        """Close everything and wait until every socket is gone."""
        reactor = _reactor()
        for peer in self.tb_clients:
            if not peer.is_lost:
                peer.transport.abortConnection()
        await procs.wait_until(lambda: all(p.is_lost for p in self.tb_clients),
                               5, "TB client connections to close")
        if self.client is not None and self.client.running:
            await defer.maybeDeferred(self.client.stopService).addTimeout(10, reactor)
        mux = self.server_mux
        if mux is not None:
            await procs.wait_until(
                lambda: not mux.pool_connections and not mux.sessions and not mux.pending,
                5, "the server to drop its pool connections and sessions")
        await procs.wait_until(
            lambda: all(p.is_lost for p in self.replicas.peers), 5,
            "backend connections to close")
        if self.server is not None and self.server.running:
            await defer.maybeDeferred(self.server.stopService).addTimeout(10, reactor)
        if self.backend_port is not None:
            await defer.maybeDeferred(self.backend_port.stopListening)


class TraceReplayTests(TestCase):
    """Recorded TigerBeetle traffic crosses real sockets byte-identical."""

    timeout = 60

    async def replay(self, name: str, kem: bool) -> List[Replay]:
        """Replay every connection of trace ``name`` concurrently through one tunnel."""
        harness = Harness(self, kem=kem, pool_size=2)
        await harness.start()
        replays = []
        for conn, frames in connections(name).items():
            replay = Replay(conn, frames)
            client = await harness.tb_client()
            replica = await harness.next_replica()
            replay.start(client, replica)
            replays.append(replay)
        await defer.gatherResults([r.done for r in replays],
                                  consumeErrors=True).addTimeout(30, _reactor())
        for replay in replays:
            replay.check(self)
        assert harness.client_mux is not None
        self.streams_per_link = sorted(
            len(link.streams) for link in harness.client_mux.pool_connections)
        return replays

    async def test_single_trace_psk(self) -> None:
        """The single-replica trace (up to 1 MiB frames) crosses a PSK tunnel byte-identical and in order."""
        replays = await self.replay(SINGLE, kem=False)
        self.assertEqual([(len(r.up), len(r.down)) for r in replays], [(8, 8)])

    async def test_cluster3_concurrent_psk(self) -> None:
        """All six connections of the 3-replica trace run at once over a PSK pool, every frame intact and in order."""
        replays = await self.replay(CLUSTER3, kem=False)
        self.assertEqual(sum(len(r.up) + len(r.down) for r in replays), 650)
        self.assertEqual(len(replays), 6)
        self.assertEqual(self.streams_per_link, [3, 3])

    async def test_cluster3_concurrent_kem(self) -> None:
        """All six connections of the 3-replica trace run at once over a KEM-only pool, every frame intact and in order."""
        replays = await self.replay(CLUSTER3, kem=True)
        self.assertEqual(sum(len(r.up) + len(r.down) for r in replays), 650)
        self.assertEqual(self.streams_per_link, [3, 3])


class ClosePathTests(TestCase):
    """Closes propagate across real sockets within a few seconds."""

    timeout = 60

    async def connected_pair(self, harness: Harness) -> "tuple[Peer, Peer]":
        """A TB client and its backend connection, with one frame delivered."""
        await harness.start()
        client = await harness.tb_client()
        replica = await harness.next_replica()
        first = next(f.data for f in load_trace(SINGLE) if f.dir == "up")
        client.transport.write(first)
        await procs.wait_until(lambda: len(replica.digests) == 1, 5,
                               "the first frame at the replica")
        self.assertEqual(replica.digests, [digest(first)])
        return client, replica

    async def test_tb_client_close_closes_backend(self) -> None:
        """A TB client that closes its connection makes the server close the backend connection."""
        harness = Harness(self, kem=False)
        client, replica = await self.connected_pair(harness)
        client.transport.loseConnection()
        await replica.lost.addTimeout(5, _reactor())
        mux = harness.server_mux
        assert mux is not None
        await procs.wait_until(lambda: not mux.sessions, 5,
                               "the server to forget the session")

    async def test_backend_close_closes_tb_client(self) -> None:
        """A backend that closes its connection makes the tunnel client close the TB client's connection."""
        harness = Harness(self, kem=False)
        client, replica = await self.connected_pair(harness)
        replica.transport.loseConnection()
        await client.lost.addTimeout(5, _reactor())
        mux = harness.client_mux
        assert mux is not None
        await procs.wait_until(lambda: not mux.sessions, 5,
                               "the client to forget the session")

    async def test_backend_refusing_closes_tb_client(self) -> None:
        """A backend that refuses the connection makes the TB client's connection close."""
        harness = Harness(self, kem=False)
        await harness.start()
        assert harness.backend_port is not None
        await harness.backend_port.stopListening()
        client = await harness.tb_client()
        await client.lost.addTimeout(5, _reactor())
        self.assertEqual(client.digests, [])


class PoolStartTests(TestCase):
    """The client's listener and pool before and after the server exists."""

    timeout = 60

    async def test_no_server_closes_tb_client_at_once(self) -> None:
        """With no tunnel server running the client's listener accepts a TB connection and closes it at once."""
        harness = Harness(self, kem=False)
        await harness.start(with_server=False)
        reactor = _reactor()
        started = reactor.seconds()
        client = await harness.tb_client()  # the listener is open
        await client.lost.addTimeout(5, reactor)
        self.assertLess(reactor.seconds() - started, 3.0)
        self.assertEqual(client.digests, [])
        self.assertEqual(harness.replicas.peers, [])

    async def test_pool_comes_up_when_server_starts_late(self) -> None:
        """A client started before its server gets its pool up once the server listens, and then carries frames."""
        harness = Harness(self, kem=False)
        await harness.start(with_server=False)
        mux = harness.client_mux
        assert mux is not None
        # Let a few connection attempts fail first.
        await procs.wait_until(lambda: all(slot.failures >= 2 for slot in mux.pool),
                               5, "failed pool connection attempts")
        harness.start_server()
        await harness.pool_up(10)
        client = await harness.tb_client()
        replica = await harness.next_replica()
        replay = Replay(0, load_trace(SINGLE))
        replay.start(client, replica)
        await replay.done.addTimeout(10, _reactor())
        replay.check(self)
