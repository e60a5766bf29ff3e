"""The seams inside a tunnel end, named by what each caller needs.

The Twisted glue in :mod:`tigertunnel.net` is three kinds of object that
call each other: the TB-side connection of a session
(:class:`~tigertunnel.net.frame_protocol.FrameProtocol`), a pool connection
(:class:`~tigertunnel.net.tunnel_protocol.TunnelProtocol`) and the
multiplexer of a proxy pair (:mod:`tigertunnel.net.multiplexer`), which
builds the other two. Each module types its neighbours by the protocols
below, never by importing a sibling's class, so the imports inside ``net/``
point one way (multiplexer -> pool -> tunnel_protocol -> frame_protocol)
and mypy checks every call across a seam:

* a session needs :class:`PoolConnection` from the pool connection it lives
  on, :class:`SessionHost` from its multiplexer and, on the tunnel client
  (where a TB client's connection must be placed on a pool connection
  first), :class:`SessionPlacer`;
* a pool connection needs :class:`Session` from the sessions on it,
  :class:`PoolHost` from its multiplexer and, on the tunnel server (where
  the client opens streams), :class:`BackendOpener`;
* a pool slot needs :class:`PoolOwner`;
* the connections write to a :class:`StreamTransport`;
* what only schedules gets a :class:`Clock`, what also connects or
  listens a :class:`Reactor`.
"""

from typing import Any, Callable, Iterable, Optional, Protocol, TypeVar

from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint

from tigertunnel.config.model import Role
from tigertunnel.stats import HandshakeFailure, Stats
from tigertunnel.wire.tbwatch import TBWatch

#: What a seam is given (a session).
S_contra = TypeVar("S_contra", contravariant=True)
#: What a seam is given (a pool connection).
C_contra = TypeVar("C_contra", contravariant=True)
#: What a seam returns (a pool connection).
C_co = TypeVar("C_co", covariant=True)


class Clock(Protocol):
    """Time and timers (``IReactorTime``): the reactor, or a ``Clock`` in tests."""

    def seconds(self) -> float:
        """The current time in seconds."""

    def callLater(self, delay: float, callable: Callable[..., Any],
                  *args: object, **kw: object) -> IDelayedCall:
        """Call ``callable`` after ``delay`` seconds."""


class Reactor(Clock, Protocol):
    """What a tunnel end uses of the reactor: time and TCP (``IReactorTCP``).

    The endpoints built from it (``HostnameEndpoint``, ``serverFromString``
    ...) also use ``IReactorCore`` and, for inherited sockets,
    ``IReactorSocket``; the real reactor and ``MemoryReactorClock`` provide
    all of them.
    """

    def connectTCP(self, host: Any, port: Any, factory: Any, timeout: Any = 30,
                   bindAddress: Any = None) -> Any:
        """Connect to a TCP address (``IReactorTCP``)."""

    def listenTCP(self, port: Any, factory: Any, backlog: Any = 50,
                  interface: Any = "") -> Any:
        """Listen on a TCP port (``IReactorTCP``)."""


class StreamTransport(Protocol):
    """What our protocols use of their TCP transport (Twisted's
    ``ITCPTransport``, ``IConsumer`` and ``IPushProducer`` in one)."""

    def write(self, data: bytes) -> None:
        """Queue ``data`` for sending."""

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Queue every chunk of ``data`` for sending."""

    def loseConnection(self) -> None:
        """Close once everything queued is sent."""

    def abortConnection(self) -> None:
        """Close at once, dropping what is queued."""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Tell ``producer`` when the write buffer fills and drains."""

    def unregisterProducer(self) -> None:
        """Forget the registered producer."""

    def pauseProducing(self) -> None:
        """Stop reading from the socket."""

    def resumeProducing(self) -> None:
        """Read from the socket again."""


class FrameEncoder(Protocol):
    """A session's sending half of the data path (:class:`tigertunnel.wire.datapath.FrameEncoder`)."""

    @property
    def last_frames(self) -> int:
        """How many TB frames the last :meth:`encode` call completed."""

    def encode(self, data: bytes) -> "bytes | bytearray":
        """The pool-connection wire bytes of every TB frame ``data`` completed.

        :raises TunnelError: a bad frame (``FrameError``,
            ``ClusterMismatchError``) or an exhausted counter; the encoder
            is then dead.
        """


class PoolConnection(Protocol):
    """What a session needs from the pool connection its stream lives on."""

    @property
    def name(self) -> str:
        """The pool connection's name in logs."""

    @property
    def encrypted(self) -> bool:
        """Whether the pool connection encrypts (TB frames must then have a
        zero ``nonce_reserved`` and the configured cluster)."""

    @property
    def paused(self) -> bool:
        """Whether the pool connection's socket is full (sessions joining it
        start with reading paused)."""

    def frame_encoder(self, stream_id: int, check: bool, cluster_id: Optional[int],
                      watch: "Optional[Callable[[bytes], object]]") -> FrameEncoder:
        """An encoder turning what the TB peer of ``stream_id`` sends into
        this connection's wire bytes (for :meth:`send_wire`).

        :param check: check every frame (padding, ``nonce_reserved``,
            ``cluster_id``).
        :param watch: called with every frame's TB header, or ``None``.
        """

    def send_wire(self, data: "bytes | bytearray") -> None:
        """Write what a :meth:`frame_encoder` returned, now and in order."""

    def end_stream(self, stream_id: int, session: "Session") -> None:
        """The TB side of ``stream_id`` is gone: tell the peer, forget it."""


class Session(Protocol):
    """What a pool connection needs from a session on one of its streams."""

    @property
    def stream_id(self) -> int:
        """The session's stream id (valid once attached)."""

    def attached(self, connection: PoolConnection, stream_id: int) -> None:
        """The session now lives on ``stream_id`` of ``connection``."""

    def deliver(self, frame: "bytes | bytearray") -> None:
        """Write one TB frame that arrived for the stream to the TB peer."""

    def close_by_peer(self, abort: bool = False) -> None:
        """The other end closed the stream, or the pool connection died."""

    def pause_reading(self) -> None:
        """Stop reading the TB peer (the pool connection's socket is full)."""

    def resume_reading(self) -> None:
        """Read the TB peer again."""


class SessionHost(Protocol[S_contra]):
    """What a session needs from its proxy pair's multiplexer."""

    @property
    def role(self) -> Role:
        """Which tunnel end this is."""

    @property
    def pair_name(self) -> str:
        """The proxy pair's name in logs (``pair0``)."""

    @property
    def backend_name(self) -> str:
        """The pair's target address, for logs."""

    @property
    def clock(self) -> Clock:
        """Schedules the close timers."""

    @property
    def stats(self) -> Stats:
        """The pair's counters."""

    @property
    def tb_watch(self) -> "Optional[TBWatch]":
        """What the pair sees of TigerBeetle, fed every forwarded frame, or ``None``."""

    def session_ended(self, session: S_contra) -> None:
        """The session's TB-side connection is gone (or never came)."""

    def limit_log(self, message: str, **fields: Any) -> None:
        """Log a warning, at most once per interval for the pair and ``message``."""


class SessionPlacer(Protocol[S_contra]):
    """Tunnel client: places a new TB client's session on a pool connection."""

    def attach(self, session: S_contra) -> bool:
        """Open a stream for ``session`` on a healthy pool connection.

        :returns: ``False`` when the TB connection must be closed instead.
        """


class PoolHost(Protocol[C_contra]):
    """What a pool connection needs from its proxy pair's multiplexer."""

    @property
    def role(self) -> Role:
        """Which tunnel end this is."""

    @property
    def clock(self) -> Clock:
        """Schedules the handshake deadline and the close timer."""

    @property
    def stats(self) -> Stats:
        """The pair's counters."""

    @property
    def handshake_timeout(self) -> float:
        """Seconds a handshake may take."""

    @property
    def cluster_value(self) -> int:
        """The configured cluster id, 0 when none."""

    def handshake_started(self, connection: C_contra) -> None:
        """The connection started its handshake."""

    def handshake_progress(self, connection: C_contra, count: int) -> None:
        """The connection received ``count`` handshake bytes."""

    def handshake_ended(self, connection: C_contra) -> None:
        """The handshake finished, failed or was cut."""

    def handshake_failed(self, connection: C_contra, reason: str,
                         kind: HandshakeFailure,
                         skew: Optional[int] = None) -> None:
        """Count and log a failed handshake."""

    def pool_connection_up(self, connection: C_contra) -> None:
        """The connection finished its handshake and may carry streams."""

    def pool_connection_down(self, connection: C_contra) -> None:
        """An established connection is gone or failed."""


class BackendOpener(Protocol[C_contra]):
    """Tunnel server: opens the backend connection of a new stream."""

    def open_backend(self, connection: C_contra,
                     stream_id: int) -> Optional[Session]:
        """Build the session of ``stream_id``, attach it to ``connection``
        and connect its backend.

        :returns: the session, or ``None`` when the stream is refused.
        """


class PoolOwner(Protocol[C_co]):
    """What a pool slot needs from its tunnel client's multiplexer."""

    @property
    def pair_name(self) -> str:
        """The proxy pair's name in logs (``pair0``)."""

    @property
    def backend_name(self) -> str:
        """The tunnel server's address, for logs."""

    @property
    def clock(self) -> Clock:
        """Schedules the reconnect attempts."""

    @property
    def stats(self) -> Stats:
        """The pair's counters."""

    def new_pool_connection(self, slot: int) -> C_co:
        """Build the protocol of a new pool connection for ``slot``."""

    def pool_endpoint(self) -> IStreamClientEndpoint:
        """The endpoint that reaches the tunnel server."""

    def pool_connect_failed(self, slot: int, reason: str, next_retry: float) -> None:
        """A slot's TCP connect failed; it tries again in ``next_retry`` seconds."""

