"""FrameProtocol: the TigerBeetle side of a tunnel end.

Two kinds of connection meet in a tunnel end:

* :class:`FrameProtocol` speaks plain TigerBeetle: on the tunnel client it is a
  TB client's connection accepted on the listening port; on the tunnel server
  it is the connection to the backend (the replica), one per stream. It cuts
  the byte stream into TB frames and hands each complete frame to its pool
  connection at once, and writes the frames the pool connection delivers.
  There is no request/response pairing: frames flow both ways independently.
* :class:`~tigertunnel.net.tunnel_protocol.TunnelProtocol` (in :mod:`tigertunnel.net.tunnel_protocol`)
  is one pool connection: handshake, then the mux codec
  (:mod:`tigertunnel.wire.codec`). It owns the table of the streams that live on it.

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

from typing import TYPE_CHECKING, Any, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tigertunnel.errors import ClusterMismatchError, FrameError
from tigertunnel.wire.frames import FrameParser, check_frame
from tigertunnel.logs import logger
from tigertunnel.net.sockets import send_now, tune_socket

if TYPE_CHECKING:  # pragma: no cover
    from tigertunnel.net.multiplexer import SessionMultiplexer
    from tigertunnel.net.tunnel_protocol import TunnelProtocol

#: Bytes a session may have queued towards a TB peer that is not reading
#: (beyond the socket buffers) before the session is closed.
SESSION_BUFFER_LIMIT = 8 * 1024 * 1024
#: Seconds a closing session (or pool connection) waits for its peer to read
#: what is queued before the connection is aborted.
CLOSE_TIMEOUT = 10.0

log = logger("tigertunnel.protocols")


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
