"""Floods that share the real client's address do not keep it out (real processes).

The tunnel server and client are daemonized ``twistd`` processes
(:class:`Daemons`) in front of a scripted backend in this process. A
:class:`Flood` in this process attacks the server's pool port while the
real client starts; each test measures the time from the client's start
until all :data:`POOL` of its pool connections are up (its log's
``up (key id`` lines), asserts it is at most :data:`UP_WITHIN`, and then
carries TB sessions through the tunnel:

* silent connects from the client's own address, 127.0.0.1, many in
  flight for as long as the client comes up (at least :data:`SILENT_MIN`);
* :data:`STALLERS` connections from four other addresses that send one
  valid byte of a ClientHello and stall, each reopened as soon as the
  server closes it;
* silent connects from ``::1`` to a server listening on ``::1``, the
  client on ``::1`` too.

Each test prints what it measured (``[flood ...]`` lines, also appended to
``fault-measurements.txt``). Every wait is bounded; the flood stops at
:data:`FLOOD_FOR` seconds or :data:`FLOOD_MAX` connects at the latest.
"""

import re
import sys
import time
from typing import Any, List, Optional, Sequence, Set, Union

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.tbpeers import the_reactor
from tests.integration.tunnels import Daemons, listening_backend, open_sessions, record

#: Pool connections of the real client.
POOL = 4
#: Seconds within which the client must have all its pool connections up
#: under a flood (it starts a twistd process: about 1 s without a flood on
#: a loaded 2-core machine).
UP_WITHIN = 5.0
#: How long a test waits for the pool at most, to report how late it was.
WAIT_AT_MOST = 30.0
#: Silent connections the flooder holds open at most (its newest).
SILENT_HOLD = 2000
#: Flooder processes (each holds SILENT_HOLD connections).
FLOODERS = 3
#: Staller connections, and the addresses they come from.
STALLERS = 64
STALLER_SOURCES = [f"127.0.0.{n}" for n in range(2, 6)]
#: The first byte of a ClientHello (version 2, PROTOCOL.md 3.1 and README
#: "Protocol extension"): a staller sends it and nothing more.
HELLO_FIRST_BYTE = b"\x02"
#: Bounds on any flood.
FLOOD_FOR = 40.0
FLOOD_MAX = 200_000


class StallerPeer(Protocol):
    """One staller: sends the first byte of a ClientHello, then nothing."""

    def __init__(self, stallers: "Stallers", source: str) -> None:
        self.stallers = stallers
        self.source = source

    def connectionMade(self) -> None:
        self.stallers.made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.stallers.lost(self)


class StallerFactory(ClientFactory):
    """Reports a failed connect to its stallers."""

    noisy = False

    def __init__(self, stallers: "Stallers", source: str) -> None:
        self.stallers = stallers
        self.source = source

    def buildProtocol(self, addr: Any) -> StallerPeer:
        return StallerPeer(self.stallers, self.source)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.stallers.failed(connector, self.source)


class Stallers:
    """``count`` connections to 127.0.0.1:``port`` from ``sources`` in turn;
    each sends :data:`HELLO_FIRST_BYTE` and is reopened from the same source
    once it closes, until :meth:`stop` (or :data:`FLOOD_FOR` seconds or
    :data:`FLOOD_MAX` connects)."""

    def __init__(self, port: int, sources: Sequence[str], count: int) -> None:
        self.port = port
        self.sources = list(sources)
        self.count = count
        self.open: Set[StallerPeer] = set()
        #: Connect attempts not yet settled (made or failed).
        self.connecting: Set[Any] = set()
        self.connects = 0
        self.closed_by_server = 0
        self.stopped = False
        self.deadline = time.monotonic() + FLOOD_FOR

    def start(self) -> None:
        """Open the first ``count`` connections."""
        for n in range(self.count):
            self._connect(self.sources[n % len(self.sources)])

    def _connect(self, source: str) -> None:
        if (self.stopped or self.connects >= FLOOD_MAX
                or time.monotonic() > self.deadline):
            return
        self.connects += 1
        self.connecting.add(the_reactor().connectTCP(
            "127.0.0.1", self.port, StallerFactory(self, source), timeout=5,
            bindAddress=(source, 0)))

    def made(self, peer: StallerPeer) -> None:
        self.connecting.discard(peer.transport.connector)
        self.open.add(peer)
        peer.transport.write(HELLO_FIRST_BYTE)

    def failed(self, connector: Any, source: str) -> None:
        self.connecting.discard(connector)
        self._connect(source)

    def lost(self, peer: StallerPeer) -> None:
        self.open.discard(peer)
        if not self.stopped:
            self.closed_by_server += 1
        self._connect(peer.source)

    async def stop(self) -> None:
        """Start no more connects, abort those under way or open, and wait
        (bounded) until they are all gone."""
        self.stopped = True
        for connector in list(self.connecting):
            connector.stopConnecting()
        for peer in list(self.open):
            peer.transport.abortConnection()
        await procs.wait_until(lambda: not self.open and not self.connecting,
                               10.0, "the stallers' connections to close")


class SilentFlood:
    """The :mod:`~tests.integration.flooder` process: silent connects from
    ``source`` to ``host:port`` as fast as it can, the newest
    :data:`SILENT_HOLD` held open, for :data:`FLOOD_FOR` seconds at most."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.args = [sys.executable, "-m", "tests.integration.flooder", host,
                     str(port), source, str(SILENT_HOLD), str(FLOOD_FOR)]
        self.children: List[procs.Child] = []

    def start(self) -> None:
        """Start the flooder processes."""
        self.children = [procs.spawn(self.args) for _ in range(FLOODERS)]

    @property
    def connects(self) -> int:
        """The connects the flooders reported so far."""
        total = 0
        for child in self.children:
            counts = re.findall(r"(?:connects|done) (\d+)", child.output)
            total += int(counts[-1]) if counts else 0
        return total

    async def stop(self) -> None:
        """End the flooders (their connections close with them)."""
        for child in self.children:
            if child.running:
                await child.kill()


def pool_lines(d: Daemons) -> int:
    """How many pool connections the client's log says came up."""
    return procs.read_text(d.path("client.log")).count(" up (key id ")


def pool_attempts(d: Daemons) -> int:
    """How many connects the client made for the pool connections that came
    up (their names end in ``#N``, N counting every connect of the pair)."""
    serials = re.findall(r"#(\d+) up \(key id ", procs.read_text(d.path("client.log")))
    return max((int(n) for n in serials), default=0)


class SharedAddressFloodTests(TestCase):
    """A real client comes up and works while a flood attacks from its address."""

    timeout = 120

    async def client_under(self, flood: Union[SilentFlood, Stallers], d: Daemons,
                           before: int, backend: Any) -> float:
        """Start ``flood``; once it made ``before`` connects start the client;
        once its pool is up, echo 4 TB sessions, then stop the flood. Return
        the seconds from the client's start until its pool was up, checked
        against :data:`UP_WITHIN`."""
        self.addCleanup(flood.stop)
        flood.start()
        await procs.wait_until(lambda: flood.connects >= before, 20.0,
                               f"{before} flood connects")
        started = time.monotonic()
        up: List[float] = []

        def pool_up() -> bool:
            if not up and pool_lines(d) >= POOL:
                up.append(time.monotonic() - started)
            return bool(up)

        waiting = defer.ensureDeferred(
            procs.wait_until(pool_up, WAIT_AT_MOST, "the pool under the flood"))
        try:
            await d.start_client()  # waits 10 s at most for the pool
        except procs.WaitTimeout:
            pass
        try:
            await waiting
        except procs.WaitTimeout:
            raise AssertionError(
                f"{pool_lines(d)} of {POOL} pool connections up "
                f"{WAIT_AT_MOST:.0f} s after the client started under the flood "
                f"({flood.connects} flood connects)") from None
        await open_sessions(d, backend, 4)
        await flood.stop()
        self.attempts = pool_attempts(d)
        self.assertLessEqual(up[0], UP_WITHIN,
                             f"the pool took {up[0]:.1f} s under the flood")
        self.assertEqual(self.attempts, POOL,
                         f"the client connected {self.attempts} times for its {POOL} "
                         f"pool connections: the server evicted some")
        return up[0]

    async def test_silent_flood_from_the_clients_address(self) -> None:
        """While a process on 127.0.0.1 opens silent connections as fast as it can (2,000 held open), a real client on 127.0.0.1 has its 4 pool connections up within 5 s of starting and carries sessions."""
        backend = listening_backend(self)
        d = Daemons(self, backend.port_number, pool_size=POOL)
        self.addCleanup(d.stop)
        await d.start_server()
        flood = SilentFlood("127.0.0.1", d.server_port, "127.0.0.1")
        up = await self.client_under(flood, d, 200, backend)
        record("flood same address", f"{flood.connects} silent connects from 127.0.0.1 "
                                     f"(the newest {SILENT_HOLD} held open): the "
                                     f"client's {POOL} pool connections up {up:.2f} s "
                                     f"after it started ({self.attempts} connects); 4 sessions echoed")

    async def test_renewed_one_byte_stallers(self) -> None:
        """64 connections from 4 addresses that each send one byte and stall, reopened as they close, keep a new client out for at most 5 s from its start."""
        backend = listening_backend(self)
        d = Daemons(self, backend.port_number, pool_size=POOL)
        self.addCleanup(d.stop)
        await d.start_server()
        flood = Stallers(d.server_port, STALLER_SOURCES, STALLERS)
        up = await self.client_under(flood, d, STALLERS, backend)
        record("flood stallers", f"{STALLERS} one-byte stallers from "
                                 f"{len(STALLER_SOURCES)} addresses, renewed "
                                 f"({flood.connects} connects, "
                                 f"{flood.closed_by_server} closed by the server): "
                                 f"the client's {POOL} pool connections up {up:.2f} s "
                                 f"after it started ({self.attempts} connects); 4 sessions echoed")

    async def test_silent_flood_ipv6(self) -> None:
        """Over IPv6 (server and client on ::1), a process on ::1 opening silent connections as fast as it can does not keep the client's pool down more than 5 s."""
        backend = listening_backend(self)
        d = Daemons(self, backend.port_number, pool_size=POOL, server_host="[::1]")
        self.addCleanup(d.stop)
        await d.start_server()
        flood = SilentFlood("::1", d.server_port, "::1")
        up = await self.client_under(flood, d, 200, backend)
        record("flood ipv6", f"{flood.connects} silent connects from ::1 (the newest "
                             f"{SILENT_HOLD} held open): the client's {POOL} pool "
                             f"connections up {up:.2f} s after it started ({self.attempts} "
                             f"connects); 4 sessions echoed")
