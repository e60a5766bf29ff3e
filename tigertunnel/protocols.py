"""Protocols: the glue between sockets and the sans-IO cores.

Two kinds of connection meet in a tunnel end:

* :class:`FrameProtocol` speaks plain TigerBeetle: on the tunnel client it is a
  TB client's connection accepted on the listening port; on the tunnel server
  it is the connection to the backend (the replica), one per stream. It cuts
  the byte stream into TB frames and hands each complete frame to its pool
  connection at once, and writes the frames the pool connection delivers.
  There is no request/response pairing: frames flow both ways independently.
* :class:`TunnelProtocol` is one pool connection: handshake, then the mux
  codec (:mod:`tigertunnel.mux`). It owns the table of the streams that live
  on it.

Flow control. A pool connection is never paused because one session is
slow: each :class:`FrameProtocol` watches its own socket, and a TB peer that
lets more than :data:`SESSION_BUFFER_LIMIT` bytes pile up unread loses its
session (the TB side reconnects; the tunnel keeps serving the others). When
the pool connection's own socket is full, every session on it stops reading
its TB peer until it drains.

Closing. A TB peer that closes makes its stream close on the other end; a
lost pool connection closes every session on it on both ends; a failed
backend connection closes the TB client (via the version-2 ``stream_close``
extension). Nothing after a frame that failed to authenticate is delivered.
"""

import socket
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tigertunnel.errors import (
    ClusterMismatchError,
    FrameError,
    HandshakeError,
    TunnelError,
)
from tigertunnel.frames import FrameParser, check_frame
from tigertunnel.handshake import (
    Accepted,
    ClientHandshake,
    Rejected,
    ServerHandshake,
    Status,
)
from tigertunnel.logs import logger
from tigertunnel.mux import (
    CLIENT,
    SERVER,
    LinkCodec,
    StreamClosed,
    StreamData,
    StreamOpened,
)

if TYPE_CHECKING:  # pragma: no cover
    from tigertunnel.services import SessionMultiplexer

#: Bytes a session may have queued towards a TB peer that is not reading
#: (beyond the socket buffers) before the session is closed.
SESSION_BUFFER_LIMIT = 8 * 1024 * 1024
#: Seconds a closing session waits for its TB peer to read what is queued
#: before the connection is aborted.
CLOSE_TIMEOUT = 10.0
#: Pool-connection writes smaller than this go through Twisted's buffer, so
#: that the frames of many sessions leave in one send per reactor turn;
#: larger ones are sent at once (see send_now), saving Twisted's copy.
COALESCE_BELOW = 64 * 1024
#: TCP keepalive as TigerBeetle configures it: 5 s idle, 4 s interval,
#: 3 probes, so a dead peer is found within about 20 s.
KEEPALIVE = (5, 4, 3)
#: Bytes Twisted may read or send per system call on our sockets: a whole
#: maximal TB frame with its mux header.
IO_SIZE = (1 << 20) + 64
#: TCP_USER_TIMEOUT (ms): unacknowledged data for this long kills the socket.
#: It also bounds keepalive (it overrides the probe count), so it equals
#: idle + interval * probes.
USER_TIMEOUT_MS = 17_000

log = logger("tigertunnel.protocols")


def tune_socket(transport: Any) -> None:
    """Set TCP_NODELAY and TigerBeetle-like TCP keepalive on a TCP transport.

    Also let Twisted read and send up to :data:`IO_SIZE` bytes per system
    call (its defaults, 64 KiB reads and 128 KiB sends, cost a 1 MiB TB frame
    16 reads and 8 sends per hop). ``bufferSize`` doubles as the write-buffer
    size above which our producers are paused.

    Transports without a socket (in-memory tests) are left alone.
    """
    if hasattr(transport, "SEND_LIMIT"):
        transport.bufferSize = IO_SIZE
        transport.SEND_LIMIT = IO_SIZE
    try:
        transport.setTcpNoDelay(True)
        transport.setTcpKeepAlive(True)
        sock = transport.getHandle()
        idle, interval, count = KEEPALIVE
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            USER_TIMEOUT_MS)
    except (AttributeError, NotImplementedError, OSError):
        pass


def _failure_kind(status: Optional[int]) -> str:
    """Metric label of a handshake failure seen by the client."""
    if status is None:
        return "server_auth"
    try:
        return f"rejected_{Status(status).name.lower()}"
    except ValueError:
        return "invalid_status"


def _rejection_kind(result: Rejected) -> str:
    """Metric label of a ClientHello the server rejected."""
    reason = result.reason
    for word, kind in (("unknown operation", "bad_operation"),
                       ("unknown version", "bad_version"),
                       ("unknown key id", "unknown_key"),
                       ("hash mismatch", "bad_hash"),
                       ("timestamp", "timestamp"),
                       ("replayed", "replay"),
                       ("requires KEM", "kem_required"),
                       ("KEM", "kem")):
        if word in reason:
            return kind
    return "other"


def send_now(transport: Any, data: "bytes | bytearray") -> None:
    """Write ``data``, straight to the socket when nothing is queued before it.

    Twisted's ``write`` queues every chunk, joins the queue into a new
    ``bytes`` and sends it on the next reactor turn, toggling epoll write
    interest each time. When a TCP transport has nothing queued we call its
    ``writeSomeData`` now (which maps EAGAIN to 0 and errors to a lost
    connection, as Twisted does) and queue only what the kernel did not take,
    so order is kept and Twisted's producer/consumer flow control still sees
    every queued byte. Other transports (in-memory tests) get ``write``.
    """
    # Twisted's FileDescriptor keeps its write queue in ``dataBuffer`` (from
    # ``offset``) and ``_tempDataBuffer``; anything unexpected falls back to
    # ``write``.
    if (getattr(transport, "_tempDataLen", 1) == 0
            and getattr(transport, "connected", False)
            and not getattr(transport, "disconnecting", True)
            and not getattr(transport, "_writeDisconnected", True)
            and getattr(transport, "offset", -1) == len(getattr(transport, "dataBuffer", b"x"))):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent >= 0:
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
    transport.write(bytes(data))


@implementer(IPushProducer)
class _WriteWatcher:
    """Registered on a TB-side transport to learn when its peer stops reading."""

    def __init__(self, session: "FrameProtocol") -> None:
        self._session = session

    def pauseProducing(self) -> None:
        self._session.peer_slow(True)

    def resumeProducing(self) -> None:
        self._session.peer_slow(False)

    def stopProducing(self) -> None:
        pass


class FrameProtocol(Protocol):
    """A plain TigerBeetle connection carrying one stream.

    :param mux: the proxy pair's :class:`SessionMultiplexer`.
    :param cluster_id: the configured cluster id, or ``None``; frames from
        the TB peer are checked against it when ``check_cluster`` is true.
    """

    link: "Optional[TunnelProtocol]" = None
    stream_id: int = -1

    def __init__(self, mux: "SessionMultiplexer", cluster_id: Optional[int],
                 check_cluster: bool) -> None:
        self.mux = mux
        self.clock: IReactorTime = mux.clock
        self._cluster_id = cluster_id
        self._check_cluster = check_cluster
        self._parser = FrameParser()
        self._pending: List[bytes] = []  # frames queued before connectionMade
        self._pending_bytes = 0
        self._slow = False
        self._unread = 0
        self._closing = False
        self._reading_paused = False
        self._close_timer: Optional[IDelayedCall] = None
        self.connecting: Optional[Deferred[Any]] = None
        self.stats = mux.stats

    # -- Twisted's interface -----------------------------------------------

    def connectionMade(self) -> None:
        tune_socket(self.transport)
        self.transport.registerProducer(_WriteWatcher(self), True)
        if self._closing:
            self.transport.loseConnection()
            return
        if self.link is None:
            # A TB client on the tunnel client: find it a pool connection.
            if not self.mux.attach(self):
                self._closing = True
                self.transport.loseConnection()
                return
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        if pending:
            self.transport.writeSequence(pending)
        if self.link is not None and self.link.paused:
            self.pause_reading()

    def dataReceived(self, data: bytes) -> None:
        link = self.link
        if self._closing or link is None:
            return
        try:
            frames = self._parser.feed(data)
            for frame in frames:
                if self._check_cluster or link.encrypted:
                    check_frame(frame, self._cluster_id)
                if self.link is not link or self._closing:
                    return
                stats = self.stats
                stats["frames_to_tunnel"] += 1
                stats["bytes_to_tunnel"] += len(frame)
                link.send_data(self.stream_id, frame)
        except ClusterMismatchError as e:
            if self._cluster_id is None:
                log.warn("{side} session {stream} on {link} closed: frame has "
                         "cluster {got} but no -c is configured; start both "
                         "tunnel ends with -c {got}", side=self.mux.role,
                         stream=self.stream_id, link=link.name, got=e.got)
            else:
                log.warn("{side} session {stream} on {link} closed: frame "
                         "cluster {got} is not the configured -c {expected}",
                         side=self.mux.role, stream=self.stream_id,
                         link=link.name, got=e.got, expected=e.expected)
            self.close()
        except FrameError as e:
            log.warn("{side} session {stream} on {link} closed: bad TB frame "
                     "({reason})", side=self.mux.role, stream=self.stream_id,
                     link=link.name, reason=str(e))
            self.close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        link, self.link = self.link, None
        if link is not None:
            link.end_stream(self.stream_id, self)
        self.mux.session_ended(self)

    # -- called by the pool connection -------------------------------------

    def attached(self, link: "TunnelProtocol", stream_id: int) -> None:
        """Bind this session to ``stream_id`` on pool connection ``link``."""
        self.link = link
        self.stream_id = stream_id

    def deliver(self, frame: bytes) -> None:
        """Write one TB frame that arrived for this stream to the TB peer."""
        if self._closing:
            return
        stats = self.stats
        stats["frames_from_tunnel"] += 1
        stats["bytes_from_tunnel"] += len(frame)
        if self.transport is None:
            self._pending.append(bytes(frame))
            self._pending_bytes += len(frame)
            if self._pending_bytes > SESSION_BUFFER_LIMIT:
                self._overflow()
            return
        send_now(self.transport, frame)
        if self._slow:
            self._unread += len(frame)
            if self._unread > SESSION_BUFFER_LIMIT:
                self._overflow()

    def close_by_peer(self, abort: bool = False) -> None:
        """The other end closed this stream (or its pool connection died).

        Queued frames are still written unless ``abort``; a TB peer that does
        not read them within :data:`CLOSE_TIMEOUT` is cut off.
        """
        self.link = None
        self.close(abort)

    def close(self, abort: bool = False) -> None:
        """Close this session's TB connection (or cancel its connect)."""
        self._closing = True
        if self.transport is None:
            if self.connecting is not None:
                self.connecting.cancel()
            return
        if abort:
            self.transport.abortConnection()
            return
        # Unregister our write watcher first: Twisted does not finish a
        # loseConnection whose buffer drains while a producer is paused.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._close_timer is None:
            self._close_timer = self.clock.callLater(
                CLOSE_TIMEOUT, self.transport.abortConnection)

    def connect_failed(self, reason: Failure) -> None:
        """The backend connection of this stream could not be made."""
        link, self.link = self.link, None
        if not self._closing:
            self.stats["backend_connect_failures"] += 1
            if "Too many open files" in reason.getErrorMessage():
                self.mux.limit_log("server {pair}: out of file descriptors; "
                                   "refusing streams (raise ulimit -n or "
                                   "lower -m)", pair=self.mux.name)
            else:
                log.warn("server session {stream}: backend {backend} refused:"
                         " {reason}", stream=self.stream_id,
                         backend=self.mux.backend_name,
                         reason=reason.getErrorMessage())
        if link is not None:
            link.end_stream(self.stream_id, self)
        self.mux.session_ended(self)

    def pause_reading(self) -> None:
        """Stop reading the TB peer (its pool connection's socket is full)."""
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read the TB peer again."""
        if self.transport is not None and self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def peer_slow(self, slow: bool) -> None:
        """Our socket to the TB peer filled up (``True``) or drained.

        Twisted repeats ``pauseProducing`` on every write while its buffer
        is over the limit, so only a drain resets the count of bytes queued
        while the peer was not reading.
        """
        if slow == self._slow:
            return
        self._slow = slow
        self._unread = 0

    def _overflow(self) -> None:
        self.stats["sessions_overflowed"] += 1
        log.warn("{side} session {stream}: TB peer is not reading; more than "
                 "{limit} bytes queued, closing the session",
                 side=self.mux.role, stream=self.stream_id,
                 limit=SESSION_BUFFER_LIMIT)
        self.close(abort=True)


class FrameFactory(Factory):
    """Builds :class:`FrameProtocol` for a proxy pair's TB listener."""

    noisy = False

    def __init__(self, mux: "SessionMultiplexer") -> None:
        self.mux = mux

    def buildProtocol(self, addr: Any) -> FrameProtocol:
        return self.mux.new_session()


class PrebuiltFactory(Factory):
    """Hands out one already-built protocol (a backend connection's session)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


@implementer(IPushProducer)
class TunnelProtocol(Protocol):
    """One pool connection, at either end.

    :param role: ``"client"`` or ``"server"``.
    :param handshake: the handshake machine, or ``None`` in plaintext mode.
    :param mux: the proxy pair's :class:`SessionMultiplexer`.
    """

    def __init__(self, role: str,
                 handshake: Union[ClientHandshake, ServerHandshake, None],
                 mux: "SessionMultiplexer", name: str) -> None:
        self.role = role
        self.mux = mux
        self.clock = mux.clock
        self.name = name
        self._handshake = handshake
        self.codec: Optional[LinkCodec] = None
        self.streams: Dict[int, FrameProtocol] = {}
        self.paused = False
        self._outcome: Union["TunnelProtocol", Failure, None] = None
        self._waiters: List[Deferred["TunnelProtocol"]] = []
        self._timer: Optional[IDelayedCall] = None
        self._next_id = 1
        self.key_id: Optional[int] = None
        #: The KEM key id of a kemconnect handshake (server side), else None.
        self.kem_key_id: Optional[int] = None
        self.peer_version: Optional[int] = None
        self._alive = False
        self.on_lost: Optional[Callable[["TunnelProtocol"], None]] = None
        self._close_timer: Optional[IDelayedCall] = None

    @property
    def ready(self) -> "Deferred[TunnelProtocol]":
        """A new Deferred that fires with this pool connection once its
        handshake completed, or fails with :class:`HandshakeError`."""
        if self._outcome is None:
            d: Deferred[TunnelProtocol] = Deferred()
            self._waiters.append(d)
            return d
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        return succeed(self._outcome)

    def _settle(self, outcome: Union["TunnelProtocol", Failure]) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    @property
    def encrypted(self) -> bool:
        """Whether this pool connection encrypts (a key was configured)."""
        return self.codec is not None and self.codec.encrypted

    @property
    def established(self) -> bool:
        """Whether the handshake is done and streams may use this link."""
        return self.codec is not None and self._alive

    # -- Twisted's interface -----------------------------------------------

    def connectionMade(self) -> None:
        self._alive = True
        tune_socket(self.transport)
        self.transport.registerProducer(self, True)
        if self._handshake is None:
            self._established(LinkCodec(self.role, None), b"")
            return
        self._timer = self.clock.callLater(self.mux.handshake_timeout,
                                           self._handshake_timed_out)
        self.mux.handshake_started(self)
        if isinstance(self._handshake, ClientHandshake):
            self.transport.write(self._handshake.start())

    def dataReceived(self, data: bytes) -> None:
        if self.codec is None:
            self._handshake_data(data)
            return
        try:
            events = self.codec.feed(data)
        except TunnelError as e:
            self._fail(f"{type(e).__name__}: {e}")
            return
        for event in events:
            if isinstance(event, StreamData):
                session = self.streams.get(event.stream_id)
                if session is not None:
                    session.deliver(event.frame)
            elif isinstance(event, StreamOpened):
                self._peer_opened(event.stream_id)
            elif isinstance(event, StreamClosed):
                session = self.streams.pop(event.stream_id, None)
                if session is not None:
                    session.close_by_peer()
            if not self._alive:
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._alive = False
        self._cancel_timer()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self.mux.handshake_ended(self)
        streams, self.streams = self.streams, {}
        if self.codec is not None:
            self.codec = None
            log.info("{role} pool connection {link} lost ({reason}); closing "
                     "{count} sessions", role=self.role, link=self.name,
                     reason=reason.getErrorMessage(), count=len(streams))
            self.mux.link_down(self)
        elif self._outcome is None:
            self._settle(Failure(HandshakeError(
                f"connection lost during handshake: {reason.getErrorMessage()}")))
        for session in streams.values():
            session.close_by_peer(abort=True)
        if self.on_lost is not None:
            self.on_lost(self)

    # -- IPushProducer: our socket to the peer tunnel end -------------------

    def pauseProducing(self) -> None:
        self.paused = True
        for session in self.streams.values():
            session.pause_reading()

    def resumeProducing(self) -> None:
        self.paused = False
        for session in list(self.streams.values()):
            session.resume_reading()

    def stopProducing(self) -> None:
        pass

    # -- handshake ----------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        hs = self._handshake
        try:
            if isinstance(hs, ClientHandshake):
                est = hs.feed(data)
                if est is None:
                    return
                self.key_id = est.key_id
                self._established(
                    LinkCodec(CLIENT, est.keys, self.mux.cluster_value),
                    est.leftover)
                return
            assert isinstance(hs, ServerHandshake)
            result = hs.feed(data)
        except HandshakeError as e:
            self.mux.handshake_failed(self, str(e), kind=_failure_kind(e.status))
            self._fail_handshake(e)
            return
        if result is None:
            return
        if isinstance(result, Rejected):
            self.mux.handshake_failed(self, result.reason, result.skew,
                                      kind=_rejection_kind(result))
            if result.reply:
                self.transport.write(result.reply)
            self._fail_handshake(HandshakeError(result.reason, result.status))
            return
        assert isinstance(result, Accepted)
        est = result.established
        self.key_id = est.key_id
        self.kem_key_id = est.kem_key_id
        self.peer_version = est.peer_version
        self.transport.write(result.reply)
        self._established(
            LinkCodec(SERVER, est.keys, self.mux.cluster_value,
                      peer_extended=est.peer_version >= 2),
            est.leftover)

    def _established(self, codec: LinkCodec, leftover: bytes) -> None:
        self._cancel_timer()
        self.mux.handshake_ended(self)
        self._handshake = None
        self.codec = codec
        self.mux.link_up(self)
        if self._outcome is None:
            self._settle(self)
        if leftover and self._alive:
            self.dataReceived(leftover)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self.mux.handshake_failed(self, "handshake timed out", kind="timeout")
        self._fail_handshake(HandshakeError("handshake timed out"))

    def _fail_handshake(self, error: HandshakeError) -> None:
        self._cancel_timer()
        self._handshake = None
        if self._outcome is None:
            self._settle(Failure(error))
        self._alive = False
        self.close_gracefully()

    def close_gracefully(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close this pool connection after what is queued has been sent.

        Unregisters this protocol as the transport's producer first (Twisted
        does not finish a ``loseConnection`` whose buffer drains while its
        producer is paused), and aborts the connection if the peer has not
        taken the queued bytes within ``timeout`` seconds.
        """
        if not self._alive and self._close_timer is not None:
            return
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._close_timer is None:
            self._close_timer = self.clock.callLater(
                timeout, self.transport.abortConnection)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def evict(self) -> None:
        """Drop this connection before its handshake finished (too many pending)."""
        self._fail_handshake(HandshakeError("evicted: too many pending handshakes"))
        self.transport.abortConnection()

    def _fail(self, reason: str) -> None:
        log.error("{role} pool connection {link} failed: {reason}; closing it "
                  "and its {count} sessions", role=self.role, link=self.name,
                  reason=reason, count=len(self.streams))
        self.mux.stats["link_failures"] += 1
        self._alive = False
        codec, self.codec = self.codec, None
        streams, self.streams = self.streams, {}
        if codec is not None:
            self.mux.link_down(self)
        for session in streams.values():
            session.close_by_peer(abort=True)
        self.transport.abortConnection()

    # -- streams --------------------------------------------------------------

    def open_stream(self, session: FrameProtocol) -> int:
        """Open a new stream for ``session`` (tunnel client) and return its id."""
        assert self.codec is not None
        stream_id = self._next_id
        while stream_id in self.streams or stream_id == 0:
            stream_id = (stream_id + 1) & 0xFFFFFFFF
        self._next_id = (stream_id + 1) & 0xFFFFFFFF
        self.streams[stream_id] = session
        session.attached(self, stream_id)
        self.transport.writeSequence(self.codec.encode_open(stream_id))
        return stream_id

    def send_data(self, stream_id: int, frame: bytes) -> None:
        """Send one TB frame of ``stream_id`` to the peer.

        :raises FrameError: the frame cannot be encrypted (padding); the
            caller closes its session, the pool connection is unaffected.
        """
        if self.codec is None:
            return
        chunks = self.codec.encode_data(stream_id, frame)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) < COALESCE_BELOW:
            # Small frames of many sessions share the pool connection: let
            # Twisted gather what this reactor turn produces into one send.
            self.transport.write(bytes(data))
        else:
            send_now(self.transport, data)

    def end_stream(self, stream_id: int, session: FrameProtocol) -> None:
        """The TB side of ``stream_id`` closed: tell the peer and forget it."""
        if self.streams.get(stream_id) is not session:
            return
        del self.streams[stream_id]
        if self.codec is not None and self._alive and self.codec.can_send_close:
            self.transport.writeSequence(self.codec.encode_close(stream_id))

    def _peer_opened(self, stream_id: int) -> None:
        if stream_id in self.streams:
            # Our client never reuses an open id; stream_open is not
            # authenticated, so this is tampering or a broken peer.
            self._fail(f"stream_open for stream {stream_id}, which is open")
            return
        if self.mux.open_backend(self, stream_id) is None:
            if self.codec is not None and self.codec.can_send_close:
                self.transport.writeSequence(self.codec.encode_close(stream_id))


class TunnelFactory(Factory):
    """Builds :class:`TunnelProtocol` pool connections for a proxy pair."""

    noisy = False

    def __init__(self, mux: "SessionMultiplexer",
                 make_handshake: Callable[[], Union[ClientHandshake,
                                                    ServerHandshake, None]]) -> None:
        self.mux = mux
        self.make_handshake = make_handshake
        self._count = 0

    def buildProtocol(self, addr: Any) -> TunnelProtocol:
        self._count += 1
        host = getattr(addr, "host", "?")
        port = getattr(addr, "port", "?")
        name = f"{self.mux.name}/{self._count}@{host}:{port}"
        return TunnelProtocol(self.mux.role, self.make_handshake(), self.mux,
                              name)
