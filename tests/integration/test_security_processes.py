"""Security properties checked on real processes: replayed hellos, a frozen server, a flood of connects.

Each test runs the tunnel server (and, where needed, the client) as
daemonized ``twistd`` processes on 127.0.0.1 (:class:`Daemons`), in front
of a scripted backend in this process that counts the connections it
accepts. The mux frames the tests forge are written here from PROTOCOL.md
7.1, independently of :mod:`tigertunnel`.
"""

import os
import signal
import struct
import time
from typing import Any, List

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.faults import Fault, FaultProxy
from tests.integration.tbpeers import filler, make_frame, tb_connect
from tests.integration.tunnels import (
    DEADLINE,
    Daemons,
    RawPeer,
    all_lost,
    closed_within,
    listening_backend,
    ms,
    open_sessions,
    raw_connect,
    record,
)

#: PROTOCOL.md 3.1: a connect ClientHello is 66 bytes; 7.1: a bare stream_open
#: is the 12-byte mux header "XUMZ", u32 stream id, type 1, three zero bytes.
CONNECT_HELLO = 66
SERVER_HELLO = 49
#: README "Protocol extension": a ping is 268 bytes.
PING = 268


def stream_open(stream_id: int) -> bytes:
    """A bare (unauthenticated) stream_open for ``stream_id``."""
    return b"XUMZ" + struct.pack("<I", stream_id) + b"\x01\x00\x00\x00"


async def pause(seconds: float) -> None:
    """Let the reactor run for ``seconds``."""
    from twisted.internet import reactor
    await task.deferLater(reactor, seconds, lambda: None)


async def server_only(case: TestCase, backend_port: int, **kw: Any) -> Daemons:
    """A :class:`Daemons` harness with only its server started (stopped at cleanup)."""
    d = Daemons(case, backend_port, **kw)
    case.addCleanup(d.stop)
    await d.start_server()
    return d


class Recorder(Fault):
    """Forwards one direction unchanged and keeps a copy of its bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def received(self, data: bytes) -> None:
        self.data += data
        super().received(data)


def core_limit(pid: int) -> List[str]:
    """The soft and hard core-file limits of ``pid`` as /proc/PID/limits shows them."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max core file size"):
                return line.split()[4:6]
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


class ReplayTests(TestCase):
    """A ClientHello recorded from a real client costs nothing when replayed."""

    timeout = 90

    async def recorded_hello(self, d: Daemons) -> bytes:
        """Start the client through a recording proxy; return one ClientHello it sent."""
        recorders: List[Recorder] = []

        def faults(index: int) -> Any:
            recorder = Recorder()
            recorders.append(recorder)
            return recorder, Fault()

        proxy = FaultProxy(d.server_port, faults)
        proxy_port = proxy.listen()
        self.addCleanup(proxy.stop)
        real_port, d.server_port = d.server_port, proxy_port
        await d.start_client()
        d.server_port = real_port
        hello = bytes(recorders[0].data[:CONNECT_HELLO])
        self.assertEqual(len(hello), CONNECT_HELLO)
        return hello

    async def replay(self, port: int, hello: bytes, opens: int = 40) -> RawPeer:
        """Send ``hello`` and ``opens`` forged stream_opens to ``port``."""
        peer = await raw_connect(port)
        peer.transport.write(hello + b"".join(stream_open(n) for n in range(1, opens + 1)))
        return peer

    async def test_replay_after_restart_refused(self) -> None:
        """A hello recorded from a real client and replayed with 40 forged stream_opens to the restarted server is refused (status 4): no backend connection, closed at once."""
        backend = listening_backend(self)
        d = await server_only(self, backend.port_number, pool_size=1)
        hello = await self.recorded_hello(d)
        await open_sessions(d, backend, 1)  # the real client works
        accepted = len(backend.connections)
        assert d.server_pid is not None
        self.assertEqual(core_limit(d.server_pid), ["0", "0"], "server not hardened")
        await procs.stop_pid(d.server_pid, timeout=10)
        self.assertTrue(os.path.exists(d.path("server.pid.replay")))
        await d.start_server()
        started = time.monotonic()
        peer = await self.replay(d.server_port, hello)
        closed = await closed_within(peer, DEADLINE, "replayed hello after a restart")
        self.assertEqual(bytes(peer.received), b"\x04")
        await procs.wait_for_text(d.path("server.log"), "replayed ClientHello", DEADLINE)
        self.assertEqual(len(backend.connections), accepted)
        record("replay", f"hello recorded from a real client, server restarted (twistd, "
                         f"replay file next to its pidfile): replay + 40 forged "
                         f"stream_opens answered with status 4 and closed after "
                         f"{ms(closed - started)}; backend connections opened: 0")

    async def test_replay_to_other_end_costs_nothing(self) -> None:
        """Replayed to a server that never saw it (its own replay file), the hello gets a ServerHello but its 40 forged stream_opens open no backend and the connection ends within 5-7 s."""
        backend = listening_backend(self)
        d = await server_only(self, backend.port_number, pool_size=1)
        hello = await self.recorded_hello(d)
        accepted = len(backend.connections)
        other = Daemons(self, backend.port_number, server_args=["--replay-file", "memory"])
        other.psk = d.psk  # another tunnel end that accepts the same key
        self.addCleanup(other.stop)
        await other.start_server()
        started = time.monotonic()
        peer = await self.replay(other.server_port, hello)
        closed = await closed_within(peer, 10, "replayed hello to another server")
        self.assertEqual(len(peer.received), SERVER_HELLO + PING)
        self.assertEqual(peer.received[0], 0)
        self.assertEqual(len(backend.connections), accepted)
        self.assertGreaterEqual(closed - started, 4.5)
        self.assertLessEqual(closed - started, 7.0)
        record("replay", f"hello replayed to another server with the same key: "
                         f"ServerHello and first ping sent, 40 forged stream_opens "
                         f"opened no backend, connection closed after "
                         f"{ms(closed - started)} (no answer to the ping)")


class FrozenServerTests(TestCase):
    """A tunnel server that stops running while its kernel keeps answering."""

    timeout = 120

    async def test_sigstop_closes_sessions(self) -> None:
        """SIGSTOP the tunnel server with three live sessions: the client closes all three within 20 s; after SIGCONT new sessions work."""
        backend = listening_backend(self)
        d = await Daemons(self, backend.port_number, pool_size=2).start()
        peers = await open_sessions(d, backend, 3)
        assert d.server_pid is not None
        os.kill(d.server_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        self.addCleanup(os.kill, d.server_pid, signal.SIGCONT)
        for i, peer in enumerate(peers):  # requests the frozen server never answers
            peer.send(make_frame(filler(500 + i, 10 + i), 10 + i))
        last = await all_lost(peers, 20.0, "sessions on a frozen server")
        os.kill(d.server_pid, signal.SIGCONT)
        resumed = time.monotonic()
        rtt = await self.working_session(d)
        record("frozen server", f"SIGSTOP with 3 live sessions: all closed by the "
                                f"client {ms(last - stopped)} after the stop (budget "
                                f"20 s); after SIGCONT a new session echoed "
                                f"{ms(time.monotonic() - resumed)} later (RTT {ms(rtt)})")

    async def working_session(self, d: Daemons, within: float = 30.0) -> float:
        """Retry new TB sessions until one echoes a frame; return its round-trip time."""
        deadline = time.monotonic() + within
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            peer = await tb_connect(d.client_port)
            frame = make_frame(filler(700, 100 + attempt), 100 + attempt)
            sent = time.monotonic()
            peer.send(frame)
            try:
                await procs.wait_until(lambda: peer.is_lost or len(peer.digests) > 0,
                                       DEADLINE, "an echo or a close")
            except procs.WaitTimeout:
                pass
            if peer.digests:
                rtt = time.monotonic() - sent
                peer.transport.loseConnection()
                return rtt
            if not peer.is_lost:
                peer.transport.abortConnection()
            await pause(0.5)
        raise AssertionError(f"no session worked within {within} s of SIGCONT")


class FloodTests(TestCase):
    """A flood of silent connects from one address does not keep a real client out."""

    timeout = 90

    async def test_silent_flood_from_one_address(self) -> None:
        """While 127.0.0.2 keeps opening silent connections to the server, a real client from 127.0.0.1 brings its pool up and carries sessions."""
        backend = listening_backend(self)
        d = Daemons(self, backend.port_number, pool_size=4)
        self.addCleanup(d.stop)
        await d.start_server()
        flood: List[Any] = []
        endpoint = TCP4ClientEndpoint(procs._reactor(), "127.0.0.1", d.server_port,
                                      timeout=5, bindAddress=("127.0.0.2", 0))
        self.addCleanup(self.close_all, flood)

        async def burst(count: int) -> None:
            for _ in range(count):
                try:
                    flood.append(await endpoint.connect(Factory.forProtocol(RawPeer)))
                except Exception:
                    pass  # evicted before the connect completed

        await burst(200)
        started = time.monotonic()
        client_d = defer.ensureDeferred(d.start_client())
        while not client_d.called:
            await burst(20)
        await client_d
        up = time.monotonic() - started
        peers = await open_sessions(d, backend, 4)
        evicted = sum(1 for peer in flood if peer.lost.called)
        log = procs.read_text(d.path("server.log"))
        self.assertIn("too many pending handshakes", log)
        self.assertEqual(len(peers), 4)
        record("flood", f"{len(flood)} silent connects from 127.0.0.2 ({evicted} evicted "
                        f"by the server): the real client's 4 pool connections came up "
                        f"{ms(up)} after it started, 4 sessions echoed")

    async def close_all(self, peers: List[Any]) -> None:
        """Abort the flood's connections."""
        for peer in peers:
            if peer.transport is not None and not peer.lost.called:
                peer.transport.abortConnection()
