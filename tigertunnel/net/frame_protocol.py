"""FrameProtocol: the TigerBeetle side of a tunnel end.

Two kinds of connection meet in a tunnel end:

* :class:`FrameProtocol` speaks plain TigerBeetle: on the tunnel client it is a
  TB client's connection accepted on the listening port; on the tunnel server
  it is the connection to the backend (the replica), one per stream. It cuts
  the byte stream into TB frames and hands each complete frame to its pool
  connection at once, and writes the frames the pool connection delivers.
  There is no request/response pairing: frames flow both ways independently.
* :class:`~tigertunnel.net.tunnel_protocol.TunnelProtocol` is one pool
  connection: handshake, then the mux codec (:mod:`tigertunnel.wire.codec`).
  It owns the table of the streams that live on it.

A session sees its pool connection and its multiplexer only through the
protocols of :mod:`tigertunnel.interfaces`.

Lifecycle (:data:`SESSION_TRANSITIONS`). A TB client's session on the
tunnel client starts ``UNPLACED``: once connected it asks its placer for a
pool connection (``PLACING``) and is ``OPEN`` once its stream is open, or
``CLOSING`` if it was refused. A backend session on the tunnel server
starts ``NEW``, is attached to the stream the client opened
(``CONNECTING``: frames for it are queued) and is ``OPEN`` once its backend
connection is made. ``CLOSING`` waits for the TB side to go; ``CLOSED`` is
final.

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

import enum
from typing import Any, Callable, List, Optional, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tigertunnel.errors import ClusterMismatchError, FrameError, TunnelError
from tigertunnel.interfaces import (
    Clock,
    FrameEncoder,
    PoolConnection,
    SessionHost,
    SessionPlacer,
    StreamTransport,
)
from tigertunnel.logs import logger
from tigertunnel.wire.tbwatch import FROM_TUNNEL, TO_TUNNEL
from tigertunnel.net.sockets import direct_sender, not_connected as _not_connected, tune_socket
from tigertunnel.net.states import Transitions
from tigertunnel.wire.muxframes import MUX_HEADER_SIZE

#: Bytes a session may have queued towards a TB peer that is not reading
#: (beyond the socket buffers) before the session is closed.
SESSION_BUFFER_LIMIT = 8 * 1024 * 1024
#: Seconds a closing session (or pool connection) waits for its peer to read
#: what is queued before the connection is aborted.
CLOSE_TIMEOUT = 10.0

log = logger(__name__)


class SessionState(enum.Enum):
    """Where a session is in its life (see the module docstring)."""

    #: Tunnel server: built for a stream, not attached yet.
    NEW = "new"
    #: Tunnel client: a TB client's connection, not on a stream yet.
    UNPLACED = "unplaced"
    #: Tunnel client: connected, being placed on a pool connection.
    PLACING = "placing"
    #: Attached to its stream; its TB-side connection is being made.
    CONNECTING = "connecting"
    #: Attached and connected: frames flow both ways.
    OPEN = "open"
    #: Closed (by either side); waiting for the TB-side connection to go.
    CLOSING = "closing"
    #: The TB-side connection is gone, or was never made.
    CLOSED = "closed"


class SessionInput(enum.Enum):
    """What happens to a session."""

    #: Bound to a stream of a pool connection.
    ATTACH = "attach"
    #: The TB-side connection was made (connectionMade).
    CONNECT = "connect"
    #: The backend connection could not be made (or was cancelled).
    CONNECT_FAILED = "connect_failed"
    #: Closed by us, by the other tunnel end or by a lost pool connection.
    CLOSE = "close"
    #: The TB-side connection is gone (connectionLost).
    LOSE = "lose"


_S, _I = SessionState, SessionInput

#: Every move a session may make; anything else is a TransitionError.
SESSION_TRANSITIONS: Transitions[SessionState, SessionInput] = Transitions("session", {
    _S.NEW: {_I.ATTACH: _S.CONNECTING},
    _S.UNPLACED: {_I.CONNECT: _S.PLACING, _I.ATTACH: _S.CONNECTING},
    _S.PLACING: {_I.ATTACH: _S.OPEN, _I.CLOSE: _S.CLOSING},
    _S.CONNECTING: {_I.CONNECT: _S.OPEN, _I.CONNECT_FAILED: _S.CLOSED,
                    _I.CLOSE: _S.CLOSING},
    _S.OPEN: {_I.CLOSE: _S.CLOSING, _I.LOSE: _S.CLOSED},
    # A connect that completes while closing is closed at once; a cancelled
    # connect reports its failure.
    _S.CLOSING: {_I.CLOSE: _S.CLOSING, _I.CONNECT: _S.CLOSING,
                 _I.CONNECT_FAILED: _S.CLOSED, _I.LOSE: _S.CLOSED},
    _S.CLOSED: {_I.CLOSE: _S.CLOSED},
})

# Module-level names for the per-frame checks.
_OPEN = SessionState.OPEN
_CONNECTING = SessionState.CONNECTING


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

    :param host: the proxy pair's multiplexer.
    :param cluster_id: the configured cluster id, or ``None``; frames from
        the TB peer are checked against it when ``check_cluster`` is true.
    :param placer: tunnel client: places the session on a pool connection
        once its TB client is connected. Without one the session must be
        attached to a stream before it connects (tunnel server).
    """

    #: The pool connection of the session's stream, while attached.
    pool_connection: Optional[PoolConnection] = None
    stream_id: int = -1

    def __init__(self, host: "SessionHost[FrameProtocol]", cluster_id: Optional[int],
                 check_cluster: bool,
                 placer: "Optional[SessionPlacer[FrameProtocol]]" = None) -> None:
        self.host = host
        self.clock: Clock = host.clock
        #: The TB-side TCP transport, once connected.
        self._tcp: Optional[StreamTransport] = None
        #: Writes to ``_tcp`` in this reactor turn (set once connected).
        self._send: Callable[["bytes | bytearray"], None] = _not_connected
        self._placer = placer
        self.state = SessionState.UNPLACED if placer is not None else SessionState.NEW
        self._cluster_id = cluster_id
        self._check_cluster = check_cluster
        #: Cuts, checks and seals what the TB peer sends, once attached.
        self._encoder: Optional[FrameEncoder] = None
        self._pending: List[bytes] = []  # frames queued before connectionMade
        self._pending_bytes = 0
        self._slow = False
        self._unread = 0
        self._reading_paused = False
        self._close_timer: Optional[IDelayedCall] = None
        #: The backend connection attempt (tunnel server), while under way.
        self.connecting: Optional[Deferred[Any]] = None
        self.stats = host.stats

    def _goto(self, event: SessionInput) -> SessionState:
        """Make the move ``event`` and return the state it leaves."""
        before = self.state
        self.state = SESSION_TRANSITIONS(before, event)
        return before

    # -- Twisted's interface -----------------------------------------------

    def connectionMade(self) -> None:
        self._goto(SessionInput.CONNECT)
        tcp = self._tcp = cast(StreamTransport, self.transport)
        tune_socket(tcp)
        self._send = direct_sender(tcp)
        tcp.registerProducer(_WriteWatcher(self), True)
        if self.state is SessionState.CLOSING:
            tcp.loseConnection()
            return
        if self.state is SessionState.PLACING:
            # A TB client on the tunnel client: find it a pool connection.
            placer = self._placer
            if placer is None or not placer.attach(self):
                self._goto(SessionInput.CLOSE)
                tcp.loseConnection()
                return
            if self.state is not _OPEN:
                return  # its pool connection failed while opening the stream
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        if pending:
            tcp.writeSequence(pending)
        connection = self.pool_connection
        if connection is not None and connection.paused:
            self.pause_reading()

    def dataReceived(self, data: bytes) -> None:
        connection = self.pool_connection
        encoder = self._encoder
        if self.state is not _OPEN or connection is None or encoder is None:
            return
        try:
            # One call cuts, checks, shows to the TB watch, frames and seals
            # every TB frame this read completed.
            wire = encoder.encode(data)
        except ClusterMismatchError as e:
            watch = self.host.tb_watch
            if watch is not None:
                watch.cluster_mismatch(e.expected, e.got)
            if self._cluster_id is None:
                log.warn("{side} session {stream} on {pool_connection} closed: frame has "
                         "cluster {got} but no -c is configured; start both "
                         "tunnel ends with -c {got}", side=self.host.role,
                         stream=self.stream_id, pool_connection=connection.name, got=e.got)
            else:
                log.warn("{side} session {stream} on {pool_connection} closed: frame "
                         "cluster {got} is not the configured -c {expected}",
                         side=self.host.role, stream=self.stream_id,
                         pool_connection=connection.name, got=e.got, expected=e.expected)
            self.close()
        except FrameError as e:
            log.warn("{side} session {stream} on {pool_connection} closed: bad TB frame "
                     "({reason})", side=self.host.role, stream=self.stream_id,
                     pool_connection=connection.name, reason=str(e))
            self.close()
        except TunnelError as e:
            log.warn("{side} session {stream} on {pool_connection} closed: {reason}",
                     side=self.host.role, stream=self.stream_id,
                     pool_connection=connection.name, reason=str(e))
            self.close()
        else:
            if wire:
                frames = encoder.last_frames
                stats = self.stats
                stats.frames_to_tunnel += frames
                stats.bytes_to_tunnel += len(wire) - MUX_HEADER_SIZE * frames
                connection.send_wire(wire)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._goto(SessionInput.LOSE)
        self._cancel_close_timer()
        connection, self.pool_connection = self.pool_connection, None
        if connection is not None:
            connection.end_stream(self.stream_id, self)
        self._release()
        self.host.session_ended(self)

    # -- called by the pool connection -------------------------------------

    def attached(self, connection: PoolConnection, stream_id: int) -> None:
        """Bind this session to ``stream_id`` on pool connection ``connection``."""
        self._goto(SessionInput.ATTACH)
        self.pool_connection = connection
        self.stream_id = stream_id
        self._encoder = connection.frame_encoder(
            stream_id, self._check_cluster or connection.encrypted, self._cluster_id,
            self._watch_sent if self.host.tb_watch is not None else None)

    def _watch_sent(self, header: bytes) -> None:
        """Show the TB watch a frame the TB peer sent (the encoder calls this)."""
        watch = self.host.tb_watch
        if watch is not None:
            watch.frame(TO_TUNNEL, header, self.clock.seconds())

    def deliver(self, frame: "bytes | bytearray") -> None:
        """Write one TB frame that arrived for this stream to the TB peer."""
        state = self.state
        if state is not _OPEN and state is not _CONNECTING:
            return
        stats = self.stats
        stats.frames_from_tunnel += 1
        stats.bytes_from_tunnel += len(frame)
        watch = self.host.tb_watch
        if watch is not None:
            watch.frame(FROM_TUNNEL, frame, self.clock.seconds())
        if state is _CONNECTING:
            self._pending.append(bytes(frame))
            self._pending_bytes += len(frame)
            if self._pending_bytes > SESSION_BUFFER_LIMIT:
                self._overflow()
            return
        self._send(frame)
        if self._slow:
            self._unread += len(frame)
            if self._unread > SESSION_BUFFER_LIMIT:
                self._overflow()

    def close_by_peer(self, abort: bool = False) -> None:
        """The other end closed this stream (or its pool connection died).

        Queued frames are still written unless ``abort``; a TB peer that does
        not read them within :data:`CLOSE_TIMEOUT` is cut off.
        """
        self.pool_connection = None
        self.close(abort)

    def close(self, abort: bool = False) -> None:
        """Close this session's TB connection (or cancel its connect)."""
        before = self._goto(SessionInput.CLOSE)
        if before is _CONNECTING:
            if self.connecting is not None:
                self.connecting.cancel()
            return
        tcp = self._tcp
        if before is SessionState.CLOSED or tcp is None:
            return
        if abort:
            tcp.abortConnection()
            return
        if before is SessionState.CLOSING:
            return
        # Unregister our write watcher first: Twisted does not finish a
        # loseConnection whose buffer drains while a producer is paused.
        tcp.unregisterProducer()
        tcp.loseConnection()
        if self._close_timer is None:
            self._close_timer = self.clock.callLater(CLOSE_TIMEOUT,
                                                     tcp.abortConnection)

    def connect_failed(self, reason: Failure) -> None:
        """The backend connection of this stream could not be made."""
        before = self._goto(SessionInput.CONNECT_FAILED)
        connection, self.pool_connection = self.pool_connection, None
        if before is _CONNECTING:
            self.stats.backend_connect_failures += 1
            if "Too many open files" in reason.getErrorMessage():
                self.host.limit_log("server {pair}: out of file descriptors; "
                                    "refusing streams (raise ulimit -n or "
                                    "lower -m)", pair=self.host.pair_name)
            else:
                log.warn("server session {stream}: backend {backend} refused:"
                         " {reason}", stream=self.stream_id,
                         backend=self.host.backend_name,
                         reason=reason.getErrorMessage())
        if connection is not None:
            connection.end_stream(self.stream_id, self)
        self._release()
        self.host.session_ended(self)

    def _release(self) -> None:
        """Drop what the session holds once it has ended: its encoder (with
        any partial TB frame, and the watch callback that refers back to
        this session), queued frames, the TB-side transport and its sender."""
        self._encoder = None
        self._pending = []
        self._pending_bytes = 0
        self._tcp = None
        self._send = _not_connected
        self._placer = None
        self.connecting = None

    def pause_reading(self) -> None:
        """Stop reading the TB peer (its pool connection's socket is full)."""
        if self._tcp is not None and not self._reading_paused:
            self._reading_paused = True
            self._tcp.pauseProducing()

    def resume_reading(self) -> None:
        """Read the TB peer again."""
        if self._tcp is not None and self._reading_paused:
            self._reading_paused = False
            self._tcp.resumeProducing()

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

    def _cancel_close_timer(self) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None

    def _overflow(self) -> None:
        self.stats.sessions_overflowed += 1
        log.warn("{side} session {stream}: TB peer is not reading; more than "
                 "{limit} bytes queued, closing the session",
                 side=self.host.role, stream=self.stream_id,
                 limit=SESSION_BUFFER_LIMIT)
        self.close(abort=True)


class FrameFactory(Factory):
    """Builds :class:`FrameProtocol` for a proxy pair's TB listener.

    :param new_session: builds the session of an accepted TB connection.
    """

    noisy = False

    def __init__(self, new_session: "Callable[[], FrameProtocol]") -> None:
        self.new_session = new_session

    def buildProtocol(self, addr: Any) -> FrameProtocol:
        return self.new_session()


class PrebuiltFactory(Factory):
    """Hands out one already-built protocol (a backend connection's session,
    a pool slot's pool connection)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol
