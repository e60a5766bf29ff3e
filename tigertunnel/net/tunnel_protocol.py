"""TunnelProtocol: what a pool connection does at either end (docs/protocol.rst §§3-7).

Each role has its own protocol over this shared base:
:class:`~tigertunnel.net.pool_client.ClientPoolProtocol` (sends the
ClientHello, opens streams) and
:class:`~tigertunnel.net.pool_server.ServerPoolProtocol` (answers it, opens
a backend per stream). The handshake runs under the handshake deadline;
once established, received bytes go through the
:class:`~tigertunnel.wire.codec.PoolCodec` and become stream events (data
for a session, stream_open, stream_close, and in version 2 ping, answered
with a pong; a :class:`~tigertunnel.net.heartbeat.Heartbeat` closes the
connection after 15 s without an authenticated frame). Anything that fails
to authenticate or parse closes the pool connection and every session on it
at once. When this socket's write buffer fills, every session on it stops
reading its TB peer until it drains (:meth:`TunnelProtocol.pauseProducing`).

Lifecycle (:data:`~tigertunnel.net.states.POOL_TRANSITIONS`): ``NEW``
until connected, ``HANDSHAKING`` (in plaintext mode only for an instant),
``ESTABLISHED`` once streams may use it, ``DRAINING`` once a key reload
retired its key (it keeps its streams, takes new ones only when no other
connection can, and is closed once idle or after a grace period:
:meth:`~tigertunnel.net.pairmux.SessionMultiplexer.retire_outdated`),
``CLOSING`` while an established connection is closed gracefully (its
streams flow until it is gone), ``DEAD`` when the handshake failed or the
connection failed or was closed before it was established (nothing it
receives is used any more), and ``CLOSED`` once the connection is lost.
The keys its handshake used are one frozen record,
:attr:`TunnelProtocol.key_use`; its streams live in its
:class:`~tigertunnel.net.streams.StreamTable`.
"""


from typing import Callable, Optional, Union, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tigertunnel.config.model import Role
from tigertunnel.errors import HandshakeError, TunnelError
from tigertunnel.interfaces import Clock, FrameEncoder, PoolHost, Session, StreamTransport
from tigertunnel.logs import logger
from tigertunnel.net.frame_protocol import CLOSE_TIMEOUT
from tigertunnel.net.heartbeat import Heartbeat
from tigertunnel.net.outcome import Outcome
from tigertunnel.net.sockets import direct_sender, not_connected as _not_connected, tune_socket
from tigertunnel.net.states import POOL_TRANSITIONS, PoolInput, PoolState, TransitionError
from tigertunnel.stats import HandshakeFailure
from tigertunnel.net.streams import StreamTable
from tigertunnel.wire.codec import Ping, PoolCodec, StreamClosed, StreamOpened
from tigertunnel.keys.ring import KeyUse
from tigertunnel.wire.handshake import ClientHandshake, ServerHandshake
from tigertunnel.wire.muxframes import FrameType

_DATA = int(FrameType.DATA)

log = logger(__name__)

Handshake = Union[ClientHandshake, ServerHandshake]


# Module-level names for the per-event checks.
_ESTABLISHED = PoolState.ESTABLISHED
_DRAINING = PoolState.DRAINING
_CLOSING = PoolState.CLOSING
_HANDSHAKING = PoolState.HANDSHAKING


@implementer(IPushProducer)
class TunnelProtocol(Protocol):
    """One pool connection: what both ends share (each role subclasses it).

    :param handshake: the handshake machine, or ``None`` in plaintext mode.
    :param host: the proxy pair's multiplexer.
    :param name: names the pool connection in logs.
    """

    #: Which tunnel end this is.
    role: Role
    _handshake: Optional[Handshake]

    def __init__(self, handshake: Optional[Handshake],
                 host: "PoolHost[TunnelProtocol]", name: str) -> None:
        self.host = host
        self.clock: Clock = host.clock
        #: The TCP transport to the other tunnel end, once connected.
        self._tcp: Optional[StreamTransport] = None
        #: Writes to ``_tcp`` in this reactor turn (set once connected).
        self._send: Callable[["bytes | bytearray"], None] = _not_connected
        self.name = name
        self.state = PoolState.NEW
        self._handshake = handshake
        self.codec: Optional[PoolCodec] = None
        #: Whether this pool connection encrypts (a key was configured).
        self.encrypted = False
        #: The streams on this pool connection.
        self.streams = StreamTable()
        #: Whether our socket to the peer is full (sessions stop reading).
        self.paused = False
        #: How the handshake ended (``ready``).
        self._outcome: Outcome[TunnelProtocol] = Outcome()
        self._timer: Optional[IDelayedCall] = None
        #: Which keys the handshake used (key reload compares it with the
        #: live keys); ``None`` before it completed and in plaintext mode.
        self.key_use: Optional[KeyUse] = None
        self.peer_version: Optional[int] = None
        #: The peer's address (tunnel server: fair admission by source).
        self.peer_host: Optional[str] = None
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
        handshake completed, or fails with :class:`~tigertunnel.errors.HandshakeError`."""
        return self._outcome.wait()

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
        self._start_handshake(tcp)

    def _start_handshake(self, tcp: StreamTransport) -> None:
        """The handshake starts (a client sends its hello)."""

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
        streams = self.streams
        lookup, unproven = streams.lookup, streams.unproven
        for stream_id, frame_type, payload in items:
            if frame_type == _DATA:
                session = lookup(stream_id)
                if session is not None:
                    session.deliver(payload)
                elif unproven:
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
                closed = streams.peer_closed(event.stream_id)
                if closed is not None:
                    closed.close_by_peer()
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
        else:
            self._outcome.settle(Failure(HandshakeError(
                f"connection lost during handshake: {reason.getErrorMessage()}")))
        for session in streams:
            session.close_by_peer(abort=True)
        on_lost, self.on_lost = self.on_lost, None
        self._release()
        if on_lost is not None:
            on_lost(self)

    def _release(self) -> None:
        """Drop what the connection holds once it is gone: its codec (keys,
        a partial mux frame), handshake, timers, the transport's sender, and
        the callbacks that refer back to its owners."""
        self.codec = None
        self._handshake = None
        self._send = _not_connected

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
        """Bytes of the peer's side of the handshake arrived."""
        raise NotImplementedError

    def _established(self, codec: PoolCodec, leftover: bytes) -> None:
        self._goto(PoolInput.ESTABLISH)
        self._cancel_timer()
        self.host.handshake_ended(self)
        self._handshake = None
        self.codec = codec
        self.encrypted = codec.encrypted
        self.host.pool_connection_up(self)
        self._heartbeat_from_start()
        self._outcome.settle(self)
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
        self._outcome.settle(Failure(error))
        if before is _HANDSHAKING:
            self._close_transport(CLOSE_TIMEOUT)

    def close_gracefully(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close after what is queued has been sent (an established
        connection carries its streams until it is gone; one in its
        handshake is dropped); abort if the peer has not taken the queued
        bytes within ``timeout`` seconds."""
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
        streams = self.streams.drain()
        self.host.pool_connection_down(self)
        for session in streams:
            session.close_by_peer(abort=True)
        self.abort()

    # -- streams --------------------------------------------------------------


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
        """The peer opened a stream (only a client may: this is a server)."""
        self._fail(f"stream_open for stream {stream_id} on a pool "
                   f"connection that opens no backends")

    def _stream_proven(self, stream_id: int, frame: "bytes | bytearray") -> None:
        """An authenticated data frame arrived for a stream that is not
        open while some are unproven (a server's; a client has none)."""

    # -- heartbeat (version 2) -------------------------------------------------

    def _heartbeat_from_start(self) -> None:
        """Established: a server starts watching the peer at once."""

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
