"""TunnelProtocol: one pool connection, at either end (PROTOCOL.md sections 3-7).

After connectionMade the pool connection runs its handshake (client: send
the ClientHello, wait for the ServerHello; server: the reverse), under the
handshake deadline. Once established, received bytes go through the
:class:`~tigertunnel.wire.codec.LinkCodec` and become stream events:

* ``stream_open`` (server): the multiplexer opens a backend connection;
* ``data``: the TB frame goes to the stream's :class:`FrameProtocol`;
* ``stream_close``: that session is closed.

Anything that fails to authenticate or parse closes the pool connection and
every session on it at once; nothing after the bad bytes is delivered. When
this socket's write buffer fills, every session on it stops reading its TB
peer until it drains (:meth:`TunnelProtocol.pauseProducing`).
"""

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tigertunnel.errors import HandshakeError, TunnelError
from tigertunnel.wire.handshake import (
    Accepted,
    ClientHandshake,
    Rejected,
    ServerHandshake,
    Status,
)
from tigertunnel.logs import logger
from tigertunnel.wire.codec import (
    CLIENT,
    SERVER,
    LinkCodec,
    StreamClosed,
    StreamData,
    StreamOpened,
)
from tigertunnel.net.frame_protocol import CLOSE_TIMEOUT, FrameProtocol
from tigertunnel.net.sockets import send_now, tune_socket

if TYPE_CHECKING:  # pragma: no cover
    from tigertunnel.net.multiplexer import SessionMultiplexer

#: Pool-connection writes smaller than this go through Twisted's buffer, so
#: that the frames of many sessions leave in one send per reactor turn;
#: larger ones are sent at once (see send_now), saving Twisted's copy.
COALESCE_BELOW = 64 * 1024

log = logger("tigertunnel.tunnel")


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
