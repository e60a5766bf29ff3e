"""Fault injection for the reliability tests: a TCP proxy and a scriptable TB backend.

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

:class:`ScriptedBackend` plays a TB replica. Its default
:func:`control_script` echoes ordinary frames and obeys *control frames*
(:func:`control_frame`): answer with N frames, answer slowly, start sending
unsolicited frames, flood, close or reset. Run it as a separate process with
:func:`backend_command` when a test must kill it.

:class:`TBPeer` is either end of a TB connection as the tests see it: it
records a digest of every complete frame, in order, and when it was lost.
"""

import hashlib
import os
import random
import socket
import struct
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from tigertunnel.tools.tbframes import make_tb_frame

#: TB frame facts (PROTOCOL.md 6.1), independent of tigertunnel.wire.frames.
HEADER_SIZE = 256
SIZE_OFFSET = 96
MAX_FRAME_SIZE = 1 << 20
#: Pool-connection facts (PROTOCOL.md 3 and 7), independent of tigertunnel.
CONNECT_HELLO = 66
KEMCONNECT_HELLO = 1194
SERVER_HELLO = 49
MUX_HEADER = 12
MUX_MAGIC = b"XUMZ"
ENCRYPTED_SIZE_OFFSET = 16
UNIT_KINDS = {0: "data", 1: "open", 2: "close"}


def _reactor() -> Any:
    from twisted.internet import reactor
    return reactor


def digest(frame: bytes) -> str:
    """A short SHA-256 digest, so that a mismatch never prints megabytes."""
    return hashlib.sha256(frame).hexdigest()[:16]


def make_frame(body: bytes, tag: int = 0) -> bytes:
    """A TB frame: ``tag`` in the first 16 bytes, zero paddings, cluster 0, right size.

    ``nonce_reserved`` and ``cluster`` are zero, so the frame crosses an
    encrypted tunnel byte-identical.
    """
    return make_tb_frame(body, tag=tag)


def filler(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes determined by ``seed``."""
    return random.Random(seed).randbytes(size)


class FrameSplitter:
    """Cut a TB byte stream into frames by the size field (256 .. 1 MiB)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> List[bytes]:
        """Add bytes; return the frames they completed.

        :raises AssertionError: a size field outside 256 .. 1 MiB.
        """
        buf = self.buffer
        buf += data
        frames = []
        start = 0
        while len(buf) - start >= SIZE_OFFSET + 4:
            size = struct.unpack_from("<I", buf, start + SIZE_OFFSET)[0]
            if not HEADER_SIZE <= size <= MAX_FRAME_SIZE:
                raise AssertionError(f"TB frame with size field {size}")
            if len(buf) - start < size:
                break
            frames.append(bytes(buf[start:start + size]))
            start += size
        del buf[:start]
        return frames


class TBPeer(Protocol):
    """A TB client or replica played by the test; records what it sees.

    :ivar digests: digests of the complete frames received, in order.
    :ivar sent: digests of the frames sent, in order.
    :ivar lost: fires with the time (``time.monotonic()``) the connection closed.
    """

    def __init__(self, keep_frames: bool = False) -> None:
        self.splitter = FrameSplitter()
        self.keep_frames = keep_frames
        self.frames: List[bytes] = []
        self.digests: List[str] = []
        self.arrivals: List[float] = []
        self.sent: List[str] = []
        self.lost: "defer.Deferred[float]" = defer.Deferred()
        self.lost_at: Optional[float] = None
        self.lost_reason: Optional[Failure] = None
        self._waiters: List[Tuple[int, "defer.Deferred[None]"]] = []

    @property
    def is_lost(self) -> bool:
        """Whether the connection has closed."""
        return self.lost_at is not None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        frames = self.splitter.feed(data)
        now = time.monotonic()
        for frame in frames:
            self.digests.append(digest(frame))
            self.arrivals.append(now)
            if self.keep_frames:
                self.frames.append(frame)
            self.frame_received(frame)
        if frames and self._waiters:
            ready = [w for w in self._waiters if len(self.digests) >= w[0]]
            self._waiters = [w for w in self._waiters if w not in ready]
            for _, d in ready:
                if not d.called:  # not timed out meanwhile
                    d.callback(None)

    def frame_received(self, frame: bytes) -> None:
        """Called for every complete frame (after it is recorded)."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_at = time.monotonic()
        self.lost_reason = reason
        waiters, self._waiters = self._waiters, []
        for count, d in waiters:
            if d.called:
                continue
            d.errback(AssertionError(
                f"connection lost with {len(self.digests)} of {count} frames "
                f"received ({reason.getErrorMessage()})"))
        if not self.lost.called:
            self.lost.callback(self.lost_at)

    def send(self, *frames: bytes) -> None:
        """Write TB frames, remembering their digests."""
        self.sent.extend(digest(f) for f in frames)
        self.transport.writeSequence(list(frames))

    def wait_frames(self, count: int, timeout: float) -> "defer.Deferred[None]":
        """Fire once ``count`` frames have arrived in all; fail on loss or timeout."""
        if len(self.digests) >= count:
            return defer.succeed(None)
        if self.is_lost:
            return defer.fail(AssertionError(
                f"connection already lost with {len(self.digests)} of {count} frames"))
        d: "defer.Deferred[None]" = defer.Deferred()
        self._waiters.append((count, d))
        return d.addTimeout(timeout, _reactor())

    def wait_lost(self, timeout: float) -> "defer.Deferred[float]":
        """Fire with the loss time once the connection is closed (bounded)."""
        d: "defer.Deferred[float]" = defer.Deferred()

        def done(result: Any) -> Any:
            if not d.called:
                d.callback(result)
            return result

        self.lost.addBoth(done)
        return d.addTimeout(timeout, _reactor())

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0)."""
        set_linger_zero(self.transport)
        self.transport.abortConnection()


class TBPeerFactory(ClientFactory):
    """Builds :class:`TBPeer` (used with endpoints for TB clients)."""

    noisy = False

    def __init__(self, keep_frames: bool = False) -> None:
        self.keep_frames = keep_frames

    def buildProtocol(self, addr: Any) -> TBPeer:
        return TBPeer(self.keep_frames)


def set_linger_zero(transport: Any) -> None:
    """Make the next close of ``transport`` send RST instead of FIN."""
    try:
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
    except (AttributeError, OSError):
        pass


# -- the scriptable backend ----------------------------------------------------

CONTROL_MAGIC = b"TTCTL"
_CONTROL = struct.Struct("<5sBHII")  # magic, op, count, delay ms, reply size
#: Operations of a control frame (the first body bytes of a request).
ECHO, REPLY, SLOW, UNSOLICITED, FLOOD, CLOSE, RESET = b"ERSUFCX"


def control_frame(op: int, count: int = 0, delay: float = 0.0, size: int = 256,
                  tag: int = 0, pad: int = 0) -> bytes:
    """A request telling :func:`control_script` what to do.

    :param op: one of ``ECHO`` (send the request back), ``REPLY`` (answer
        with ``count`` frames of ``size`` bytes), ``SLOW`` (echo after
        ``delay`` s), ``UNSOLICITED`` (send ``count`` frames of ``size``
        bytes, one every ``delay`` s), ``FLOOD`` (send ``count`` frames of
        ``size`` bytes at once), ``CLOSE`` / ``RESET`` (close the connection
        with FIN / RST, no answer).
    :param pad: extra body bytes after the control block.
    """
    block = _CONTROL.pack(CONTROL_MAGIC, op, count, int(delay * 1000), size)
    return make_frame(block + filler(pad, tag), tag)


def reply_frame(tag: int, index: int, size: int) -> bytes:
    """The ``index``-th frame :func:`control_script` sends for request ``tag``."""
    body = b"TTRPL" + struct.pack("<QI", tag, index)
    body += filler(max(0, size - HEADER_SIZE - len(body)), tag * 1000 + index)
    return make_frame(body, tag)


def parse_control(frame: bytes) -> Optional[Tuple[int, int, float, int]]:
    """``(op, count, delay, size)`` of a control frame, ``None`` for an ordinary frame."""
    if frame[HEADER_SIZE:HEADER_SIZE + 5] != CONTROL_MAGIC or len(frame) < HEADER_SIZE + 16:
        return None
    _, op, count, delay_ms, size = _CONTROL.unpack_from(frame, HEADER_SIZE)
    return op, count, delay_ms / 1000, size


def frame_tag(frame: bytes) -> int:
    """The tag :func:`make_frame` wrote into a frame."""
    return int.from_bytes(frame[0:16], "little")


class BackendConnection(TBPeer):
    """One connection accepted by :class:`ScriptedBackend`."""

    def __init__(self, backend: "ScriptedBackend", number: int) -> None:
        super().__init__()
        self.backend = backend
        self.number = number
        self.calls: List[Any] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.backend.script.connected(self)

    def frame_received(self, frame: bytes) -> None:
        self.backend.frames_received += 1
        self.backend.script.frame(self, frame)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()
        super().connectionLost(reason)

    def send_later(self, delay: float, *frames: bytes) -> None:
        """Send frames after ``delay`` seconds, if still connected."""
        def fire() -> None:
            if not self.is_lost:
                self.send(*frames)
        self.calls.append(_reactor().callLater(delay, fire))


class Script:
    """How a :class:`ScriptedBackend` behaves; the default echoes every frame."""

    def __init__(self, greeting: int = 0) -> None:
        self.greeting = greeting

    def connected(self, conn: BackendConnection) -> None:
        """A connection was accepted; send ``greeting`` unsolicited frames."""
        if self.greeting:
            conn.send(*[reply_frame(1 << 60 | conn.number, i, 300)
                        for i in range(self.greeting)])

    def frame(self, conn: BackendConnection, frame: bytes) -> None:
        """A complete frame arrived on ``conn``."""
        conn.send(frame)


class ControlScript(Script):
    """Obeys control frames (:func:`control_frame`); echoes the others."""

    def frame(self, conn: BackendConnection, frame: bytes) -> None:
        control = parse_control(frame)
        if control is None:
            conn.send(frame)
            return
        op, count, delay, size = control
        tag = frame_tag(frame)
        if op == ECHO:
            conn.send(frame)
        elif op == REPLY:
            if count:
                conn.send(*[reply_frame(tag, i, size) for i in range(count)])
        elif op == SLOW:
            conn.send_later(delay, frame)
        elif op == UNSOLICITED:
            for i in range(count):
                conn.send_later(delay * (i + 1), reply_frame(tag, i, size))
        elif op == FLOOD:
            one = reply_frame(tag, 0, size)
            for _ in range(count):
                conn.send(one)
        elif op == CLOSE:
            conn.transport.loseConnection()
        elif op == RESET:
            conn.reset()


class ScriptedBackend(Factory):
    """A fake replica listening on 127.0.0.1; ``refuse()`` stops listening."""

    noisy = False

    def __init__(self, script: Optional[Script] = None) -> None:
        self.script = script or ControlScript()
        self.connections: List[BackendConnection] = []
        self.frames_received = 0
        self.port: Optional[Any] = None
        self.port_number = 0

    def buildProtocol(self, addr: Any) -> BackendConnection:
        conn = BackendConnection(self, len(self.connections))
        self.connections.append(conn)
        return conn

    def listen(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:``port`` (0: any) and return the port."""
        self.port = _reactor().listenTCP(port, self, backlog=1024, interface="127.0.0.1")
        self.port_number = self.port.getHost().port
        return self.port_number

    async def refuse(self) -> None:
        """Stop listening: new connections are refused (RST)."""
        if self.port is not None:
            port, self.port = self.port, None
            await defer.maybeDeferred(port.stopListening)

    @property
    def open_connections(self) -> List[BackendConnection]:
        """Connections not yet lost."""
        return [c for c in self.connections if not c.is_lost]

    async def connection(self, index: int, timeout: float = 5.0) -> BackendConnection:
        """The ``index``-th accepted connection (0-based), once it exists (bounded wait)."""
        from tests.integration.procs import wait_until
        await wait_until(lambda: len(self.connections) > index, timeout,
                         f"backend connection #{index}")
        return self.connections[index]


def backend_command(port: int) -> List[str]:
    """The command line running a :class:`ScriptedBackend` process on ``port``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {root!r}); "
            f"from tests.integration.faults import main; main()")
    return [sys.executable, "-c", code, "backend", str(port)]


def main() -> None:
    """Run a :class:`ScriptedBackend` until killed (``backend PORT``)."""
    port = int(sys.argv[2])
    reactor = _reactor()
    ScriptedBackend().listen(port)
    reactor.callWhenRunning(lambda: print(f"listening on {port}", flush=True))
    reactor.run()


# -- the fault-injection proxy -------------------------------------------------

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
                _reactor().callLater(self.seconds, self._drain)
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
            _reactor().callLater(max(0.0, self._queue[0][0] - now), self._drain)


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
        return kind, MUX_HEADER + (256 if kind == "close" else 0)

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
            _reactor().connectTCP("127.0.0.1", self.proxy.target_port, factory, timeout=5)
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
        self.port = _reactor().listenTCP(0, self, interface="127.0.0.1")
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
