"""TB peers for the integration tests: a TB client, a scriptable TB replica.

:class:`TBPeer` is either end of a TB connection as the tests see it: it
records a digest of every complete frame, in order, and when it was lost.
:func:`tb_connect` connects one to a tunnel client as a TB client would.

:class:`ScriptedBackend` plays a TB replica. Its default
:class:`ControlScript` echoes ordinary frames and obeys *control frames*
(:func:`control_frame`): answer with N frames, answer slowly, start sending
unsolicited frames, flood, close or reset. Run it as a separate process with
:func:`backend_command` when a test must kill it.
"""

import hashlib
import os
import random
import socket
import struct
import sys
import time
from typing import Any, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from tigertunnel.tools.tbframes import make_tb_frame

#: TB frame facts (PROTOCOL.md 6.1), independent of tigertunnel.wire.frames.
HEADER_SIZE = 256
SIZE_OFFSET = 96
MAX_FRAME_SIZE = 1 << 20


def the_reactor() -> Any:
    """The global reactor, imported when first needed (after trial installs it)."""
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
        return d.addTimeout(timeout, the_reactor())

    def wait_lost(self, timeout: float) -> "defer.Deferred[float]":
        """Fire with the loss time once the connection is closed (bounded)."""
        d: "defer.Deferred[float]" = defer.Deferred()

        def done(result: Any) -> Any:
            if not d.called:
                d.callback(result)
            return result

        self.lost.addBoth(done)
        return d.addTimeout(timeout, the_reactor())

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


async def tb_connect(port: int, timeout: float = 5.0, source: str = "127.0.0.1") -> TBPeer:
    """Connect a TB client (:class:`TBPeer`) from ``source`` to 127.0.0.1:``port``."""
    endpoint = TCP4ClientEndpoint(the_reactor(), "127.0.0.1", port, timeout=timeout,
                                  bindAddress=(source, 0))
    peer: TBPeer = await endpoint.connect(TBPeerFactory())
    return peer


# -- the scriptable backend ----------------------------------------------------

CONTROL_MAGIC = b"TTCTL"
_CONTROL = struct.Struct("<5sBHII")  # magic, op, count, delay ms, reply size
#: Operations of a control frame (the first body bytes of a request).
ECHO, REPLY, SLOW, UNSOLICITED, FLOOD, CLOSE, RESET = b"ERSUFCX"


def control_frame(op: int, count: int = 0, delay: float = 0.0, size: int = 256,
                  tag: int = 0, pad: int = 0) -> bytes:
    """A request telling :class:`ControlScript` what to do.

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
    """The ``index``-th frame :class:`ControlScript` sends for request ``tag``."""
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
        self.calls.append(the_reactor().callLater(delay, fire))


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
        self.port = the_reactor().listenTCP(port, self, backlog=1024, interface="127.0.0.1")
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
            f"from tests.integration.tbpeers import main; main()")
    return [sys.executable, "-c", code, "backend", str(port)]


def main() -> None:
    """Run a :class:`ScriptedBackend` until killed (``backend PORT``)."""
    port = int(sys.argv[2])
    reactor = the_reactor()
    ScriptedBackend().listen(port)
    reactor.callWhenRunning(lambda: print(f"listening on {port}", flush=True))
    reactor.run()
