"""Both tunnel ends on real sockets, for the integration tests, and what they measure.

:class:`InProcessTunnel` runs the tunnel server and client in this process
with ``build_service`` and the real reactor, in front of a
:class:`~tests.integration.tbpeers.ScriptedBackend`, optionally with a
:class:`~tests.integration.faults.FaultProxy` on the pool connections.
:class:`Daemons` runs them as daemonized ``twistd`` processes, for tests
about processes (death, restart, descriptors, memory), measured from
``/proc``.

Each test prints what it measured (lines starting ``[topic]``) and appends
them to ``fault-measurements.txt`` in trial's working directory.
``TIGERTUNNEL_LONG=1`` runs the long variants (10,000 churned sessions,
1,000 concurrent sessions for 30 s, a black-holed tunnel server found by TCP
keepalive, a hung pool connection found by ``TCP_USER_TIMEOUT``).
"""

import os
import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.faults import C2S, Fault, FaultProxy
from tests.integration.tbpeers import (
    Script,
    ScriptedBackend,
    TBPeer,
    digest,
    filler,
    make_frame,
    tb_connect,
    the_reactor,
)
from tigertunnel.config.model import Address, ProxyPair, TunnelConfig
from tigertunnel.keys.files import load_psk_file
from tigertunnel.keys.generate import keygen
from tigertunnel.net.multiplexer import ClientMultiplexer, ServerMultiplexer, build_service

LONG = os.environ.get("TIGERTUNNEL_LONG") == "1"
#: Seconds within which a fault must be acted on when the peer's kernel
#: tells (FIN, RST, refused connect, authentication failure).
DEADLINE = 5.0
#: The dead-peer budget for a silent (black-holed) peer: TCP keepalive
#: 5 s idle + 3 probes 4 s apart, TCP_USER_TIMEOUT 17 s, plus slack.
DEAD_PEER_BUDGET = 25.0
#: Handshake deadline configured on the in-process server.
HANDSHAKE_TIMEOUT = 1.0



def record(topic: str, text: str) -> None:
    """Print a measurement under ``topic`` and append it to ``fault-measurements.txt``."""
    line = f"[{topic}] {text}"
    print(line)
    with open("fault-measurements.txt", "a") as f:
        f.write(line + "\n")


def ms(seconds: float) -> str:
    """Seconds as a short millisecond string."""
    return f"{seconds * 1000:.0f} ms"


class LogCapture:
    """Collects the text of every log event published while it is installed."""

    def __init__(self, case: TestCase) -> None:
        self.lines: List[str] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: Dict[str, Any]) -> None:
        self.lines.append(formatEvent(event))

    def matching(self, text: str) -> List[str]:
        """The lines that contain ``text``."""
        return [line for line in self.lines if text in line]


class RawPeer(Protocol):
    """A client speaking raw bytes to the tunnel server; records the reply."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: "defer.Deferred[float]" = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.lost.called:  # a waiter may have timed out
            self.lost.callback(time.monotonic())


async def raw_connect(port: int) -> RawPeer:
    """Connect a :class:`RawPeer` to 127.0.0.1:``port``."""
    endpoint = TCP4ClientEndpoint(the_reactor(), "127.0.0.1", port, timeout=5)
    peer: RawPeer = await endpoint.connect(Factory.forProtocol(RawPeer))
    return peer


async def closed_within(peer: RawPeer, timeout: float, what: str) -> float:
    """Wait until the server closes ``peer``; abort it and fail after ``timeout`` s."""
    try:
        return await peer.lost.addTimeout(timeout, the_reactor())
    except defer.TimeoutError:
        peer.transport.abortConnection()
        raise AssertionError(f"{what}: the server kept the connection open for "
                             f"{timeout} s (reply {bytes(peer.received)[:60].hex()})"
                             ) from None


def listening_backend(case: TestCase, script: Optional[Script] = None) -> ScriptedBackend:
    """A :class:`ScriptedBackend` listening on 127.0.0.1 until ``case`` ends."""
    backend = ScriptedBackend(script)
    backend.listen()
    case.addCleanup(backend.refuse)
    return backend


def psk_file(directory: str) -> str:
    """Write a fresh PSK key file in ``directory`` and return its path."""
    path = os.path.join(directory, "psk.key")
    keygen(path)
    return path


async def echo_rtt(peer: TBPeer, tag: int, size: int = 1024) -> float:
    """Send one ordinary frame on ``peer`` (echoed by the backend); return its RTT."""
    count = len(peer.digests)
    frame = make_frame(filler(size, tag), tag)
    started = time.monotonic()
    peer.send(frame)
    await peer.wait_frames(count + 1, DEADLINE)
    if peer.digests[count] != digest(frame):
        raise AssertionError(f"echo of frame {tag} is not byte-identical")
    return time.monotonic() - started


def first_link(fault: Fault, direction: str,
               later: Optional[Callable[[int], Tuple[Fault, Fault]]] = None,
               ) -> Callable[[int], Tuple[Fault, Fault]]:
    """Put ``fault`` on ``direction`` of the first proxied connection only."""
    def faults(index: int) -> Tuple[Fault, Fault]:
        if index == 0:
            return (fault, Fault()) if direction == C2S else (Fault(), fault)
        return later(index) if later is not None else (Fault(), Fault())
    return faults


def random_size(rng: random.Random, largest: int = 1 << 20) -> int:
    """A TB frame size from 256 B to ``largest``, log-uniform, 5 % exactly ``largest``."""
    if rng.random() < 0.05:
        return largest
    return min(largest, int(256 * (largest / 256) ** rng.random()))



class InProcessTunnel:
    """Tunnel server and client in this process, a scripted backend, a fault proxy.

    TB clients connect to ``client_port``; the client's pool connections go
    through ``proxy`` (when given faults) to ``server_port``; the server's
    streams go to ``backend``.
    """

    def __init__(self, case: TestCase, *, pool_size: int = 1,
                 faults: Optional[Callable[[int], Tuple[Fault, Fault]]] = None,
                 script: Optional[Script] = None, client_max: int = 1000,
                 server_max: int = 1000) -> None:
        self.case = case
        self.pool_size = pool_size
        self.faults = faults
        self.backend = ScriptedBackend(script)
        self.client_max = client_max
        self.server_max = server_max
        self.proxy: Optional[FaultProxy] = None
        self.tb_clients: List[TBPeer] = []
        self.server: Optional[MultiService] = None
        self.client: Optional[MultiService] = None
        self.stopped = False

    async def start(self) -> "InProcessTunnel":
        """Start everything; return once every pool connection is up."""
        reactor = the_reactor()
        self.case.addCleanup(self.stop)
        backend_port = self.backend.listen()
        self.server_port, self.client_port = procs.free_ports(2)
        self.psk = load_psk_file(psk_file(procs.fresh_dir(self.case.mktemp())))
        server_cfg = TunnelConfig("server", [ProxyPair(
            0, Address("127.0.0.1", self.server_port),
            Address("127.0.0.1", backend_port))], psk=self.psk,
            max_sessions=self.server_max, handshake_timeout=HANDSHAKE_TIMEOUT)
        self.server = build_service(server_cfg, reactor)
        self.server_mux: ServerMultiplexer = next(iter(self.server))  # type: ignore
        self.server.startService()
        target = self.server_port
        if self.faults is not None:
            self.proxy = FaultProxy(self.server_port, self.faults)
            target = self.proxy.listen()
        client_cfg = TunnelConfig("client", [ProxyPair(
            0, Address("127.0.0.1", self.client_port),
            Address("127.0.0.1", target))], psk=self.psk,
            pool_size=self.pool_size, max_sessions=self.client_max)
        self.client = build_service(client_cfg, reactor)
        self.client_mux: ClientMultiplexer = next(iter(self.client))  # type: ignore
        self.client.startService()
        await self.pool_up()
        return self

    async def pool_up(self, timeout: float = DEADLINE) -> None:
        """Wait until every pool connection of the client is established."""
        mux = self.client_mux
        await procs.wait_until(
            lambda: sum(link.established for link in mux.pool_connections) == self.pool_size,
            timeout, f"{self.pool_size} pool connections up")

    async def tb_client(self) -> TBPeer:
        """Connect a TB client to the tunnel client."""
        peer = await tb_connect(self.client_port)
        self.tb_clients.append(peer)
        return peer

    async def session(self) -> Tuple[TBPeer, TBPeer]:
        """A TB client and its backend connection (sessions opened one at a time)."""
        index = len(self.backend.connections)
        tb = await self.tb_client()
        return tb, await self.backend.connection(index)

    async def round_trip(self, tag: int) -> float:
        """Open a new session, echo one frame through it, close it; return the RTT."""
        tb, conn = await self.session()
        frame = make_frame(filler(700, tag), tag)
        started = time.monotonic()
        tb.send(frame)
        await tb.wait_frames(1, DEADLINE)
        rtt = time.monotonic() - started
        self.case.assertEqual(tb.digests, [digest(frame)])
        tb.transport.loseConnection()
        await conn.wait_lost(DEADLINE)
        return rtt

    async def stop(self) -> None:
        """Close everything and wait (bounded) until every socket is gone."""
        if self.stopped:
            return
        self.stopped = True
        reactor = the_reactor()
        for peer in self.tb_clients:
            if not peer.is_lost:
                peer.transport.abortConnection()
        if self.client is not None and self.client.running:
            await defer.maybeDeferred(self.client.stopService).addTimeout(10, reactor)
        if self.proxy is not None:
            await self.proxy.stop()
        if self.server is not None:
            mux = self.server_mux
            await procs.wait_until(lambda: not mux.pool_connections and not mux.pending, DEADLINE,
                                   "the server to drop its pool connections")
            await defer.maybeDeferred(self.server.stopService).addTimeout(10, reactor)
        await procs.wait_until(lambda: not self.backend.open_connections, DEADLINE,
                               "backend connections to close")
        await self.backend.refuse()



class Daemons:
    """A tunnel server and client run by daemonized ``twistd``, found by pidfile.

    They run on the ``tigertunnel-epoll`` reactor, as the systemd units do.

    TB clients connect to ``client_port``; the server forwards to 127.0.0.1:``backend_port``.
    """

    def __init__(self, case: TestCase, backend_port: int, pool_size: int = 2,
                 server_args: Sequence[str] = (), client_args: Sequence[str] = (),
                 server_prefix: Sequence[str] = (), server_host: str = "127.0.0.1") -> None:
        self.case = case
        self.dir = procs.fresh_dir(case.mktemp())
        case.addCleanup(procs.stop_strays, self.dir)
        self.psk = psk_file(self.dir)
        self.backend_port = backend_port
        self.pool_size = pool_size
        self.server_args = list(server_args)
        self.client_args = list(client_args)
        self.server_prefix = list(server_prefix)
        self.server_host = server_host
        self.server_port, self.client_port = procs.free_ports(2)
        self.server_pid: Optional[int] = None
        self.client_pid: Optional[int] = None
        self.links_up = 0
        self.server_starts = 0
        self.tb_clients: List[TBPeer] = []

    @property
    def pids(self) -> Dict[str, int]:
        """The pid of each running daemon, by role (``client``, ``server``)."""
        return {role: pid for role, pid in (("client", self.client_pid),
                                            ("server", self.server_pid)) if pid is not None}

    def path(self, name: str) -> str:
        """A path in this harness's directory."""
        return os.path.join(self.dir, name)

    async def _twistd(self, role: str, args: Sequence[str], prefix: Sequence[str] = ()) -> int:
        result = await procs.run([
            *prefix, procs.executable("twistd"), "--pidfile", self.path(f"{role}.pid"),
            "--logfile", self.path(f"{role}.log"), "--reactor", "tigertunnel-epoll",
            "tigertunnel", role, *args])
        self.case.assertEqual(result.status, 0, result.describe())
        pid = procs.read_pidfile(self.path(f"{role}.pid"))
        assert pid is not None
        return pid

    async def start_server(self) -> None:
        """Start the tunnel server daemon."""
        self.server_pid = await self._twistd("server", [
            "-p", f"{self.server_host}:{self.server_port},127.0.0.1:{self.backend_port}",
            "-k", self.psk, *self.server_args], self.server_prefix)
        await procs.wait_for_text(self.path("server.log"), f"starting on {self.server_port}",
                                  DEADLINE, count=self.server_starts + 1)
        self.server_starts += 1

    async def start_client(self) -> None:
        """Start the tunnel client daemon and wait for its whole pool."""
        self.client_pid = await self._twistd("client", [
            "-p", f"127.0.0.1:{self.client_port},{self.server_host}:{self.server_port}",
            "-k", self.psk, "-n", str(self.pool_size), *self.client_args])
        await self.pool_up()

    async def pool_up(self, timeout: float = 10.0) -> None:
        """Wait until ``pool_size`` more pool connections came up (client log)."""
        self.links_up += self.pool_size
        await procs.wait_for_text(self.path("client.log"), " up (key id ", timeout,
                                  count=self.links_up)

    async def start(self) -> "Daemons":
        """Start the server, then the client; stop both in cleanups."""
        self.case.addCleanup(self.stop)
        await self.start_server()
        await self.start_client()
        return self

    async def tb_client(self) -> TBPeer:
        """Connect a TB client to the tunnel client."""
        peer = await tb_connect(self.client_port)
        self.tb_clients.append(peer)
        return peer

    async def stop(self) -> None:
        """Close the TB clients, stop both daemons, check their logs for tracebacks."""
        for peer in self.tb_clients:
            if not peer.is_lost:
                peer.transport.abortConnection()
        for pid in (self.client_pid, self.server_pid):
            if pid is not None:
                await procs.stop_pid(pid, timeout=10)
        for role in ("server", "client"):
            log = procs.read_text(self.path(f"{role}.log"))
            self.case.assertNotIn("Traceback", log, f"{role} log: {log[-3000:]}")


def established(pid: int, port: int, local: bool = True) -> List[procs.TcpSocket]:
    """The ESTABLISHED TCP sockets of ``pid`` whose local (or remote) port is ``port``."""
    return [s for s in procs.tcp_sockets(pid) if s.state == "ESTABLISHED"
            and (s.local_port if local else s.remote_port) == port]


def session_sockets(d: Daemons) -> Dict[str, int]:
    """Sessions and pool connections counted from /proc: established TCP sockets by role."""
    assert d.client_pid is not None and d.server_pid is not None
    return {
        "client TB sockets": len(established(d.client_pid, d.client_port)),
        "client pool sockets": len(established(d.client_pid, d.server_port, local=False)),
        "server pool sockets": len(established(d.server_pid, d.server_port)),
        "server backend sockets": len(established(d.server_pid, d.backend_port, local=False)),
    }


async def steady_fd_count(pid: int, timeout: float = DEADLINE) -> int:
    """The descriptor count of ``pid`` once it stayed the same for 0.2 s."""
    seen: List[int] = []

    def steady() -> bool:
        seen.append(procs.fd_count(pid))
        return len(seen) >= 10 and len(set(seen[-10:])) == 1

    await procs.wait_until(steady, timeout, f"a steady descriptor count of pid {pid}")
    return seen[-1]


def fd_listing(pid: int) -> List[str]:
    """What each descriptor of ``pid`` points to (for failure messages)."""
    base = f"/proc/{pid}/fd"
    found = []
    for name in sorted(os.listdir(base), key=int):
        try:
            found.append(f"{name}->{os.readlink(os.path.join(base, name))}")
        except OSError:
            pass
    return found


def close_wait(pid: int) -> List[procs.TcpSocket]:
    """The sockets of ``pid`` the peer closed but ``pid`` did not (CLOSE_WAIT)."""
    return [s for s in procs.tcp_sockets(pid) if s.state == "CLOSE_WAIT"]


async def open_sessions(d: Daemons, backend: ScriptedBackend, count: int) -> List[TBPeer]:
    """Open ``count`` TB sessions and echo one frame through each."""
    peers = []
    for i in range(count):
        peer = await d.tb_client()
        peer.send(make_frame(filler(300 + i, i), i))
        peers.append(peer)
    for peer in peers:
        await peer.wait_frames(1, DEADLINE)
    await procs.wait_until(lambda: len(backend.open_connections) >= count, DEADLINE,
                           f"{count} backend connections")
    return peers


async def all_lost(peers: Sequence[TBPeer], timeout: float, what: str) -> float:
    """Wait (bounded) until every peer is closed; return the last loss time."""
    await procs.wait_until(lambda: all(p.is_lost for p in peers), timeout,
                           f"{what}: {sum(not p.is_lost for p in peers)} of "
                           f"{len(peers)} still open")
    return max(p.lost_at for p in peers)  # type: ignore[type-var]
