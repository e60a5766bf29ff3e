"""``tigertunnel bench --churn N``: does a tunnel's memory grow with the sessions it serves?

A tunnel in front of a database serves millions of short TB sessions; what
one session costs must be given back when it ends, whichever way it ends.
The churn runs N short sessions of every kind through a real tunnel client
and server (the processes of :mod:`.run`) and reads the resident memory
(``VmRSS``) of each end after a warm-up and after every 1,000 sessions.
The kinds, in equal shares:

Every session is a new TB client: its first frame is a ``request`` with a
client id of its own, which the TB watch of each tunnel end records as in
flight (the echo never answers it with a ``reply``).

``clean``
    one frame echoed, then the TB client closes.
``abandoned``
    one frame echoed, then half of a 64 KiB frame, then the TB client
    closes: the tunnel was holding a partial frame.
``backend_cut``
    the echo backend closes the connection (a frame with the ``HANG_UP``
    command, :mod:`tigertunnel.tools.echo`); the tunnel closes the TB
    client.
``pool_cut``
    sessions on the second proxy pair, whose pool connections run through
    a :class:`Relay` in this process: once a batch of them has echoed a
    frame the relay cuts every pool connection, which ends them.
``refused``
    sessions on the second pair while its pool connections are down (the
    relay refuses them): the tunnel client closes them at once.

The same churn runs against ``--against`` in the same run. Outcomes are
counted, not required: another implementation may close (or not) where
this one does.
"""

import time
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from tigertunnel.tools.echo import HANG_UP
from tigertunnel.tools.tbframes import sized_tb_frame
from tigertunnel.wire.frames import FrameParser
from tigertunnel.wire.tbheader import REQUEST_CLIENT_OFFSET

KINDS = ("clean", "abandoned", "backend_cut", "pool_cut", "refused")
#: Kinds served by the first proxy pair (the rest by the second, relayed one).
DIRECT_KINDS = ("clean", "abandoned", "backend_cut")
#: Sessions of each kind per batch.
BATCH = 8
#: Seconds a session waits for its echo.
WAIT = 5.0
#: Seconds a session waits for the tunnel to close it (this tunnel takes
#: milliseconds; one that leaves it open costs this much per batch).
CLOSE_WAIT = 1.0
#: Seconds the relayed pair's pool may take to come back after a cut (the
#: tunnel client's reconnect backoff).
POOL_BACK = 60.0
#: Size of the frame an abandoned session sends half of.
ABANDONED_FRAME = 65536


class _Peer(Protocol):
    """A TB client of the churn: sends frames, counts echoes, notes its end."""

    def __init__(self) -> None:
        self.parser = FrameParser()
        self.echoes = 0
        self.lost: "defer.Deferred[None]" = defer.Deferred()
        self._echoed: "Optional[defer.Deferred[None]]" = None

    def dataReceived(self, data: bytes) -> None:
        self.echoes += len(self.parser.feed(data))
        if self.echoes and self._echoed is not None:
            d, self._echoed = self._echoed, None
            d.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._echoed is not None:
            d, self._echoed = self._echoed, None
            d.callback(None)
        self.lost.callback(None)

    def echoed(self) -> "defer.Deferred[None]":
        """Fires at the first echo (or when the connection is lost)."""
        d: "defer.Deferred[None]" = defer.Deferred()
        if self.echoes or self.lost.called:
            d.callback(None)
        else:
            self._echoed = d
        return d


class _RelayedPeer(Protocol):
    """One side of a relayed connection: writes what it reads to its peer."""

    def __init__(self, relay: "Relay", peer: "Optional[_RelayedPeer]" = None) -> None:
        self.relay = relay
        self.peer = peer
        self.queued: List[bytes] = []

    def connectionMade(self) -> None:
        self.relay.connections.append(self)
        if self.peer is not None:  # the outgoing side: the pair is complete
            self.peer.peer = self
            if self.peer.queued and self.transport is not None:
                self.transport.writeSequence(self.peer.queued)
                self.peer.queued = []

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.queued.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self in self.relay.connections:
            self.relay.connections.remove(self)
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            _abort(peer)


class Relay(Factory):
    """A TCP relay on 127.0.0.1 to ``target`` that can cut every connection.

    While :attr:`~tigertunnel.tools.bench.churn.Relay.down`, a new
    connection is aborted at once (the target looks unreachable).
    """

    noisy = False

    def __init__(self, reactor: IReactorTCP, target: int) -> None:
        self.reactor = reactor
        self.target = target
        self.connections: List[_RelayedPeer] = []
        #: Whether the relay aborts new connections and has cut the ones it carried.
        self.down = False
        self.port: Optional[IListeningPort] = None

    async def listen(self, port: int) -> None:
        """Listen on 127.0.0.1:``port``."""
        endpoint = TCP4ServerEndpoint(self.reactor, port, interface="127.0.0.1")
        self.port = await endpoint.listen(self)

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        if self.down:
            return _Refuser()
        incoming = _RelayedPeer(self)
        self.reactor.connectTCP("127.0.0.1", self.target, _Outgoing(incoming))
        return incoming

    def cut(self) -> int:
        """Abort every relayed connection; returns how many there were."""
        cut = list(self.connections)
        for c in cut:
            _abort(c)
        return len(cut)

    async def stop(self) -> None:
        """Stop listening and cut what is left."""
        self.cut()
        stopped = self.port.stopListening() if self.port is not None else None
        if stopped is not None:
            await stopped


class _Outgoing(ClientFactory):
    """Connects the target side of one relayed connection."""

    noisy = False

    def __init__(self, incoming: _RelayedPeer) -> None:
        self.incoming = incoming

    def buildProtocol(self, addr: Any) -> _RelayedPeer:
        return _RelayedPeer(self.incoming.relay, self.incoming)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        _abort(self.incoming)


class _Refuser(Protocol):
    def connectionMade(self) -> None:
        _abort(self)


def _abort(proto: Protocol) -> None:
    """Abort ``proto``'s TCP connection, if it has one."""
    if proto.transport is not None:
        ITCPTransport(proto.transport).abortConnection()


def _fire(d: "defer.Deferred[bool]", value: bool) -> None:
    if not d.called:
        d.callback(value)


async def _sleep(clock: IReactorTime, seconds: float) -> None:
    await task.deferLater(clock, seconds, lambda: None)


async def _bounded(clock: IReactorTime, d: "defer.Deferred[Any]", seconds: float) -> bool:
    """Wait for ``d`` at most ``seconds``; whether it fired."""
    if d.called:
        return True
    waiter: "defer.Deferred[bool]" = defer.Deferred()
    call = clock.callLater(seconds, _fire, waiter, False)

    def fired_first(result: Any) -> Any:
        _fire(waiter, True)
        return result

    d.addBoth(fired_first)
    fired = await waiter
    if call.active():
        call.cancel()
    return fired


class Churn:
    """N sessions of the listed kinds through one tunnel (see the module docstring).

    :param ports: the tunnel client's TB ports: the direct pair, the
        relayed pair.
    :param relay: the relay of the second pair's pool connections.
    """

    def __init__(self, reactor: IReactorTCP, ports: Sequence[int], relay: Relay,
                 kinds: Sequence[str] = KINDS) -> None:
        self.reactor = reactor
        self.clock = IReactorTime(reactor)
        self.ports = list(ports)
        self.relay = relay
        self.kinds = list(kinds)
        #: Sessions by kind and outcome (``echoed+closed``, ``closed``, ...).
        self.outcomes: Dict[str, Dict[str, int]] = {k: {} for k in self.kinds}
        self.sessions = 0
        self._template = bytearray(sized_tb_frame(4096, 1))
        self._clients = 0
        self._hang_up = sized_tb_frame(256, 2, command=HANG_UP)
        self._half = sized_tb_frame(ABANDONED_FRAME, 3)[:ABANDONED_FRAME // 2]

    def _request(self) -> bytes:
        """A 4 KiB ``request`` frame from a new TB client id."""
        self._clients += 1
        frame = self._template
        frame[REQUEST_CLIENT_OFFSET:REQUEST_CLIENT_OFFSET + 16] = (
            self._clients.to_bytes(16, "little"))
        return bytes(frame)

    def _count(self, kind: str, outcome: str) -> None:
        table = self.outcomes[kind]
        table[outcome] = table.get(outcome, 0) + 1
        self.sessions += 1

    async def _connect(self, port: int) -> Optional[_Peer]:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=int(WAIT))
        try:
            peer = await endpoint.connect(Factory.forProtocol(_Peer))
        except Exception:
            return None
        assert isinstance(peer, _Peer)
        return peer

    async def _session(self, kind: str) -> None:
        peer = await self._connect(self.ports[0])
        if peer is None:
            self._count(kind, "not connected")
            return
        transport = peer.transport
        assert transport is not None
        if kind == "backend_cut":
            transport.write(self._request() + self._hang_up)
        else:
            transport.write(self._request())
        await _bounded(self.clock, peer.echoed(), WAIT)
        echoed = "echoed" if peer.echoes else "no echo"
        if kind == "abandoned" and not peer.lost.called:
            transport.write(self._half)
        if kind == "backend_cut":
            closed = await _bounded(self.clock, peer.lost, CLOSE_WAIT)
            self._count(kind, f"{echoed}, closed by the tunnel" if closed else
                        f"{echoed}, left open")
        else:
            self._count(kind, f"{echoed}, closed" if not peer.lost.called else
                        f"{echoed}, closed by the tunnel")
        transport.loseConnection()
        await _bounded(self.clock, peer.lost, WAIT)

    async def _pool_round(self, cut: int, refused: int) -> None:
        """Sessions on the relayed pair: ``cut`` ended by a pool cut, then
        ``refused`` while its pool is down."""
        peers: List[_Peer] = []
        for _ in range(cut):
            peer = await self._connect(self.ports[1])
            if peer is None:
                self._count("pool_cut", "not connected")
                continue
            assert peer.transport is not None
            peer.transport.write(self._request())
            peers.append(peer)
        await self._all(self.clock, [p.echoed() for p in peers], WAIT)
        self.relay.down = True
        self.relay.cut()
        await self._all(self.clock, [p.lost for p in peers], CLOSE_WAIT)
        for peer in peers:
            echoed = "echoed" if peer.echoes else "no echo"
            self._end("pool_cut", peer, f"{echoed}, ")
        refusing: List[_Peer] = []
        for _ in range(refused):
            peer = await self._connect(self.ports[1])
            if peer is None:
                self._count("refused", "not connected")
            else:
                refusing.append(peer)
        await self._all(self.clock, [p.lost for p in refusing], CLOSE_WAIT)
        for peer in refusing:
            self._end("refused", peer, "")
        self.relay.down = False
        await self._pool_back()

    async def _all(self, clock: IReactorTime, ds: "List[defer.Deferred[Any]]",
                   seconds: float) -> None:
        """Wait until every one of ``ds`` fired, at most ``seconds`` in all."""
        deadline = time.monotonic() + seconds
        for d in ds:
            await _bounded(clock, d, max(0.0, deadline - time.monotonic()))

    def _end(self, kind: str, peer: _Peer, prefix: str) -> None:
        """Count a session the tunnel should have closed; close it if not."""
        closed = peer.lost.called
        self._count(kind, prefix + ("closed by the tunnel" if closed else "left open"))
        if not closed:
            _abort(peer)

    async def _pool_back(self) -> None:
        """Wait (bounded) until a frame makes it through the relayed pair again."""
        deadline = time.monotonic() + POOL_BACK
        while time.monotonic() < deadline:
            peer = await self._connect(self.ports[1])
            if peer is not None:
                assert peer.transport is not None
                peer.transport.write(self._request())
                await _bounded(self.clock, peer.echoed(), WAIT)
                ok = peer.echoes > 0
                peer.transport.loseConnection()
                await _bounded(self.clock, peer.lost, WAIT)
                if ok:
                    return
            await _sleep(self.clock, 0.05)
        raise RuntimeError(f"the relayed pair's pool did not come back within "
                           f"{POOL_BACK:.0f} s")

    async def run(self, count: int) -> None:
        """Run about ``count`` more sessions (whole batches), the direct
        kinds ``BATCH`` at a time each."""
        target = self.sessions + count
        direct = [k for k in self.kinds if k in DIRECT_KINDS]
        while self.sessions < target:
            if direct:
                await defer.gatherResults(
                    [defer.ensureDeferred(self._session(k))
                     for k in direct for _ in range(BATCH)], consumeErrors=True)
            cut = BATCH if "pool_cut" in self.kinds else 0
            refused = BATCH if "refused" in self.kinds else 0
            if cut or refused:
                await self._pool_round(cut, refused)


async def churn_rss(reactor: IReactorTCP, churn: Churn, rss: "Any", total: int,
                    warmup: int, step: int = 1000) -> List[Dict[str, int]]:
    """Warm up, then run ``total`` sessions, reading ``rss()`` (a dict of
    KiB by tunnel end) after the warm-up and after every ``step`` sessions.

    :returns: one row per reading: ``sessions`` (served since the warm-up)
        and the figures of ``rss()``.
    """
    clock = IReactorTime(reactor)
    await churn.run(warmup)
    base = churn.sessions
    await _sleep(clock, 0.5)
    rows = [dict(sessions=0, **rss())]
    while churn.sessions - base < total:
        await churn.run(min(step, total - (churn.sessions - base)))
        await _sleep(clock, 0.5)
        rows.append(dict(sessions=churn.sessions - base, **rss()))
    return rows
