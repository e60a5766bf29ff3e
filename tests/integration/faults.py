"""Fault injection for the integration tests: a TCP proxy that breaks connections.

:class:`FaultProxy` sits between two TCP peers on 127.0.0.1 (usually the
tunnel client's pool connections and the tunnel server) and forwards bytes
both ways through one :class:`Fault` per direction:

* :class:`ByteFault` works on raw bytes: corrupt one byte, drop bytes, delay
  everything, cut the connection (FIN), reset it (RST) or black-hole it (stop
  forwarding and reading, never close) at a given stream offset;
* :class:`UnitFault` knows the pool-connection format (PROTOCOL.md sections 3
  and 7, written here independently of :mod:`tigertunnel`): it cuts a
  direction into the hello and mux units and flips a bit in, drops,
  duplicates, reorders, relabels (another stream id) or cuts mid-frame the
  n-th unit of a kind.
"""

import struct
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from tests.integration.tbpeers import set_linger_zero, the_reactor

#: Pool-connection facts (PROTOCOL.md 3 and 7), independent of tigertunnel.
CONNECT_HELLO = 66
KEMCONNECT_HELLO = 1194
SERVER_HELLO = 49
MUX_HEADER = 12
MUX_MAGIC = b"XUMZ"
ENCRYPTED_SIZE_OFFSET = 16
UNIT_KINDS = {0: "data", 1: "open", 2: "close", 3: "sealed_open", 4: "ping", 5: "pong"}



C2S, S2C = "c2s", "s2c"


class Fault:
    """Decides what one direction of a proxied connection forwards.

    The base class forwards everything unchanged. ``fired`` fires with the
    time (``time.monotonic()``) the fault was applied.
    """

    def __init__(self) -> None:
        self.link: Optional["ProxyLink"] = None
        self.direction = C2S
        self.fired: "defer.Deferred[float]" = defer.Deferred()
        self.fired_at: Optional[float] = None

    def attach(self, link: "ProxyLink", direction: str) -> None:
        """Bind this fault to one direction of ``link``."""
        self.link = link
        self.direction = direction

    def forward(self, data: bytes) -> None:
        """Send bytes on towards their destination."""
        assert self.link is not None
        self.link.forward(self.direction, data)

    def fire(self) -> None:
        """Record that the fault has been applied."""
        if self.fired_at is None:
            self.fired_at = time.monotonic()
            if not self.fired.called:  # a waiter may have timed out
                self.fired.callback(self.fired_at)

    def received(self, data: bytes) -> None:
        """Bytes arrived from this direction's source."""
        self.forward(data)


class ByteFault(Fault):
    """A fault at byte offset ``at`` of the direction's stream.

    :param action: ``corrupt`` (XOR the byte at ``at`` with ``mask``),
        ``drop`` (drop ``length`` bytes from ``at``), ``cut`` (forward up to
        ``at``, then close both sockets), ``reset`` (same with RST),
        ``blackhole`` (forward up to ``at``, then forward nothing and read
        nothing, never close) or ``delay`` (every byte ``seconds`` late).
    """

    def __init__(self, action: str, at: int = 0, mask: int = 0x01, length: int = 1,
                 seconds: float = 0.0) -> None:
        super().__init__()
        self.action, self.at, self.mask = action, at, mask
        self.length, self.seconds = length, seconds
        self.offset = 0
        self._queue: List[Tuple[float, bytes]] = []

    def received(self, data: bytes) -> None:
        start, end = self.offset, self.offset + len(data)
        self.offset = end
        action, at = self.action, self.at
        assert self.link is not None
        if action == "delay":
            self.fire()
            self._queue.append((time.monotonic() + self.seconds, data))
            if len(self._queue) == 1:
                the_reactor().callLater(self.seconds, self._drain)
            return
        if action == "drop":
            lo = max(0, at - start)
            hi = max(lo, min(len(data), at + self.length - start))
            if lo < hi:
                self.fire()
                data = data[:lo] + data[hi:]
            self.forward(data)
            return
        if self.fired_at is not None and action != "corrupt":
            return  # cut, reset or black-holed: nothing more goes through
        if not start <= at < end:
            self.forward(data)
            return
        i = at - start
        if action == "corrupt":
            changed = bytearray(data)
            changed[i] ^= self.mask
            self.fire()
            self.forward(bytes(changed))
            return
        self.forward(data[:i])
        self.fire()
        getattr(self.link, action)()

    def _drain(self) -> None:
        now = time.monotonic()
        while self._queue and self._queue[0][0] <= now + 0.001:
            self.forward(self._queue.pop(0)[1])
        if self._queue:
            the_reactor().callLater(max(0.0, self._queue[0][0] - now), self._drain)


class UnitSplitter:
    """Cut one direction of a pool connection into its hello and its mux units.

    Yields ``(kind, bytes)`` with kind ``hello``, ``data``, ``open``,
    ``close`` or ``raw`` (anything after bytes that do not parse).
    """

    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.buffer = bytearray()
        self.hello_done = False
        self.raw = False

    def _unit_size(self) -> Tuple[Optional[str], int]:
        buf = self.buffer
        if not self.hello_done:
            if self.direction == C2S:
                if len(buf) < 2:
                    return None, 0
                size = {0: CONNECT_HELLO, 1: KEMCONNECT_HELLO}.get(buf[1], 0)
            else:
                if len(buf) < 1:
                    return None, 0
                size = SERVER_HELLO if buf[0] == 0 else 1
            return ("hello", size) if size else ("raw", len(buf))
        if len(buf) < MUX_HEADER:
            return None, 0
        kind = UNIT_KINDS.get(buf[8])
        if buf[0:4] != MUX_MAGIC or kind is None:
            return "raw", len(buf)
        if kind == "data":
            end = MUX_HEADER + ENCRYPTED_SIZE_OFFSET + 4
            if len(buf) < end:
                return None, 0
            return kind, MUX_HEADER + struct.unpack_from("<I", buf, end - 4)[0]
        return kind, MUX_HEADER + (0 if kind == "open" else 256)

    def feed(self, data: bytes) -> List[Tuple[str, bytes]]:
        """Add bytes; return the units they completed."""
        self.buffer += data
        units: List[Tuple[str, bytes]] = []
        while self.buffer:
            if self.raw:
                units.append(("raw", bytes(self.buffer)))
                self.buffer.clear()
                break
            kind, size = self._unit_size()
            if kind is None or len(self.buffer) < size:
                break
            if kind == "raw":
                self.raw = True
                continue
            units.append((kind, bytes(self.buffer[:size])))
            del self.buffer[:size]
            if kind == "hello":
                self.hello_done = True
        return units


class UnitFault(Fault):
    """A fault applied to the ``index``-th unit of ``kind`` (0-based) of a direction.

    :param action: ``flip`` (XOR bit ``bit`` of byte ``offset`` of the unit,
        mux header included), ``drop``, ``duplicate``, ``reorder`` (send the
        next unit of the same kind first), ``relabel`` (rewrite the stream id
        to ``stream``), ``cut`` / ``reset`` (forward the first half of the
        unit, then close both sockets with FIN / RST) or ``blackhole``.
    """

    def __init__(self, action: str, kind: str = "data", index: int = 0,
                 offset: int = 0, bit: int = 0, stream: int = 0) -> None:
        super().__init__()
        self.action, self.kind, self.index = action, kind, index
        self.offset, self.bit, self.stream = offset, bit, stream
        self.splitter: Optional[UnitSplitter] = None
        self.counts: Dict[str, int] = {}
        self.held: Optional[bytes] = None
        self.stopped = False

    def attach(self, link: "ProxyLink", direction: str) -> None:
        super().attach(link, direction)
        self.splitter = UnitSplitter(direction)

    def received(self, data: bytes) -> None:
        assert self.splitter is not None and self.link is not None
        for kind, unit in self.splitter.feed(data):
            if self.stopped:
                return
            number = self.counts.get(kind, 0)
            self.counts[kind] = number + 1
            if kind != self.kind:
                self.forward(unit)
            elif self.held is not None:
                held, self.held = self.held, None
                self.forward(unit + held)
            elif number == self.index:
                self._apply(unit)
            else:
                self.forward(unit)

    def _apply(self, unit: bytes) -> None:
        assert self.link is not None
        action = self.action
        self.fire()
        if action == "flip":
            changed = bytearray(unit)
            changed[self.offset] ^= 1 << self.bit
            self.forward(bytes(changed))
        elif action == "duplicate":
            self.forward(unit + unit)
        elif action == "reorder":
            self.held = unit
        elif action == "relabel":
            self.forward(unit[:4] + struct.pack("<I", self.stream) + unit[8:])
        elif action in ("cut", "reset"):
            self.forward(unit[:len(unit) // 2])
            self.stopped = True
            getattr(self.link, action)()
        elif action == "blackhole":
            self.stopped = True
            self.link.blackhole()
        # "drop": nothing is forwarded


class _Side(Protocol):
    """One socket of a proxied connection."""

    def __init__(self, link: "ProxyLink", direction: str) -> None:
        self.link = link
        self.direction = direction  # the direction of the bytes it receives

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.link.side_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.link.received(self.direction, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.link.side_lost(self)


class ProxyLink:
    """One proxied connection: the accepted socket and the one to the target.

    :ivar closed: fires with the time both sockets are closed.
    """

    def __init__(self, proxy: "FaultProxy", index: int, c2s: Fault, s2c: Fault) -> None:
        self.proxy = proxy
        self.index = index
        self.accepted_at = time.monotonic()
        self.faults = {C2S: c2s, S2C: s2c}
        c2s.attach(self, C2S)
        s2c.attach(self, S2C)
        self.inbound = _Side(self, C2S)
        self.outbound: Optional[_Side] = None
        self.open_sides = 0
        self.holed = False
        self.bytes = {C2S: 0, S2C: 0}
        self.closed: "defer.Deferred[float]" = defer.Deferred()
        self.closed_at: Optional[float] = None

    def side_made(self, side: _Side) -> None:
        """A socket is connected; the inbound one waits for the outbound one."""
        self.open_sides += 1
        if side is self.inbound:
            side.transport.pauseProducing()
            out = _Side(self, S2C)
            factory = ClientFactory.forProtocol(lambda: out)
            factory.noisy = False
            factory.clientConnectionFailed = lambda c, r: self.inbound.transport.abortConnection()
            the_reactor().connectTCP("127.0.0.1", self.proxy.target_port, factory, timeout=5)
        else:
            self.outbound = side
            side.transport.registerProducer(self.inbound.transport, True)
            self.inbound.transport.registerProducer(side.transport, True)
            self.inbound.transport.resumeProducing()

    def received(self, direction: str, data: bytes) -> None:
        """Bytes arrived from one side; its fault decides what goes on."""
        if not self.holed:
            self.faults[direction].received(data)

    def forward(self, direction: str, data: bytes) -> None:
        """Write bytes to the destination of ``direction``."""
        dest = self.outbound if direction == C2S else self.inbound
        if data and dest is not None and not self.holed and dest.transport is not None:
            self.bytes[direction] += len(data)
            dest.transport.write(data)

    def _sides(self) -> List[_Side]:
        return [s for s in (self.inbound, self.outbound) if s is not None]

    def cut(self) -> None:
        """Close both sockets at once (FIN; unsent bytes are dropped)."""
        for side in self._sides():
            side.transport.abortConnection()

    def reset(self) -> None:
        """Close both sockets with RST."""
        for side in self._sides():
            set_linger_zero(side.transport)
            side.transport.abortConnection()

    def blackhole(self) -> None:
        """Forward nothing more and stop reading; never close (no FIN)."""
        self.holed = True
        for side in self._sides():
            side.transport.unregisterProducer()
            side.transport.pauseProducing()
        self.proxy.holes.append(self)

    def side_lost(self, side: _Side) -> None:
        """A socket closed: close the other one too (unless black-holed)."""
        self.open_sides -= 1
        if not self.holed:
            for other in self._sides():
                if other is not side and other.transport is not None:
                    other.transport.loseConnection()
        if self.open_sides <= 0 and self.closed_at is None:
            self.closed_at = time.monotonic()
            if not self.closed.called:  # a waiter may have timed out
                self.closed.callback(self.closed_at)


class FaultProxy(Factory):
    """A TCP proxy on 127.0.0.1 that breaks connections on purpose.

    :param target_port: where accepted connections are forwarded.
    :param faults: given the index of an accepted connection (0, 1 ...),
        returns its ``(c2s, s2c)`` faults; plain forwarding by default.
    """

    noisy = False

    def __init__(self, target_port: int,
                 faults: Optional[Callable[[int], Tuple[Fault, Fault]]] = None) -> None:
        self.target_port = target_port
        self.faults = faults or (lambda i: (Fault(), Fault()))
        self.links: List[ProxyLink] = []
        self.holes: List[ProxyLink] = []
        self.accepted: "defer.DeferredQueue[ProxyLink]" = defer.DeferredQueue()
        self.port: Optional[Any] = None

    def buildProtocol(self, addr: Any) -> _Side:
        c2s, s2c = self.faults(len(self.links))
        link = ProxyLink(self, len(self.links), c2s, s2c)
        self.links.append(link)
        self.accepted.put(link)
        return link.inbound

    def listen(self) -> int:
        """Start listening; return the port."""
        self.port = the_reactor().listenTCP(0, self, interface="127.0.0.1")
        return int(self.port.getHost().port)

    async def stop(self) -> None:
        """Stop listening and close every connection, black-holed ones included."""
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
            self.port = None
        for link in self.links:
            for side in link._sides():
                if side.transport is not None and side.transport.connected:
                    side.transport.abortConnection()
