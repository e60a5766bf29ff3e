"""The acceptance suite of the "Reliability" issue: faults on real sockets.

Every test breaks something on purpose (with :mod:`tests.integration.faults`)
and checks the stated outcome within a bounded time. Cases 1-4, 7, 8 and 11
run both tunnel ends in this process with ``build_service`` and the real
reactor; cases 5, 6, 9 and 10 are about processes (death, restart,
descriptors, memory) and run the ends as daemonized ``twistd`` processes,
measured from ``/proc``.

Each test prints what it measured (lines starting ``[case N]``) and appends
them to ``fault-measurements.txt`` in trial's working directory.
``TIGERTUNNEL_LONG=1`` runs the long variants (10,000 churned sessions,
1,000 concurrent sessions for 30 s, a black-holed tunnel server found by TCP
keepalive, a hung pool connection found by ``TCP_USER_TIMEOUT``).
"""

import os
import random
import signal
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration import procs
from tests.integration.faults import (
    C2S,
    CLOSE,
    FLOOD,
    REPLY,
    RESET,
    S2C,
    SLOW,
    UNSOLICITED,
    ByteFault,
    ControlScript,
    Fault,
    FaultProxy,
    Script,
    ScriptedBackend,
    TBPeer,
    TBPeerFactory,
    UnitFault,
    backend_command,
    control_frame,
    digest,
    filler,
    make_frame,
    reply_frame,
)
from tigertunnel.wire import handshake as hs
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
PAST = {"drop": "dropped", "duplicate": "duplicated", "reorder": "reordered"}


# -- helpers ---------------------------------------------------------------------


def _reactor() -> Any:
    from twisted.internet import reactor
    return reactor


def record(case: int, text: str) -> None:
    """Print a measurement and append it to ``fault-measurements.txt``."""
    line = f"[case {case}] {text}"
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
    endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", port, timeout=5)
    peer: RawPeer = await endpoint.connect(Factory.forProtocol(RawPeer))
    return peer


async def closed_within(peer: RawPeer, timeout: float, what: str) -> float:
    """Wait until the server closes ``peer``; abort it and fail after ``timeout`` s."""
    try:
        return await peer.lost.addTimeout(timeout, _reactor())
    except defer.TimeoutError:
        peer.transport.abortConnection()
        raise AssertionError(f"{what}: the server kept the connection open for "
                             f"{timeout} s (reply {bytes(peer.received)[:60].hex()})"
                             ) from None


async def tb_connect(port: int) -> TBPeer:
    """Connect a TB client (:class:`TBPeer`) to 127.0.0.1:``port``."""
    endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", port, timeout=5)
    peer: TBPeer = await endpoint.connect(TBPeerFactory())
    return peer


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


# -- both tunnel ends in this process ---------------------------------------------


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
        reactor = _reactor()
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
        reactor = _reactor()
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


# -- both tunnel ends as twistd daemons, measured from /proc ------------------------


class Daemons:
    """A tunnel server and client run by daemonized ``twistd``, found by pidfile.

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

    def path(self, name: str) -> str:
        """A path in this harness's directory."""
        return os.path.join(self.dir, name)

    async def _twistd(self, role: str, args: Sequence[str], prefix: Sequence[str] = ()) -> int:
        result = await procs.run([
            *prefix, procs.executable("twistd"), "--pidfile", self.path(f"{role}.pid"),
            "--logfile", self.path(f"{role}.log"), "tigertunnel", role, *args])
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


class BlackHoleNet:
    """A network namespace joined to ours by a veth pair whose link can be cut.

    Cutting the link (``ip link set down`` inside the namespace) makes the
    peers on either side vanish without FIN or RST: only TCP keepalive and
    ``TCP_USER_TIMEOUT`` can find out. Uses 198.18.77.0/30 (RFC 2544
    benchmarking addresses); needs root and iproute2. Everything is removed
    in a cleanup.
    """

    host_ip = "198.18.77.1"
    server_ip = "198.18.77.2"

    def __init__(self, name: str) -> None:
        self.name = name
        self.host_link = f"{name}h"
        self.ns_link = f"{name}s"
        self.exec_prefix = ["ip", "netns", "exec", name]

    @staticmethod
    async def ip(*args: str) -> procs.Result:
        """Run ``ip ARGS``."""
        return await procs.run(["ip", *args], timeout=10)

    @classmethod
    async def create(cls, case: TestCase) -> "BlackHoleNet":
        """Build the namespace and the veth pair, or skip the test when impossible."""
        if os.geteuid() != 0 or not os.path.exists("/usr/sbin/ip") and not \
                os.path.exists("/sbin/ip") and not os.path.exists("/usr/bin/ip"):
            raise SkipTest("needs root and iproute2")
        net = cls(f"tt{os.getpid() % 100000}")
        case.addCleanup(net.remove)
        steps = [
            ("netns", "add", net.name),
            ("link", "add", net.host_link, "type", "veth", "peer", "name", net.ns_link,
             "netns", net.name),
            ("addr", "add", f"{net.host_ip}/30", "dev", net.host_link),
            ("link", "set", net.host_link, "up"),
            ("-n", net.name, "addr", "add", f"{net.server_ip}/30", "dev", net.ns_link),
            ("-n", net.name, "link", "set", net.ns_link, "up"),
            ("-n", net.name, "link", "set", "lo", "up"),
        ]
        for step in steps:
            result = await cls.ip(*step)
            if result.status != 0:
                raise SkipTest(f"cannot build a network namespace: ip {' '.join(step)}: "
                               f"{result.stderr.strip()}")
        return net

    async def cut(self) -> None:
        """Take the namespace's end of the link down: packets vanish silently."""
        result = await self.ip("-n", self.name, "link", "set", self.ns_link, "down")
        if result.status != 0:
            raise AssertionError(result.describe())

    async def remove(self) -> None:
        """Delete the veth pair and the namespace."""
        await self.ip("link", "del", self.host_link)
        await self.ip("netns", "del", self.name)


# -- case 1 and 2: what reaches the tunnel server before a handshake ---------------


class HandshakeGateTests(TestCase):
    """Cases 1 and 2: bad, truncated, foreign, replayed or stale hellos never open anything."""

    timeout = 60

    async def start(self) -> InProcessTunnel:
        """A tunnel (no proxy) with one live session, to check the server keeps serving."""
        self.log = LogCapture(self)
        self.tunnel = await InProcessTunnel(self).start()
        self.live, self.live_backend = await self.tunnel.session()
        return self.tunnel

    def hello(self, version: int = hs.EXTENDED_VERSION, key_id: Optional[int] = None,
              psk: Optional[bytes] = None, timestamp: Optional[int] = None,
              operation: int = hs.OP_CONNECT) -> bytes:
        """A connect ClientHello with any field chosen (valid by default)."""
        default_id, default_psk = self.tunnel.psk.first()
        hello = hs.build_connect_hello(
            version, default_id if key_id is None else key_id,
            default_psk if psk is None else psk, os.urandom(16),
            int(time.time()) if timestamp is None else timestamp)
        if operation != hs.OP_CONNECT:
            hello = hello[:1] + bytes([operation]) + hello[2:]
        return hello

    async def refused(self, case: int, what: str, data: bytes,
                      reply: Sequence[bytes], deadline: float = 1.0) -> float:
        """Send ``data`` (followed by two stream_open units) to the server and check the refusal.

        The connection must close within ``deadline`` seconds with one of
        the ``reply`` byte strings received, no backend connection may be
        made, and both the live session and a new one must still work.
        """
        t = self.tunnel
        before = len(t.backend.connections)
        peer = await raw_connect(t.server_port)
        started = time.monotonic()
        opens = b"".join(b"XUMZ" + i.to_bytes(4, "little") + bytes(4) for i in (7, 8))
        peer.transport.write(data + opens)
        closed_at = await closed_within(peer, deadline + 1, what)
        elapsed = closed_at - started
        self.assertIn(bytes(peer.received), list(reply), what)
        self.assertLessEqual(elapsed, deadline, what)
        self.assertEqual(len(t.backend.connections), before,
                         f"{what}: a backend connection was made")
        frame = make_frame(b"still here", 99)
        self.live.send(frame)
        await self.live.wait_frames(len(self.live.digests) + 1, DEADLINE)
        rtt = await t.round_trip(100)
        self.assertEqual(len(t.server_mux.pool_connections), 1, "the real pool connection was dropped")
        record(case, f"{what}: closed after {ms(elapsed)}, reply "
                     f"{bytes(peer.received).hex() or 'none'}, backend connections "
                     f"{len(t.backend.connections) - before - 1} (excluding the check "
                     f"session), next session RTT {ms(rtt)}")
        return elapsed

    async def test_wrong_psk(self) -> None:
        """A hello made with the wrong PSK gets status 4 and is closed at once; no backend connection."""
        await self.start()
        await self.refused(1, "wrong PSK", self.hello(psk=os.urandom(32)), [b"\x04"])

    async def test_unknown_key_id(self) -> None:
        """A hello naming an unknown key id gets status 4 (like a bad hash) and is closed at once."""
        await self.start()
        await self.refused(1, "unknown key id", self.hello(key_id=424242), [b"\x04"])

    async def test_truncated_hello_then_silence(self) -> None:
        """Half a hello and then silence is closed at the handshake deadline, with no reply."""
        await self.start()
        hello = self.hello()
        t = self.tunnel
        before = len(t.backend.connections)
        peer = await raw_connect(t.server_port)
        started = time.monotonic()
        peer.transport.write(hello[:30])
        closed_at = await closed_within(peer, HANDSHAKE_TIMEOUT + 3, "truncated hello")
        elapsed = closed_at - started
        self.assertEqual(bytes(peer.received), b"")
        self.assertGreaterEqual(elapsed, HANDSHAKE_TIMEOUT - 0.05)
        self.assertLessEqual(elapsed, HANDSHAKE_TIMEOUT + 0.5)
        self.assertEqual(len(t.backend.connections), before)
        self.assertEqual(len(self.log.matching("handshake timed out")), 1)
        await t.round_trip(100)
        record(1, f"truncated hello (30 of 66 bytes) then silence: closed after "
                  f"{ms(elapsed)} (handshake deadline {HANDSHAKE_TIMEOUT} s), no reply")

    async def test_random_bytes(self) -> None:
        """Random bytes (several seeds) are closed at once with at most a failure status."""
        await self.start()
        for seed, operation in ((0, None), (1, None), (2, 0), (3, 1)):
            data = bytearray(random.Random(seed).randbytes(4096))
            if operation is not None:  # shaped like a version-2 connect / kemconnect hello
                data[0:2] = bytes((hs.EXTENDED_VERSION, operation))
            await self.refused(1, f"4 KiB random bytes (seed {seed}, operation byte "
                                  f"{data[1]})", bytes(data), [b"", b"\x04"])

    async def test_http_request(self) -> None:
        """An HTTP request is closed at once without a reply."""
        await self.start()
        await self.refused(1, "HTTP request", b"GET / HTTP/1.1\r\nHost: tunnel\r\n"
                           b"User-Agent: curl/8.0\r\nAccept: */*\r\n\r\n", [b""])

    async def test_tls_client_hello(self) -> None:
        """A TLS ClientHello is closed at once without a reply."""
        await self.start()
        body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
                + b"\x00\x04\x13\x01\x13\x02\x01\x00" + b"\x00\x10\x00\x00\x00\x0c"
                + b"\x00\x00\x09localhost")
        handshake = b"\x01" + len(body).to_bytes(3, "big") + body
        record_ = b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake
        await self.refused(1, "TLS ClientHello", record_, [b""])

    async def test_unknown_operation(self) -> None:
        """A hello with operation byte 2 (unknown) is closed at once without a reply."""
        await self.start()
        await self.refused(1, "unknown operation 2", self.hello(operation=2), [b""])

    async def test_unknown_version(self) -> None:
        """A hello with version byte 3 (unknown), even with a valid hash, is refused and closed at once."""
        await self.start()
        await self.refused(1, "unknown version 3 (valid hash)", self.hello(version=3),
                           [b"\x04", b""])

    async def test_replayed_hello(self) -> None:
        """A byte-identical hello presented again is refused with status 4 and 'replayed' in the log."""
        t = await self.start()
        hello = self.hello()
        first = await raw_connect(t.server_port)
        first.transport.write(hello)
        await procs.wait_until(lambda: len(first.received) >= hs.SERVER_HELLO_SIZE,
                               DEADLINE, "the first ServerHello")
        self.assertEqual(first.received[0], 0)
        first.transport.loseConnection()
        await first.lost.addTimeout(DEADLINE, _reactor())
        await self.refused(2, "replayed hello", hello, [b"\x04"])
        self.assertEqual(len(self.log.matching("replayed ClientHello")), 1)

    async def test_timestamp_window_real_socket(self) -> None:
        """On real sockets hellos 3600 s off are accepted and 3601 s off refused with status 5, the skew logged."""
        t = await self.start()
        # Start at the beginning of a second so that the server's whole-second
        # clock reads the same second as ours.
        await procs.wait_until(lambda: time.time() % 1 < 0.3, 2, "a fresh second")
        now = int(time.time())
        peers = {}
        for skew in (3600, -3600, 3601, -3601):
            peer = await raw_connect(t.server_port)
            peer.transport.write(self.hello(timestamp=now + skew))
            peers[skew] = peer
        for skew in (3600, -3600):
            await procs.wait_until(lambda: len(peers[skew].received) >= 49, DEADLINE,
                                   f"ServerHello for skew {skew}")
            self.assertEqual(peers[skew].received[0], 0, f"skew {skew} refused")
            peers[skew].transport.loseConnection()
        for skew in (3601, -3601):
            await closed_within(peers[skew], DEADLINE, f"skew {skew}")
            self.assertEqual(bytes(peers[skew].received), b"\x05")
            self.assertEqual(len(self.log.matching(f"(clock skew {skew} s)")), 1,
                             self.log.matching("clock skew"))
        record(2, "real socket: timestamps now±3600 s accepted, now±3601 s refused "
                  "with status 5; log: " + " | ".join(self.log.matching("clock skew")))


class TimestampWindowTests(TestCase):
    """Case 2 at the handshake level, on an exact clock (no whole-second race)."""

    def test_window_edges(self) -> None:
        """With the server clock at T+0.999, timestamps T±3600 are accepted and T±3601 refused with skew ±3601."""
        psk = os.urandom(32)
        now = 1_800_000_000
        for skew, accepted in ((3600, True), (-3600, True), (3601, False), (-3601, False)):
            hello = hs.build_connect_hello(2, 5, psk, os.urandom(16), now + skew)
            server = hs.ServerHandshake({5: psk}, now=lambda: now + 0.999,
                                        replay_cache=hs.ReplayCache(now=lambda: now))
            result = server.feed(hello)
            if accepted:
                self.assertIsInstance(result, hs.Accepted, skew)
            else:
                self.assertIsInstance(result, hs.Rejected, skew)
                assert isinstance(result, hs.Rejected)
                self.assertEqual((result.status, result.skew),
                                 (hs.Status.TIMESTAMP_INVALID, skew))


# -- case 3 and 4: faults on the pool connection ------------------------------------


class PoolFaultTests(TestCase):
    """Cases 3 and 4: a tampered or cut pool connection fails closed and comes back."""

    timeout = 120

    async def scenario(self, direction: str, fault: UnitFault, what: str) -> Dict[str, float]:
        """Two sessions on one pool connection; a fault on the third data unit of ``direction``.

        Checks that the pool connection and both sessions (TB clients and
        backend connections) close, that nothing sent after the fault
        arrives anywhere, and that a new session works on a new pool
        connection.
        """
        t = await InProcessTunnel(self, faults=first_link(fault, direction)).start()
        a, backend_a = await t.session()
        b, backend_b = await t.session()
        f1 = make_frame(filler(1500, 1), 1)
        f2 = make_frame(filler(1500, 2), 2)
        a.send(f1)
        await a.wait_frames(1, DEADLINE)
        b.send(f2)
        await b.wait_frames(1, DEADLINE)
        assert t.proxy is not None
        link = t.proxy.links[0]
        allowed_a_backend: List[str] = [digest(f1)]
        allowed_a_tb: List[str] = [digest(f1)]
        if direction == C2S:
            f3, f4, f5 = (make_frame(filler(2000, i), i) for i in (3, 4, 5))
            a.send(f3)
            await fault.fired.addTimeout(DEADLINE, _reactor())
            b.send(f4)
            a.send(f5)
            if fault.action == "duplicate":  # the original f3 went through
                allowed_a_backend.append(digest(f3))
                allowed_a_tb.append(digest(f3))
        else:
            request = control_frame(REPLY, count=3, size=3000, tag=3)
            a.send(request)
            allowed_a_backend.append(digest(request))
            await fault.fired.addTimeout(DEADLINE, _reactor())
            if fault.action == "duplicate":
                allowed_a_tb.append(digest(reply_frame(3, 0, 3000)))
        assert fault.fired_at is not None
        for peer in (a, b, backend_a, backend_b):
            await peer.wait_lost(DEADLINE)
        await link.closed.addTimeout(DEADLINE, _reactor())
        detection = {
            "pool connection closed": link.closed_at - fault.fired_at,
            "TB clients closed": max(a.lost_at, b.lost_at) - fault.fired_at,  # type: ignore
            "backend connections closed": max(backend_a.lost_at,  # type: ignore
                                              backend_b.lost_at) - fault.fired_at,
        }
        # Nothing after the fault reached a backend or a TB client.
        self.assertIn(backend_a.digests, [allowed_a_backend[:n] for n in
                                          range(1, len(allowed_a_backend) + 1)], what)
        self.assertEqual(backend_b.digests, [digest(f2)], what)
        self.assertIn(a.digests, [allowed_a_tb[:n] for n in
                                  range(1, len(allowed_a_tb) + 1)], what)
        self.assertEqual(b.digests, [digest(f2)], what)
        self.assertEqual((bytes(a.splitter.buffer), bytes(b.splitter.buffer)), (b"", b""),
                         f"{what}: a partial frame was delivered")
        await t.pool_up()
        rtt = await t.round_trip(50)
        self.assertEqual(len(t.proxy.links), 2, "the pool connection was replaced once")
        record(3 if fault.action not in ("cut", "reset") else 4,
               f"{what}: " + ", ".join(f"{k} {ms(v)} after the fault"
                                       for k, v in detection.items())
               + f"; new session on the new pool connection RTT {ms(rtt)}")
        await t.stop()
        return detection

    #: Bit positions in a data unit: (what, offset in the unit, bit).
    FLIPS = [
        ("tag", 12 + 5, 3),
        ("ciphertext (header part)", 12 + 20 + 40, 0),
        ("ciphertext (body part)", 12 + 256 + 100, 7),
        ("mux header magic", 2, 1),
        ("mux header stream id", 4, 0),
        ("mux header type (data -> stream_close)", 8, 1),
        ("mux header reserved byte", 10, 4),
    ]

    async def test_flipped_bit_client_to_server(self) -> None:
        """One flipped bit in a client-to-server frame's tag, ciphertext or mux header fails the pool connection closed."""
        for what, offset, bit in self.FLIPS:
            await self.scenario(C2S, UnitFault("flip", index=2, offset=offset, bit=bit),
                                f"c2s flipped bit in {what}")

    async def test_flipped_bit_server_to_client(self) -> None:
        """One flipped bit in a server-to-client frame's tag, ciphertext or mux header fails the pool connection closed."""
        for what, offset, bit in self.FLIPS:
            await self.scenario(S2C, UnitFault("flip", index=2, offset=offset, bit=bit),
                                f"s2c flipped bit in {what}")

    async def test_dropped_duplicated_reordered_client_to_server(self) -> None:
        """A dropped, duplicated or reordered client-to-server frame fails the pool connection closed."""
        for action in ("drop", "duplicate", "reorder"):
            await self.scenario(C2S, UnitFault(action, index=2), f"c2s {PAST[action]} frame")

    async def test_dropped_duplicated_reordered_server_to_client(self) -> None:
        """A dropped, duplicated or reordered server-to-client frame fails the pool connection closed."""
        for action in ("drop", "duplicate", "reorder"):
            await self.scenario(S2C, UnitFault(action, index=2), f"s2c {PAST[action]} frame")

    async def test_relabelled_frame(self) -> None:
        """A frame relabelled to the other live stream, either way, fails the pool connection closed."""
        await self.scenario(C2S, UnitFault("relabel", index=2, stream=2),
                            "c2s frame of stream 1 relabelled to stream 2")
        await self.scenario(S2C, UnitFault("relabel", index=2, stream=2),
                            "s2c frame of stream 1 relabelled to stream 2")

    async def cut_mid_frame(self, direction: str, action: str) -> None:
        """Cut (or reset) the pool connection in the middle of a 1 MiB frame, then refuse 3 reconnections."""
        def later(index: int) -> Tuple[Fault, Fault]:
            if index <= 3:  # cut as soon as the ClientHello arrives
                return ByteFault("cut", at=0), Fault()
            return Fault(), Fault()

        fault = UnitFault(action, index=1)
        t = await InProcessTunnel(self, faults=first_link(fault, direction, later)).start()
        a, backend_a = await t.session()
        f1 = make_frame(filler(1000, 1), 1)
        a.send(f1)
        await a.wait_frames(1, DEADLINE)
        if direction == C2S:
            big = make_frame(filler((1 << 20) - 256, 2), 2)
            a.send(big)
        else:
            a.send(control_frame(REPLY, count=1, size=1 << 20, tag=2))
        await fault.fired.addTimeout(DEADLINE, _reactor())
        assert fault.fired_at is not None
        await a.wait_lost(DEADLINE)
        await backend_a.wait_lost(DEADLINE)
        if direction == C2S:
            self.assertEqual(backend_a.digests, [digest(f1)], "the partial frame was delivered")
        self.assertEqual(a.digests, [digest(f1)])
        self.assertEqual(bytes(a.splitter.buffer), b"", "a partial frame reached the TB client")
        self.assertEqual(bytes(backend_a.splitter.buffer), b"",
                         "a partial frame reached the backend")
        await t.pool_up(timeout=10)
        assert t.proxy is not None
        accepted = [link.accepted_at for link in t.proxy.links]
        self.assertEqual(len(accepted), 5)
        gaps = [accepted[1] - fault.fired_at] + [b - a_ for a_, b in zip(accepted[1:], accepted[2:])]
        for gap, base in zip(gaps, (0.1, 0.2, 0.4, 0.8)):
            self.assertGreaterEqual(gap, base * 0.8 - 0.01, f"backoff gaps {gaps}")
            self.assertLessEqual(gap, base * 1.2 + 0.1, f"backoff gaps {gaps}")
        rtt = await t.round_trip(60)
        record(4, f"{direction} {action} in the middle of a 1 MiB frame: TB client closed "
                  f"{ms(a.lost_at - fault.fired_at)}, backend connection closed "  # type: ignore
                  f"{ms(backend_a.lost_at - fault.fired_at)} after the cut; no partial "  # type: ignore
                  f"frame delivered; reconnect attempts after "
                  + ", ".join(ms(g) for g in gaps)
                  + f" (expected 100/200/400/800 ms ±20 %); new session RTT {ms(rtt)}")
        await t.stop()

    async def test_cut_mid_frame_client_to_server(self) -> None:
        """A pool connection cut in the middle of a client-to-server frame delivers no part of it, closes its sessions and reconnects with backoff."""
        await self.cut_mid_frame(C2S, "cut")

    async def test_cut_mid_frame_server_to_client(self) -> None:
        """A pool connection cut in the middle of a server-to-client frame delivers no part of it, closes its sessions and reconnects with backoff."""
        await self.cut_mid_frame(S2C, "cut")

    async def test_delayed_pool_connection(self) -> None:
        """A pool connection whose bytes arrive 100 ms late each way is slow but never failed."""
        delay = 0.1
        t = await InProcessTunnel(self, faults=lambda i: (
            ByteFault("delay", seconds=delay), ByteFault("delay", seconds=delay))).start()
        tb, _ = await t.session()
        rtts = [await echo_rtt(tb, i, size=20_000) for i in range(1, 11)]
        frames = [make_frame(filler(5000, i), i) for i in range(20, 40)]
        tb.send(*frames)
        await tb.wait_frames(10 + len(frames), DEADLINE)
        self.assertEqual(tb.digests[10:], [digest(f) for f in frames])
        assert t.proxy is not None
        self.assertEqual(len(t.proxy.links), 1, "the delayed pool connection was replaced")
        self.assertGreaterEqual(min(rtts), 2 * delay)
        record(3, f"pool connection delayed {ms(delay)} each way: RTT median "
                  f"{ms(statistics.median(rtts))}, 20 pipelined frames in order, no "
                  f"failure and no reconnection")

    async def test_corrupted_hello(self) -> None:
        """A ClientHello with one corrupted byte is refused, and the pool connection retries and comes up."""
        log = LogCapture(self)
        t = await InProcessTunnel(self, faults=lambda i: (
            (ByteFault("corrupt", at=40, mask=0x10) if i == 0 else Fault()), Fault())).start()
        assert t.proxy is not None
        self.assertEqual(len(t.proxy.links), 2)
        gap = t.proxy.links[1].accepted_at - t.proxy.links[0].accepted_at
        rtt = await t.round_trip(1)
        failures = log.matching("handshake failed")
        self.assertEqual(len([f for f in failures if "server pool connection" in f]), 1,
                         failures)
        record(3, f"ClientHello with one corrupted byte: refused ({failures[0]!r}); the "
                  f"client retried after {ms(gap)} and its session RTT was {ms(rtt)}")

    async def test_reset_mid_frame(self) -> None:
        """A pool connection reset (RST) in the middle of a frame behaves like a cut."""
        await self.cut_mid_frame(C2S, "reset")


# -- case 5 and 6: dead backends and dead peers ------------------------------------


class BackendDeathTests(TestCase):
    """Case 5: a backend killed, refusing, then restarted."""

    timeout = 90

    async def test_backend_killed_refusing_restarted(self) -> None:
        """A killed or refusing backend closes the TB side within seconds with no CLOSE-WAIT left, and after a restart new sessions work."""
        port = procs.free_ports(1)[0]
        backend = procs.spawn(backend_command(port))
        self.addCleanup(backend.kill)
        await procs.wait_for_output(backend, "listening", 10)
        d = await Daemons(self, port).start()
        assert d.server_pid is not None and d.client_pid is not None
        peers = []
        for i in range(6):
            peer = await d.tb_client()
            peer.send(make_frame(filler(500, i), i))
            peers.append(peer)
        for peer in peers:
            await peer.wait_frames(1, DEADLINE)
        self.assertEqual(len(established(d.server_pid, port, local=False)), 6)

        # Killed: the kernel closes its sockets.
        killed_at = time.monotonic()
        await backend.kill(signal.SIGKILL)
        last = await all_lost(peers, DEADLINE, "TB clients after the backend died")
        await procs.wait_until(
            lambda: not [s for s in procs.tcp_sockets(d.server_pid)  # type: ignore
                         if s.remote_port == port] and not close_wait(d.server_pid)  # type: ignore
            and not close_wait(d.client_pid), DEADLINE,  # type: ignore
            "no backend socket and no CLOSE-WAIT left in the tunnel processes")
        reaped = time.monotonic() - killed_at
        self.assertEqual(established(d.client_pid, d.client_port), [])

        # Refusing: nothing listens on the backend port any more.
        refused = []
        for i in range(3):
            started = time.monotonic()
            peer = await d.tb_client()
            peer.send(make_frame(b"anyone?", 50 + i))
            refused.append(await peer.wait_lost(DEADLINE) - started)
            self.assertEqual(peer.digests, [])
        await procs.wait_until(lambda: not close_wait(d.server_pid)  # type: ignore
                               and not close_wait(d.client_pid), DEADLINE,  # type: ignore
                               "no CLOSE-WAIT after refused backend connections")

        # Restarted on the same port.
        backend = procs.spawn(backend_command(port))
        self.addCleanup(backend.kill)
        await procs.wait_for_output(backend, "listening", 10)
        restarted_at = time.monotonic()
        again = []
        for i in range(3):
            peer = await d.tb_client()
            frame = make_frame(filler(700, 70 + i), 70 + i)
            peer.send(frame)
            await peer.wait_frames(1, DEADLINE)
            self.assertEqual(peer.digests, [digest(frame)])
            again.append(peer)
        first_ok = again[0].arrivals[0] - restarted_at
        record(5, f"backend SIGKILLed under 6 sessions: every TB connection closed "
                  f"{ms(last - killed_at)} after the kill; backend sockets gone and no "
                  f"CLOSE-WAIT in either tunnel process after {ms(reaped)}")
        record(5, f"backend refusing: TB connections closed after "
                  f"{', '.join(ms(r) for r in refused)}")
        record(5, f"backend restarted: first new session answered {ms(first_ok)} after "
                  f"the backend listened again")


class BackendCloseTests(TestCase):
    """Case 5, in one process: a backend that closes or resets one connection."""

    timeout = 60

    async def test_backend_closes_or_resets(self) -> None:
        """A backend closing (FIN) or resetting (RST) one connection closes that TB connection at once and no other."""
        t = await InProcessTunnel(self, pool_size=1).start()
        bystander, _ = await t.session()
        closing, closing_backend = await t.session()
        resetting, resetting_backend = await t.session()
        sent_at = time.monotonic()
        closing.send(control_frame(CLOSE, tag=1))
        resetting.send(control_frame(RESET, tag=2))
        for peer in (closing, resetting, closing_backend, resetting_backend):
            await peer.wait_lost(DEADLINE)
        me = os.getpid()
        ports = {t.client_port, t.server_port, t.backend.port_number}
        await procs.wait_until(
            lambda: not [s for s in close_wait(me)
                         if ports & {s.local_port, s.remote_port}], DEADLINE,
            "no CLOSE-WAIT socket on the tunnel's ports")
        rtt = await echo_rtt(bystander, 3)
        self.assertEqual((closing.digests, resetting.digests), ([], []))
        record(5, f"backend closed one connection (FIN): its TB connection closed "
                  f"{ms(closing.lost_at - sent_at)} after the request; backend reset "  # type: ignore
                  f"one (RST): {ms(resetting.lost_at - sent_at)}; no CLOSE-WAIT; a "  # type: ignore
                  f"third session on the same pool connection still echoes ({ms(rtt)})")


class DeadPeerTests(TestCase):
    """Case 6: the surviving tunnel end reaps everything of a dead peer."""

    timeout = 120

    async def started(self, sessions: int) -> Tuple[Daemons, ScriptedBackend, List[TBPeer]]:
        """Daemons with an in-process echo backend and ``sessions`` open sessions."""
        backend = ScriptedBackend()
        port = backend.listen()
        self.addCleanup(backend.refuse)
        d = await Daemons(self, port).start()
        peers = await open_sessions(d, backend, sessions)
        return d, backend, peers

    def check_keepalive(self, pid: int, port: int, local: bool) -> None:
        """The pool connections of ``pid`` have TCP keepalive armed (how a silent peer is found)."""
        pool = established(pid, port, local)
        self.assertTrue(pool)
        for s in pool:
            self.assertIn(s.timer, (1, 2), f"pool socket without keepalive timer: {s}")

    async def test_server_restarted(self) -> None:
        """When the tunnel server restarts, the client closes every TB session of the old pool, then serves new ones."""
        d, backend, peers = await self.started(20)
        assert d.server_pid is not None and d.client_pid is not None
        self.check_keepalive(d.client_pid, d.server_port, local=False)
        self.check_keepalive(d.server_pid, d.server_port, local=True)
        stopped_at = time.monotonic()
        self.assertTrue(await procs.stop_pid(d.server_pid, timeout=10))
        last = await all_lost(peers, DEADLINE, "TB sessions after the server stopped")
        await procs.wait_until(
            lambda: not established(d.client_pid, d.client_port)  # type: ignore
            and not close_wait(d.client_pid), DEADLINE,  # type: ignore
            "the client to hold no TB socket and no CLOSE-WAIT")
        reaped = time.monotonic() - stopped_at
        await procs.wait_until(lambda: not backend.open_connections, DEADLINE,
                               "the backend connections of the stopped server to close")
        await d.start_server()
        restarted_at = time.monotonic()
        await d.pool_up()
        pool_back = time.monotonic() - restarted_at
        fresh = await open_sessions(d, backend, 5)
        self.assertEqual([len(p.digests) for p in fresh], [1] * 5)
        record(6, f"tunnel server stopped (SIGTERM) under 20 sessions: the client closed "
                  f"every TB connection {ms(last - stopped_at)} after, held no TB socket "
                  f"and no CLOSE-WAIT after {ms(reaped)}; after the restart the pool was "
                  f"back in {ms(pool_back)} and 5 new sessions worked")

    async def test_client_killed(self) -> None:
        """When the tunnel client is killed with SIGKILL, the server closes every backend connection and pool socket of it."""
        backend = ScriptedBackend()
        port = backend.listen()
        self.addCleanup(backend.refuse)
        d = Daemons(self, port)
        self.addCleanup(d.stop)
        await d.start_server()
        assert d.server_pid is not None
        idle_fds = await steady_fd_count(d.server_pid)
        await d.start_client()
        assert d.client_pid is not None
        peers = await open_sessions(d, backend, 20)
        busy_fds = procs.fd_count(d.server_pid)
        killed_at = time.monotonic()
        os.kill(d.client_pid, signal.SIGKILL)
        await procs.wait_until(lambda: not procs.pid_running(d.client_pid),  # type: ignore
                               DEADLINE, "the client to die")
        d.client_pid = None
        await procs.wait_until(lambda: not backend.open_connections, DEADLINE,
                               "the server to close the backend connections")
        backends_closed = max(c.lost_at for c in backend.connections) - killed_at  # type: ignore
        await procs.wait_until(
            lambda: procs.fd_count(d.server_pid) == idle_fds  # type: ignore
            and not close_wait(d.server_pid), DEADLINE,  # type: ignore
            f"the server's descriptors to return to {idle_fds} (now "
            f"{fd_listing(d.server_pid)}; {procs.tcp_sockets(d.server_pid)})")
        reaped = time.monotonic() - killed_at
        states = sorted(s.state for s in procs.tcp_sockets(d.server_pid))
        self.assertEqual(states, ["LISTEN"])
        await all_lost(peers, DEADLINE, "TB clients of the killed client")
        record(6, f"tunnel client SIGKILLed under 20 sessions: the server closed all 20 "
                  f"backend connections {ms(backends_closed)} after the kill; its "
                  f"descriptors went from {busy_fds} back to {idle_fds} (idle) and its "
                  f"TCP sockets to {states} after {ms(reaped)}")

    async def test_black_holed_peer(self) -> None:
        """A tunnel server that vanishes without FIN (its network link cut) is found by TCP keepalive: the client reaps every session within the dead-peer budget."""
        if not LONG:
            raise SkipTest("long variant: set TIGERTUNNEL_LONG=1 (about 20 s; needs root "
                           "and iproute2 for a network namespace)")
        net = await BlackHoleNet.create(self)
        backend_port = procs.free_ports(1)[0]
        backend = procs.spawn(net.exec_prefix + backend_command(backend_port))
        self.addCleanup(backend.kill)
        await procs.wait_for_output(backend, "listening", 10)
        d = Daemons(self, backend_port, server_prefix=net.exec_prefix,
                    server_host=net.server_ip)
        self.addCleanup(d.stop)
        await d.start_server()
        await d.start_client()
        assert d.client_pid is not None and d.server_pid is not None
        peers = []
        for i in range(20):
            peer = await d.tb_client()
            peer.send(make_frame(filler(300 + i, i), i))
            peers.append(peer)
        for peer in peers:
            await peer.wait_frames(1, DEADLINE)
        server_pid = d.server_pid

        def backend_sockets() -> List[procs.TcpSocket]:
            return [s for s in procs.tcp_sockets(server_pid)
                    if s.remote_port == backend_port and s.state == "ESTABLISHED"]

        self.assertEqual(len(backend_sockets()), 20)
        self.check_keepalive(d.client_pid, d.server_port, local=False)
        holed_at = time.monotonic()
        await net.cut()
        last = await all_lost(peers, DEAD_PEER_BUDGET, "TB sessions after the black hole")
        await procs.wait_until(
            lambda: not established(d.client_pid, d.server_port, local=False)  # type: ignore
            and not established(d.client_pid, d.client_port), 5,  # type: ignore
            "the client's pool and TB sockets to go")
        client_reaped = time.monotonic() - holed_at
        await procs.wait_until(lambda: not backend_sockets(), DEAD_PEER_BUDGET,
                               "the cut-off server to close its backend connections")
        server_reaped = time.monotonic() - holed_at
        record(6, f"black-holed tunnel server (veth link down, no FIN) under 20 sessions: "
                  f"the client closed every TB connection {ms(last - holed_at)} after the "
                  f"cut and held no pool or TB socket after {ms(client_reaped)}; the "
                  f"cut-off server closed its 20 backend connections after "
                  f"{ms(server_reaped)} (budget {DEAD_PEER_BUDGET:.0f} s)")
        self.assertLessEqual(last - holed_at, DEAD_PEER_BUDGET)


class HungPeerTests(TestCase):
    """Case 6, long variant: a peer whose kernel still answers but whose application is hung."""

    timeout = 120

    async def test_hung_pool_connection_under_load(self) -> None:
        """A pool connection whose far end stops reading (kernel alive, no FIN) is aborted by TCP_USER_TIMEOUT once data is stuck, and its sessions are reaped."""
        if not LONG:
            raise SkipTest("long variant: set TIGERTUNNEL_LONG=1 (about 25 s)")
        t = await InProcessTunnel(self, faults=lambda i: (Fault(), Fault())).start()
        idle, idle_backend = await t.session()
        busy, busy_backend = await t.session()
        await echo_rtt(idle, 1)
        await echo_rtt(busy, 2)
        assert t.proxy is not None
        link = t.proxy.links[0]
        link.blackhole()
        holed_at = time.monotonic()
        big = make_frame(filler((1 << 20) - 256, 3), 3)
        for _ in range(64):  # 64 MiB: far more than the socket buffers hold
            busy.send(big)
        last = await all_lost([idle, busy], DEAD_PEER_BUDGET + 15,
                              "sessions on the hung pool connection")
        await t.pool_up(timeout=5)
        rtt = await t.round_trip(9)
        record(6, f"hung pool connection (proxy stops reading, its kernel still ACKs, no "
                  f"FIN) with 64 MiB pushed into it: the client aborted it and closed "
                  f"both sessions {ms(last - holed_at)} after the hang "
                  f"(TCP_USER_TIMEOUT on the zero window); new pool connection, session "
                  f"RTT {ms(rtt)}")


# -- case 7 and 8: full duplex and isolation -----------------------------------------


class FullDuplexTests(TestCase):
    """Case 7: any number of frames either way, in order, with no stall."""

    timeout = 60

    async def test_zero_one_three_and_unsolicited(self) -> None:
        """A backend answering 0, 1 or 3 frames per request and sending unsolicited frames has every frame delivered in order."""
        t = await InProcessTunnel(self, script=ControlScript(greeting=2)).start()
        sessions = [await t.session() for _ in range(3)]
        expected = []
        started = time.monotonic()
        for i, (tb, _) in enumerate(sessions):
            counts = [0, 1, 3] * 10
            random.Random(i).shuffle(counts)
            requests = [control_frame(UNSOLICITED, count=20, delay=0.01, size=500 + i,
                                      tag=1000 * i)]
            requests += [control_frame(REPLY, count=c, size=300 + 97 * j,
                                       tag=1000 * i + j + 1) for j, c in enumerate(counts)]
            tb.send(*requests)  # pipelined: no waiting for answers
            expected.append(2 + 20 + sum(counts))
        for (tb, _), count in zip(sessions, expected):
            await tb.wait_frames(count, DEADLINE)
        elapsed = time.monotonic() - started
        # A request answered by nothing does not hold back the next one.
        tb, conn = sessions[0]
        before = len(tb.digests)
        sent_at = time.monotonic()
        tb.send(control_frame(REPLY, count=0, tag=9001),
                control_frame(REPLY, count=1, size=256, tag=9002))
        await tb.wait_frames(before + 1, DEADLINE)
        rtt = time.monotonic() - sent_at
        self.assertEqual(tb.digests[before], digest(reply_frame(9002, 0, 256)))
        for i, (tb, conn) in enumerate(sessions):
            self.assertEqual(conn.digests, tb.sent, f"session {i}: requests differ")
            self.assertEqual(tb.digests, conn.sent, f"session {i}: backend frames differ")
        record(7, f"3 sessions, 31 pipelined requests each answered by 0/1/3 frames, "
                  f"2 greeting + 20 unsolicited frames per backend connection: "
                  f"{sum(expected)} frames delivered in order in {ms(elapsed)}; a "
                  f"0-frame request then a 1-frame request answered in {ms(rtt)}")


class IsolationTests(TestCase):
    """Case 8: a stopped TB client and a slow backend do not slow their neighbours."""

    timeout = 60

    async def test_stopped_client_and_slow_backend(self) -> None:
        """With one TB client that never reads and one backend taking 2 s per reply, another session on the same pool connection keeps its latency."""
        t = await InProcessTunnel(self, pool_size=1).start()
        normal, _ = await t.session()
        baseline = [await echo_rtt(normal, i) for i in range(1, 31)]
        stopped, stopped_backend = await t.session()
        stopped.transport.pauseProducing()  # never reads again
        slow, _ = await t.session()
        self.assertEqual(len(t.client_mux.pool_connections), 1)
        stopped.send(control_frame(FLOOD, count=32, size=1 << 20, tag=500))
        slow.send(*[control_frame(SLOW, delay=2.0, tag=600 + i) for i in range(3)])
        slow_sent = time.monotonic()
        during = []
        tag = 100
        while time.monotonic() - slow_sent < 2.5:
            tag += 1
            during.append(await echo_rtt(normal, tag))
        await slow.wait_frames(3, DEADLINE)
        slow_delay = slow.arrivals[0] - slow_sent
        # The stopped TB client itself cannot notice the close (it does not
        # read, so its own reactor never polls the socket); what matters is
        # that the tunnel dropped the session and its backend connection.
        try:
            await stopped_backend.wait_lost(DEADLINE)
            stopped_note = ("its session closed by the tunnel after "
                            f"{ms(stopped_backend.lost_at - slow_sent)}")  # type: ignore
        except defer.TimeoutError:
            stopped_note = (f"its session still open {DEADLINE + 2.5:.1f} s later; "
                            f"{len(t.client_mux.sessions)} sessions in the tunnel client")
        self.assertFalse(normal.is_lost)
        median_before, median_during = statistics.median(baseline), statistics.median(during)
        worst = max(during)
        record(8, f"pool of 1 connection; normal session RTT median {ms(median_before)} "
                  f"(max {ms(max(baseline))}) before, median {ms(median_during)} "
                  f"(max {ms(worst)}, {len(during)} round trips) while a stopped TB "
                  f"client was flooded with 32 MiB ({stopped_note}) and a backend "
                  f"answered after {ms(slow_delay)}")
        self.assertGreaterEqual(slow_delay, 1.9)
        self.assertLess(worst, 0.5, f"RTTs during the faults: {[ms(r) for r in during]}")
        self.assertLess(median_during, median_before + 0.05)
        # README: "a TB peer that stops reading loses its own session once
        # 8 MiB are queued for it".
        self.assertTrue(stopped_backend.is_lost, f"stopped TB client: {stopped_note}")
        self.assertEqual(len(t.client_mux.sessions), 2, stopped_note)


# -- case 9 and 10: churn and load -------------------------------------------------


class ChurnTests(TestCase):
    """Case 9: many short sessions leave no descriptor and no session behind."""

    timeout = 600 if LONG else 120

    async def test_churn(self) -> None:
        """After thousands of short sessions both tunnel processes hold the same descriptors and sessions as before."""
        total = 10_000 if LONG else 2_000
        workers = 32
        backend = ScriptedBackend(Script())
        port = backend.listen()
        self.addCleanup(backend.refuse)
        d = await Daemons(self, port, pool_size=4).start()
        assert d.server_pid is not None and d.client_pid is not None
        pids = {"client": d.client_pid, "server": d.server_pid}
        failures: List[str] = []

        async def worker(first: int, count: int) -> None:
            rng = random.Random(first)
            for i in range(first, first + count):
                peer = await tb_connect(d.client_port)
                frames = [make_frame(filler(random_size(rng, 4096) - 256, i * 4 + j), i * 4 + j)
                          for j in range(3)]
                peer.send(*frames)
                try:
                    await peer.wait_frames(3, DEADLINE)
                except Exception as e:
                    failures.append(f"session {i}: {e}")
                if peer.digests != peer.sent:
                    failures.append(f"session {i}: echoed frames differ")
                peer.transport.loseConnection()
                await peer.wait_lost(DEADLINE)

        async def churn(count: int) -> float:
            started = time.monotonic()
            share = count // workers
            await defer.gatherResults([defer.ensureDeferred(worker(k * share, share))
                                       for k in range(workers)], consumeErrors=True)
            return time.monotonic() - started

        await churn(workers * 4)  # warm-up
        await procs.wait_until(lambda: not backend.open_connections, DEADLINE,
                               "the warm-up sessions to close")
        before = {role: await steady_fd_count(pid) for role, pid in pids.items()}
        sockets_before = session_sockets(d)
        rss_before = {role: procs.rss_kib(pid) for role, pid in pids.items()}
        elapsed = await churn(total)
        done_at = time.monotonic()
        self.assertEqual(failures, [])
        await procs.wait_until(
            lambda: all(procs.fd_count(pid) == before[role] for role, pid in pids.items()),
            15, f"descriptors back to {before} (now "
                f"{ {r: procs.fd_count(p) for r, p in pids.items()} })")
        settled = time.monotonic() - done_at
        sockets_after = session_sockets(d)
        self.assertEqual(sockets_after, sockets_before)
        self.assertEqual(sockets_after["client TB sockets"], 0)
        self.assertEqual(sockets_after["server backend sockets"], 0)
        await procs.wait_until(lambda: not backend.open_connections, DEADLINE,
                               "the backend connections to close")
        rss_after = {role: procs.rss_kib(pid) for role, pid in pids.items()}
        for role, pid in pids.items():
            self.assertEqual(close_wait(pid), [], role)
        record(9, f"{total} sessions (connect, 3 frames echoed, close; {workers} at a "
                  f"time) in {elapsed:.1f} s ({total / elapsed:.0f}/s); descriptors "
                  f"before {before}, the same again {ms(settled)} after the last "
                  f"session; sockets from /proc {sockets_after} (same as before); RSS "
                  f"KiB before {rss_before}, after {rss_after}")


class LoadTests(TestCase):
    """Case 10: many concurrent sessions with frames up to 1 MiB, verified byte for byte."""

    timeout = 600 if LONG else 120

    async def test_concurrent_sessions(self) -> None:
        """Hundreds of concurrent sessions over 4 pool connections echo random-size frames byte-identical, with zero errors and stable memory."""
        count = 1000 if LONG else 200
        duration = 30.0 if LONG else 5.0
        backend = ScriptedBackend(Script())
        port = backend.listen()
        self.addCleanup(backend.refuse)
        d = await Daemons(self, port, pool_size=4).start()
        assert d.server_pid is not None and d.client_pid is not None
        pids = {"client": d.client_pid, "server": d.server_pid}
        material = os.urandom(2 << 20)
        peers: List[TBPeer] = []
        for first in range(0, count, 50):
            batch = await defer.gatherResults(
                [defer.ensureDeferred(d.tb_client()) for _ in range(first, min(count, first + 50))],
                consumeErrors=True)
            peers.extend(batch)
        await procs.wait_until(
            lambda: len(backend.open_connections) == count, 10,
            f"{count} backend connections (have {len(backend.open_connections)}; "
            f"{sum(p.is_lost for p in peers)} TB connections closed; client log tail "
            f"{procs.read_text(d.path('client.log'))[-600:]!r}; server log tail "
            f"{procs.read_text(d.path('server.log'))[-600:]!r})")
        samples: List[Tuple[float, Dict[str, int]]] = []
        sampler = task.LoopingCall(lambda: samples.append(
            (time.monotonic(), {r: procs.rss_kib(p) for r, p in pids.items()})))
        started = time.monotonic()
        end = started + duration
        sampler.start(0.25)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        errors: List[str] = []
        volume = [0, 0]  # frames, bytes

        async def run(index: int, peer: TBPeer) -> None:
            rng = random.Random(index)
            while time.monotonic() < end and not peer.is_lost:
                size = random_size(rng)
                offset = rng.randrange(len(material) - size)
                tag = index << 32 | len(peer.sent)
                frame = make_frame(material[offset:offset + size - 256], tag)
                peer.send(frame)
                try:
                    await peer.wait_frames(len(peer.sent), 60)
                except Exception as e:
                    errors.append(f"session {index}: {e}")
                    return
                volume[0] += 1
                volume[1] += size

        await defer.gatherResults([defer.ensureDeferred(run(i, p)) for i, p in enumerate(peers)],
                                  consumeErrors=True)
        elapsed = time.monotonic() - started
        sampler.stop()
        # Hash both ends: what each TB client sent, what its backend connection
        # received and sent back, and what the TB client received.
        by_first = {c.digests[0]: c for c in backend.connections if c.digests}
        mismatched = 0
        largest = 0
        for i, peer in enumerate(peers):
            conn = by_first.get(peer.sent[0]) if peer.sent else None
            if conn is None or conn.digests != peer.sent or conn.sent != peer.sent \
                    or peer.digests != peer.sent:
                mismatched += 1
            self.assertFalse(peer.is_lost, f"session {i} was closed")
        self.assertEqual(errors, [])
        self.assertEqual(mismatched, 0)
        warm = [s for t_, s in samples if t_ - started >= duration * 0.4]
        self.assertGreaterEqual(len(warm), 3)
        growth = {role: max(s[role] for s in warm) - warm[0][role] for role in pids}
        peak = {role: max(s[role] for _, s in samples) for role in pids}
        record(10, f"{count} concurrent sessions over -n 4 for {elapsed:.1f} s: "
                   f"{volume[0]} frames, {volume[1] / 2**20:.0f} MiB each way "
                   f"({volume[1] / 2**20 / elapsed:.0f} MiB/s), 5 % of them 1 MiB; "
                   f"every frame identical at both ends (SHA-256), errors {len(errors)}; "
                   f"RSS KiB at the end of warm-up {warm[0]}, growth after it {growth}, "
                   f"peak {peak}")
        for role in pids:
            self.assertLess(growth[role], max(64 * 1024, warm[0][role] // 4),
                            f"{role} RSS grew after warm-up: {samples}")
        for peer in peers:
            peer.transport.loseConnection()
        await procs.wait_until(lambda: not backend.open_connections, 15,
                               "every session to close")


# -- case 11: session limits --------------------------------------------------------


class SessionLimitTests(TestCase):
    """Case 11: past max_sessions new TB connections close at once; existing ones carry on."""

    timeout = 60

    async def limit(self, side: str, **limits: int) -> None:
        """Open 5 sessions, then 20 more past the limit of ``side``, and check both groups."""
        log = LogCapture(self)
        t = await InProcessTunnel(self, pool_size=2, **limits).start()
        existing = [await t.session() for _ in range(5)]
        for i, (tb, _) in enumerate(existing):
            await echo_rtt(tb, i + 1)
        before = len(t.backend.connections)
        excess = []
        for _ in range(20):
            started = time.monotonic()
            excess.append((started, await t.tb_client()))
        closed = []
        for started, tb in excess:
            closed.append(await tb.wait_lost(DEADLINE) - started)
        for i, (tb, _) in enumerate(existing):
            await echo_rtt(tb, 100 + i)
            self.assertFalse(tb.is_lost)
        lines = log.matching("max sessions (5) reached")
        self.assertEqual(len(lines), 1, lines)
        backends = len(t.backend.connections) - before
        if side == "client":
            self.assertEqual(backends, 0, "excess TB connections reached the backend")
        record(11, f"{side} max_sessions 5: 20 excess TB connections closed after "
                   f"median {ms(statistics.median(closed))}, max {ms(max(closed))}; "
                   f"{len(lines)} log line ({lines[0]!r}); backend connections made for "
                   f"them: {backends}; the 5 existing sessions still echo")
        self.assertLess(max(closed), 1.0)

    async def test_client_limit(self) -> None:
        """Past the client's max_sessions excess TB connections are closed at once with one log line; existing sessions are unaffected."""
        await self.limit("client", client_max=5)

    async def test_server_limit(self) -> None:
        """Past the server's max_sessions excess streams are refused and their TB connections closed at once with one log line; existing sessions are unaffected."""
        await self.limit("server", server_max=5)
