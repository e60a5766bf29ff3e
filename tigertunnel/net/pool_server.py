"""ServerPoolProtocol: a tunnel server's pool connection, and its factory.

It answers the client's hello (a rejection's status byte is still sent),
and opens a backend for each stream the client opens:

* a sealed stream_open (version 2) opens the stream's backend connection
  at once;
* a bare one (the reference's, not authenticated) only records the stream
  as *unproven* in the connection's
  :class:`~tigertunnel.net.streams.StreamTable`: the backend connection,
  the session and its ``-m`` slot are made when the stream's first data
  frame authenticates, and that frame is queued until the backend is
  connected. At most :data:`~tigertunnel.net.streams.MAX_UNPROVEN_STREAMS`
  wait per pool connection; one more closes the pool connection. A
  stream_close for an unproven stream forgets it. (A TB peer always sends
  first on a new connection, so TB never notices the later connect; in
  plaintext mode nothing is authenticated and the backend is opened at
  once.)

Between version-2 ends its first ping goes out with the ServerHello, and
its heartbeat watches the client from then on. What it shares with the
client's side is in :class:`~tigertunnel.net.tunnel_protocol.TunnelProtocol`.
"""

from typing import Any, Callable, Optional

from twisted.internet.protocol import Factory

from tigertunnel.config.model import Role
from tigertunnel.errors import HandshakeError
from tigertunnel.interfaces import BackendOpener, PoolHost, Session
from tigertunnel.net.states import PoolState
from tigertunnel.stats import HandshakeFailure
from tigertunnel.net.streams import StreamRefused
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.wire.codec import SERVER, PoolCodec
from tigertunnel.wire.handshake import Rejected, ServerHandshake
from tigertunnel.wire.liveness import FIRST_FRAME_WITHIN

#: Bytes :meth:`ServerPoolProtocol.read_waiting` reads at most: a KEM
#: ClientHello and then some (the rest waits for the reactor).
WAITING_READ = 1 << 16


class ServerPoolProtocol(TunnelProtocol):
    """A tunnel server's pool connection.

    :param handshake: the server handshake, or ``None`` in plaintext mode.
    :param host: the proxy pair's multiplexer.
    :param name: names the pool connection in logs.
    :param opener: opens the backend of each stream the client opens.
    """

    role = Role.SERVER
    _handshake: Optional[ServerHandshake]

    def __init__(self, handshake: Optional[ServerHandshake],
                 host: "PoolHost[TunnelProtocol]", name: str,
                 opener: "BackendOpener[ServerPoolProtocol]") -> None:
        super().__init__(handshake, host, name)
        self._opener: "Optional[BackendOpener[ServerPoolProtocol]]" = opener

    def _handshake_data(self, data: bytes) -> None:
        self.host.handshake_progress(self, len(data))
        hs = self._handshake
        if hs is None:
            return
        try:
            result = hs.feed(data)
        except HandshakeError as e:
            self.host.handshake_failed(self, str(e), HandshakeFailure.refused(e.status))
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

    def _heartbeat_from_start(self) -> None:
        codec = self.codec
        if codec is not None and codec.can_ping and self.established:
            self._start_heartbeat(FIRST_FRAME_WITHIN)

    @property
    def unproven(self) -> "frozenset[int]":
        """Stream ids opened by a bare stream_open whose first authenticated
        data frame has not arrived yet."""
        return frozenset(self.streams.unproven)

    def read_waiting(self) -> bool:
        """Handle now what the peer sent during the handshake that the
        reactor has not read yet (the kernel holds it).

        Reads what is waiting on the socket once, without blocking, and
        feeds it to
        :meth:`~tigertunnel.net.tunnel_protocol.TunnelProtocol.dataReceived`,
        in order before anything the reactor reads later. Admission calls it before evicting this
        connection, so that a hello that has arrived is handled rather
        than dropped unread.

        :returns: whether bytes were read (``False`` for a transport
            without a socket, outside the handshake, with nothing waiting,
            at end of file or on a socket error: the reactor sees those).
        """
        if self.state is not PoolState.HANDSHAKING:
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

    def accept_stream(self, stream_id: int, session: Session) -> None:
        """Record ``session`` for the stream ``stream_id`` the client opened."""
        self.streams.attach(stream_id, session)
        session.attached(self, stream_id)

    def _peer_opened(self, stream_id: int, sealed: bool) -> None:
        # A bare stream_open proves nothing: the table holds it until the
        # stream's first authenticated frame (no backend spent on it).
        try:
            open_now = self.streams.peer_opened(stream_id, sealed or not self.encrypted)
        except StreamRefused as e:
            self._fail(str(e))
            return
        if open_now:
            self._open_backend(stream_id)

    def _stream_proven(self, stream_id: int, frame: "bytes | bytearray") -> None:
        if not self.streams.prove(stream_id):
            return  # a stream closed or refused since: dropped
        session = self._open_backend(stream_id)
        if session is not None:
            session.deliver(frame)  # queued until the backend is connected

    def _release(self) -> None:
        super()._release()
        self._opener = None  # the multiplexer

    def _open_backend(self, stream_id: int) -> Optional[Session]:
        """Open the backend of ``stream_id``; tell a version-2 client if refused."""
        if self._opener is None:
            return None  # gone
        session = self._opener.open_backend(self, stream_id)
        if session is None:
            codec = self.codec
            if codec is not None and codec.can_send_close:
                self._output().writeSequence(codec.encode_close(stream_id))
        return session


class TunnelFactory(Factory):
    """Builds the server's :class:`ServerPoolProtocol` pool connections of a pair.

    :param host: the pair's multiplexer.
    :param make_handshake: a new handshake machine per connection (``None``
        in plaintext mode).
    :param opener: opens the backends of the streams.
    :param pair_name: prefixes the connections' names in logs.
    """

    noisy = False

    def __init__(self, host: "PoolHost[TunnelProtocol]",
                 make_handshake: Callable[[], Optional[ServerHandshake]],
                 opener: "BackendOpener[ServerPoolProtocol]", pair_name: str) -> None:
        self.host = host
        self.make_handshake = make_handshake
        self.opener = opener
        self.pair_name = pair_name
        self._count = 0

    def buildProtocol(self, addr: Any) -> ServerPoolProtocol:
        self._count += 1
        host = getattr(addr, "host", "?")
        port = getattr(addr, "port", "?")
        name = f"{self.pair_name}/{self._count}@{host}:{port}"
        connection = ServerPoolProtocol(self.make_handshake(), self.host, name,
                                        self.opener)
        connection.peer_host = host if isinstance(host, str) else None
        return connection
