"""TunnelProtocol: one pool connection, at either end (PROTOCOL.md sections 3-7).

After connectionMade the pool connection runs its handshake (client: send
the ClientHello, wait for the ServerHello; server: the reverse), under the
handshake deadline. Once established, received bytes go through the
:class:`~tigertunnel.wire.codec.PoolCodec` and become stream events:

* ``stream_open`` (server): a sealed one (version 2) opens the stream's
  backend connection at once; a bare one (the reference's, not
  authenticated) only records the stream id as *unproven*: the backend
  connection, the session and its ``-m`` slot are made when the stream's
  first data frame authenticates, and that frame is queued until the
  backend is connected. At most :data:`MAX_UNPROVEN_STREAMS` ids wait per
  pool connection; one more closes the pool connection. A stream_close for
  an unproven stream forgets it. (A TB peer always sends first on a new
  connection, so TB never notices the later connect; in plaintext mode
  nothing is authenticated and the backend is opened at once.)
* ``data``: the TB frame goes to the stream's :class:`FrameProtocol`;
* ``stream_close``: that session is closed;
* ``ping`` (version 2): answered with a ``pong``.

Between version-2 ends a :class:`~tigertunnel.net.heartbeat.Heartbeat`
watches the pool connection: a server sends its first ping with the
ServerHello and expects an answer within 5 s; a client starts watching at
the server's first ping. Silence is answered with pings, and 15 s without
an authenticated frame closes the pool connection and its sessions.

Anything that fails to authenticate or parse closes the pool connection and
every session on it at once; nothing after the bad bytes is delivered. When
this socket's write buffer fills, every session on it stops reading its TB
peer until it drains (:meth:`TunnelProtocol.pauseProducing`).

Lifecycle (:data:`~tigertunnel.net.states.POOL_TRANSITIONS`): ``NEW``
until connected, then ``HANDSHAKING`` (in plaintext mode only for an
instant), ``ESTABLISHED`` once streams may use it, ``DRAINING`` once a key
reload retired its key (it carries its streams, takes new ones only when no
other connection can, and is closed once idle or after a grace period:
:meth:`~tigertunnel.net.multiplexer.SessionMultiplexer.retire_outdated`),
``CLOSING`` while an established connection is
closed gracefully (its streams still flow until it is gone), ``DEAD`` when
the handshake failed or the connection failed or was closed before it was
established (nothing it receives is used any more), and ``CLOSED`` once
the connection is lost.

The streams on a pool connection live in its :class:`StreamTable`: the
client opens them (:meth:`TunnelProtocol.open_stream`), the server accepts
those the client opened (:meth:`TunnelProtocol.accept_stream`).
"""

from typing import Any, Callable, List, Optional, Set, Union, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tigertunnel.config.model import Role
from tigertunnel.errors import HandshakeError, TunnelError
from tigertunnel.interfaces import (
    BackendOpener,
    Clock,
    FrameEncoder,
    PoolHost,
    Session,
    StreamTransport,
)
from tigertunnel.logs import logger
from tigertunnel.net.frame_protocol import CLOSE_TIMEOUT
from tigertunnel.net.heartbeat import Heartbeat
from tigertunnel.net.sockets import direct_sender, not_connected as _not_connected, tune_socket
from tigertunnel.net.states import (
    POOL_TRANSITIONS,
    PoolInput,
    PoolState,
    TransitionError,
)
from tigertunnel.net.stats import HandshakeFailure
from tigertunnel.net.streams import StreamTable
from tigertunnel.wire.codec import (
    CLIENT,
    SERVER,
    PoolCodec,
    Ping,
    StreamClosed,
    StreamOpened,
)
from tigertunnel.wire.handshake import (
    Accepted,
    ClientHandshake,
    KeyUse,
    Rejected,
    ServerHandshake,
)
from tigertunnel.wire.liveness import FIRST_FRAME_WITHIN
from tigertunnel.wire.muxframes import FrameType

_DATA = int(FrameType.DATA)
#: Bare (unauthenticated) stream_opens a server holds per pool connection
#: until their first data frame; one more closes the pool connection. A
#: real client has a stream unproven only between a TB connect and the TB
#: peer's first frame (microseconds), so this covers a burst of TB
#: connects; closing (rather than dropping one silently) makes TB
#: reconnect instead of waiting on a stream that would never open.
MAX_UNPROVEN_STREAMS = 64

#: Bytes :meth:`TunnelProtocol.read_waiting` reads at most: a KEM
#: ClientHello and then some (the rest waits for the reactor).
WAITING_READ = 1 << 16

log = logger(__name__)

Handshake = Union[ClientHandshake, ServerHandshake]


# Module-level names for the per-event checks.
_ESTABLISHED = PoolState.ESTABLISHED
_DRAINING = PoolState.DRAINING
_CLOSING = PoolState.CLOSING
_HANDSHAKING = PoolState.HANDSHAKING


@implementer(IPushProducer)
class TunnelProtocol(Protocol):
    """One pool connection, at either end.

    :param role: which tunnel end this is.
    :param handshake: the handshake machine, or ``None`` in plaintext mode.
    :param host: the proxy pair's multiplexer.
    :param name: names the pool connection in logs.
    :param opener: tunnel server: opens the backend of each stream the
        client opens.
    """

    def __init__(self, role: Role, handshake: Optional[Handshake],
                 host: "PoolHost[TunnelProtocol]", name: str,
                 opener: "Optional[BackendOpener[TunnelProtocol]]" = None) -> None:
        self.role = Role.parse(role)
        self.host = host
        self.clock: Clock = host.clock
        #: The TCP transport to the other tunnel end, once connected.
        self._tcp: Optional[StreamTransport] = None
        #: Writes to ``_tcp`` in this reactor turn (set once connected).
        self._send: Callable[["bytes | bytearray"], None] = _not_connected
        self.name = name
        self.state = PoolState.NEW
        self._handshake = handshake
        self._opener = opener
        self.codec: Optional[PoolCodec] = None
        #: Whether this pool connection encrypts (a key was configured).
        self.encrypted = False
        #: The streams on this pool connection.
        self.streams = StreamTable()
        #: Whether our socket to the peer is full (sessions stop reading).
        self.paused = False
        self._outcome: Union["TunnelProtocol", Failure, None] = None
        self._waiters: List[Deferred["TunnelProtocol"]] = []
        self._timer: Optional[IDelayedCall] = None
        #: Which keys the handshake used (key reload compares it with the
        #: live keys); ``None`` before it completed and in plaintext mode.
        self.key_use: Optional[KeyUse] = None
        self.peer_version: Optional[int] = None
        #: The peer's address (tunnel server: fair admission by source).
        self.peer_host: Optional[str] = None
        #: Tunnel server: stream ids opened by a bare stream_open whose first
        #: authenticated frame has not arrived yet.
        self.unproven: Set[int] = set()
        #: Version 2: the liveness timer, while it runs.
        self.heartbeat: Optional[Heartbeat] = None
        #: Called once the connection is lost (a pool slot reconnects).
        self.on_lost: Optional[Callable[["TunnelProtocol"], None]] = None
        self._close_timer: Optional[IDelayedCall] = None

    def _goto(self, event: PoolInput) -> PoolState:
        """Make the move ``event`` and return the state it leaves."""
        before = self.state
        self.state = POOL_TRANSITIONS(before, event)
        return before

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
    def established(self) -> bool:
        """Whether the handshake is done and streams may use this pool
        connection (also while it drains or closes gracefully)."""
        state = self.state
        return state is _ESTABLISHED or state is _DRAINING or state is _CLOSING

    @property
    def key_id(self) -> Optional[int]:
        """The PSK key id of the handshake (``None``: none yet, or plaintext)."""
        return None if self.key_use is None else self.key_use.psk_id

    def retire(self) -> None:
        """A key reload retired this connection's key: it drains
        (``DRAINING``); the multiplexer closes it once it may."""
        if self.state is _ESTABLISHED:
            self._goto(PoolInput.RETIRE)

    def renew(self) -> None:
        """A later reload made this draining connection's key current again."""
        if self.state is _DRAINING:
            self._goto(PoolInput.RENEW)

    # -- Twisted's interface -----------------------------------------------

    def connectionMade(self) -> None:
        self._goto(PoolInput.CONNECT)
        tcp = self._tcp = cast(StreamTransport, self.transport)
        tune_socket(tcp)
        self._send = direct_sender(tcp)
        tcp.registerProducer(self, True)
        handshake = self._handshake
        if handshake is None:
            self._established(PoolCodec(self.role, None), b"")
            return
        self._timer = self.clock.callLater(self.host.handshake_timeout,
                                           self._handshake_timed_out)
        self.host.handshake_started(self)
        if isinstance(handshake, ClientHandshake):
            tcp.write(handshake.start())

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state is _HANDSHAKING:
            self._handshake_data(data)
            return
        codec = self.codec
        if codec is None or (state is not _ESTABLISHED and state is not _DRAINING
                             and state is not _CLOSING):
            return  # dead: nothing after a failure is used
        try:
            items = codec.receive(data)
        except TunnelError as e:
            self._fail(f"{type(e).__name__}: {e}")
            return
        lookup = self.streams.lookup
        for stream_id, frame_type, payload in items:
            if frame_type == _DATA:
                session = lookup(stream_id)
                if session is not None:
                    session.deliver(payload)
                elif self.unproven:
                    self._stream_proven(stream_id, payload)
                state = self.state
                if state is not _ESTABLISHED and state is not _DRAINING \
                        and state is not _CLOSING:
                    return
                continue
            try:
                event = codec.event(stream_id, frame_type, payload)
            except TunnelError as e:
                self._fail(f"{type(e).__name__}: {e}")
                return
            if isinstance(event, StreamOpened):
                self._peer_opened(event.stream_id, event.sealed)
            elif isinstance(event, StreamClosed):
                closed = self.streams.remove(event.stream_id)
                if closed is not None:
                    closed.close_by_peer()
                else:
                    self.unproven.discard(event.stream_id)
            elif isinstance(event, Ping):
                self._ping_received(event.value)
            elif self.heartbeat is None:
                self._start_heartbeat(None)  # a pong: the peer speaks version 2
            state = self.state
            if state is not _ESTABLISHED and state is not _DRAINING \
                    and state is not _CLOSING:
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        before = self._goto(PoolInput.LOSE)
        self._cancel_timer()
        self._stop_heartbeat()
        self.unproven.clear()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self.host.handshake_ended(self)
        streams = self.streams.drain()
        if before is _ESTABLISHED or before is _DRAINING or before is _CLOSING:
            self.codec = None
            log.info("{role} pool connection {pool_connection} lost ({reason}); closing "
                     "{count} sessions", role=self.role, pool_connection=self.name,
                     reason=reason.getErrorMessage(), count=len(streams))
            self.host.pool_connection_down(self)
        elif self._outcome is None:
            self._settle(Failure(HandshakeError(
                f"connection lost during handshake: {reason.getErrorMessage()}")))
        for session in streams:
            session.close_by_peer(abort=True)
        if self.on_lost is not None:
            self.on_lost(self)

    # -- IPushProducer: our socket to the peer tunnel end -------------------

    def pauseProducing(self) -> None:
        self.paused = True
        for session in self.streams:
            session.pause_reading()

    def resumeProducing(self) -> None:
        self.paused = False
        for session in self.streams:
            session.resume_reading()

    def stopProducing(self) -> None:
        pass

    # -- handshake ----------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        self.host.handshake_progress(self, len(data))
        hs = self._handshake
        try:
            if isinstance(hs, ClientHandshake):
                est = hs.feed(data)
                if est is None:
                    return
                self.key_use = est.key_use
                self._established(
                    PoolCodec(CLIENT, est.keys, self.host.cluster_value),
                    est.leftover)
                return
            if hs is None:
                return
            result = hs.feed(data)
        except HandshakeError as e:
            self.host.handshake_failed(self, str(e),
                                       HandshakeFailure.refused(e.status))
            self._fail_handshake(e)
            return
        if result is None:
            return
        if isinstance(result, Rejected):
            self.host.handshake_failed(self, result.reason,
                                       HandshakeFailure.rejected(result.kind),
                                       result.skew)
            if result.reply:
                self._output().write(result.reply)
            self._fail_handshake(HandshakeError(result.reason, result.status))
            return
        assert isinstance(result, Accepted)
        est = result.established
        self.key_use = est.key_use
        self.peer_version = est.peer_version
        codec = PoolCodec(SERVER, est.keys, self.host.cluster_value,
                          peer_extended=est.peer_version >= 2)
        reply = result.reply
        if codec.can_ping:
            # Version 2: the first ping goes in the same write as the
            # ServerHello; the client's answer proves it holds the keys.
            reply += b"".join(codec.encode_ping())
        self._output().write(reply)
        self._established(codec, est.leftover)

    def _established(self, codec: PoolCodec, leftover: bytes) -> None:
        self._goto(PoolInput.ESTABLISH)
        self._cancel_timer()
        self.host.handshake_ended(self)
        self._handshake = None
        self.codec = codec
        self.encrypted = codec.encrypted
        self.host.pool_connection_up(self)
        if self.role is Role.SERVER and codec.can_ping and self.established:
            self._start_heartbeat(FIRST_FRAME_WITHIN)
        if self._outcome is None:
            self._settle(self)
        if leftover and self.established:
            self.dataReceived(leftover)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self.host.handshake_failed(self, "handshake timed out",
                                   HandshakeFailure.TIMEOUT)
        self._fail_handshake(HandshakeError("handshake timed out"))

    def _fail_handshake(self, error: HandshakeError) -> None:
        """The handshake failed: settle ``ready`` and close (gracefully, so
        that a rejection's status byte is still sent)."""
        before = self._goto(PoolInput.FAIL)
        self._cancel_timer()
        self._handshake = None
        # No longer pending, even while its close drains: admission counts
        # only handshakes still under way.
        self.host.handshake_ended(self)
        if self._outcome is None:
            self._settle(Failure(error))
        if before is _HANDSHAKING:
            self._close_transport(CLOSE_TIMEOUT)

    def close_gracefully(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close this pool connection after what is queued has been sent.

        An established connection keeps carrying its streams until it is
        gone; one still in its handshake is dropped. Aborts the connection
        if the peer has not taken the queued bytes within ``timeout``
        seconds.
        """
        before = self._goto(PoolInput.CLOSE)
        if before is _HANDSHAKING:
            self._cancel_timer()
            self._handshake = None
        if before is _ESTABLISHED or before is _DRAINING or before is _HANDSHAKING:
            self._close_transport(timeout)

    def _output(self) -> StreamTransport:
        """The transport, which exists in every state but ``NEW``."""
        tcp = self._tcp
        if tcp is None:
            raise TransitionError(f"pool connection {self.name}: no "
                                  f"transport in state {self.state.name}")
        return tcp

    def _close_transport(self, timeout: float) -> None:
        tcp = self._output()
        # Unregister this producer first: Twisted does not finish a
        # loseConnection whose buffer drains while its producer is paused.
        tcp.unregisterProducer()
        tcp.loseConnection()
        if self._close_timer is None:
            self._close_timer = self.clock.callLater(timeout, tcp.abortConnection)

    def abort(self) -> None:
        """Close at once, dropping what is queued (a shutdown that timed out)."""
        if self._tcp is not None:
            self._tcp.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def read_waiting(self) -> bool:
        """Handle now what the peer sent during the handshake that the
        reactor has not read yet (the kernel holds it).

        Reads what is waiting on the socket once, without blocking, and
        feeds it to :meth:`dataReceived`, in order before anything the
        reactor reads later. Admission calls it before evicting this
        connection, so that a hello that has arrived is handled rather
        than dropped unread.

        :returns: whether bytes were read (``False`` for a transport
            without a socket, outside the handshake, with nothing waiting,
            at end of file or on a socket error: the reactor sees those).
        """
        if self.state is not _HANDSHAKING:
            return False
        sock = getattr(self._tcp, "socket", None)
        if sock is None:
            return False
        try:
            data = sock.recv(WAITING_READ)
        except OSError:  # nothing waiting (EAGAIN) or an error
            return False
        if not data:
            return False
        self.dataReceived(data)
        return True

    def evict(self) -> None:
        """Drop this connection before its handshake finished (too many pending)."""
        self._fail_handshake(HandshakeError("evicted: too many pending handshakes"))
        self.abort()

    def _fail(self, reason: str) -> None:
        """The established connection failed: abort it and its sessions."""
        log.error("{role} pool connection {pool_connection} failed: {reason}; closing it "
                  "and its {count} sessions", role=self.role, pool_connection=self.name,
                  reason=reason, count=len(self.streams))
        self.host.stats.pool_failures += 1
        self._drop()

    def _drop(self) -> None:
        """Abort the established connection and every session on it."""
        self._goto(PoolInput.FAIL)
        self.codec = None
        self._stop_heartbeat()
        self.unproven.clear()
        streams = self.streams.drain()
        self.host.pool_connection_down(self)
        for session in streams:
            session.close_by_peer(abort=True)
        self.abort()

    # -- streams --------------------------------------------------------------

    def open_stream(self, session: Session) -> int:
        """Open a new stream for ``session`` (tunnel client) and return its id."""
        codec = self.codec
        if codec is None:
            raise TransitionError(f"pool connection {self.name}: cannot open "
                                  f"a stream in state {self.state.name}")
        stream_id = self.streams.open(session)
        session.attached(self, stream_id)
        self._output().writeSequence(codec.encode_open(stream_id))
        return stream_id

    def accept_stream(self, stream_id: int, session: Session) -> None:
        """Record ``session`` for the stream ``stream_id`` the client opened
        (tunnel server)."""
        self.streams.attach(stream_id, session)
        session.attached(self, stream_id)

    def send_data(self, stream_id: int, frame: bytes) -> None:
        """Send one TB frame of ``stream_id`` to the peer.

        :raises FrameError: the frame cannot be encrypted (padding); the
            caller closes its session, the pool connection is unaffected.
        """
        codec = self.codec
        tcp = self._tcp
        if codec is None or tcp is None:
            return
        chunks = codec.encode_data(stream_id, frame)
        self._send(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def frame_encoder(self, stream_id: int, check: bool, cluster_id: Optional[int],
                      watch: "Optional[Callable[[bytes], object]]") -> FrameEncoder:
        """An encoder for the session on ``stream_id`` (see :meth:`send_wire`).

        :raises TransitionError: there is no established codec.
        """
        codec = self.codec
        if codec is None:
            raise TransitionError(f"pool connection {self.name}: no data path "
                                  f"in state {self.state.name}")
        return codec.frame_encoder(stream_id, check, cluster_id, watch)

    def send_wire(self, data: "bytes | bytearray") -> None:
        """Write a session encoder's output in this reactor turn (queued
        behind anything Twisted still holds, so in counter order)."""
        if self._tcp is not None and self.codec is not None:
            self._send(data)

    def end_stream(self, stream_id: int, session: Session) -> None:
        """The TB side of ``stream_id`` closed: tell the peer and forget it."""
        if self.streams.remove(stream_id, session) is None:
            return
        codec = self.codec
        if codec is not None and codec.can_send_close:
            self._output().writeSequence(codec.encode_close(stream_id))

    def _peer_opened(self, stream_id: int, sealed: bool) -> None:
        if stream_id in self.streams or stream_id in self.unproven:
            # Our client never reuses an open id; a bare stream_open is not
            # authenticated, so this is tampering or a broken peer.
            self._fail(f"stream_open for stream {stream_id}, which is open")
            return
        if self._opener is None:
            self._fail(f"stream_open for stream {stream_id} on a pool "
                       f"connection that opens no backends")
            return
        if sealed or not self.encrypted:
            self._open_backend(stream_id)
            return
        # A bare stream_open proves nothing: wait for the stream's first
        # authenticated frame before spending a backend connection on it.
        if len(self.unproven) >= MAX_UNPROVEN_STREAMS:
            self._fail(f"more than {MAX_UNPROVEN_STREAMS} streams opened "
                       f"without a data frame")
            return
        self.unproven.add(stream_id)

    def _stream_proven(self, stream_id: int, frame: "bytes | bytearray") -> None:
        """An authenticated data frame arrived for a stream that is not open."""
        unproven = self.unproven
        if stream_id not in unproven:
            return  # a stream closed or refused since: dropped, as before
        unproven.discard(stream_id)
        session = self._open_backend(stream_id)
        if session is not None:
            session.deliver(frame)  # queued until the backend is connected

    def _open_backend(self, stream_id: int) -> Optional[Session]:
        """Open the backend of ``stream_id``; tell a version-2 client if refused."""
        assert self._opener is not None  # checked by _peer_opened
        session = self._opener.open_backend(self, stream_id)
        if session is None:
            codec = self.codec
            if codec is not None and codec.can_send_close:
                self._output().writeSequence(codec.encode_close(stream_id))
        return session

    # -- heartbeat (version 2) -------------------------------------------------

    def _ping_received(self, value: int) -> None:
        codec = self.codec
        if codec is None:
            return
        if self.heartbeat is None:
            self._start_heartbeat(None)  # a client hears its server's first ping
        self._output().writeSequence(codec.encode_pong(value))

    def _start_heartbeat(self, first_frame_within: Optional[float]) -> None:
        codec = self.codec
        if codec is None or not codec.can_ping:
            return
        self.heartbeat = Heartbeat(self.clock, lambda: codec.receive_counter,
                                   self._send_ping, self._peer_silent,
                                   first_frame_within)
        if first_frame_within is not None:
            self.heartbeat.ping_sent()

    def _stop_heartbeat(self) -> None:
        heartbeat, self.heartbeat = self.heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()

    def _send_ping(self) -> None:
        codec, tcp = self.codec, self._tcp
        if codec is not None and tcp is not None:
            tcp.writeSequence(codec.encode_ping())

    def _peer_silent(self, silence: float) -> None:
        """No authenticated frame for too long: the peer is frozen or gone."""
        log.warn("{role} pool connection {pool_connection}: no frame from the peer for "
                 "{silence:.0f} s (heartbeat); closing it and its {count} "
                 "sessions", role=self.role, pool_connection=self.name, silence=silence,
                 count=len(self.streams))
        self.host.stats.pool_timeouts += 1
        self._drop()


class TunnelFactory(Factory):
    """Builds the server's :class:`TunnelProtocol` pool connections of a pair.

    :param host: the pair's multiplexer.
    :param make_handshake: a new handshake machine per connection (``None``
        in plaintext mode).
    :param opener: opens the backends of the streams.
    :param pair_name: prefixes the connections' names in logs.
    """

    noisy = False

    def __init__(self, host: "PoolHost[TunnelProtocol]",
                 make_handshake: Callable[[], Optional[Handshake]],
                 opener: "BackendOpener[TunnelProtocol]", pair_name: str) -> None:
        self.host = host
        self.make_handshake = make_handshake
        self.opener = opener
        self.pair_name = pair_name
        self._count = 0

    def buildProtocol(self, addr: Any) -> TunnelProtocol:
        self._count += 1
        host = getattr(addr, "host", "?")
        port = getattr(addr, "port", "?")
        name = f"{self.pair_name}/{self._count}@{host}:{port}"
        connection = TunnelProtocol(self.host.role, self.make_handshake(),
                                    self.host, name, self.opener)
        connection.peer_host = host if isinstance(host, str) else None
        return connection
