"""Services: the lifecycle of listeners, pool connections and sessions.

One :class:`SessionMultiplexer` runs per proxy pair (``-p``):

* :class:`ClientMultiplexer` (tunnel client) listens for TB clients at
  start-up, keeps ``-n`` pool connections to the tunnel server (each a
  :class:`PoolSlot` reconnecting with exponential backoff and jitter,
  100 ms doubling to 10 s) and places every new TB
  connection on a healthy pool connection, round-robin. With no healthy pool
  connection, or ``-m`` sessions already open, the TB connection is closed at
  once (TB reconnects by itself).
  (Twisted's ``ClientService`` is not used: it cannot handle a connection
  that closes after its ``prepareConnection`` failed, which is exactly what
  a rejected handshake does.)
* :class:`ServerMultiplexer` (tunnel server) accepts pool connections and
  opens one backend connection per stream (``-m`` streams per pair at most).
"""

import ipaddress
import random
from collections import Counter, OrderedDict
from typing import Any, Callable, List, Optional, Set, Tuple, Union
from weakref import WeakKeyDictionary

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    serverFromString,
)
from twisted.internet.error import CannotListenError, ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint

from tigertunnel.config.model import ProxyPair, TunnelConfig, listen_description
from tigertunnel.errors import ListenError
from tigertunnel.wire.handshake import (
    EXTENDED_VERSION,
    PROTOCOL_VERSION,
    ClientHandshake,
    ReplayCache,
    ServerHandshake,
)
from tigertunnel.logs import logger
from tigertunnel.net.backoff import backoff_policy
from tigertunnel.net.sockets import socket_family
from tigertunnel.net.frame_protocol import FrameFactory, FrameProtocol, PrebuiltFactory
from tigertunnel.net.tunnel_protocol import TunnelFactory, TunnelProtocol

#: Seconds allowed for a TCP connect (pool connection or backend).
CONNECT_TIMEOUT = 10.0
#: Pool connections of one server pair allowed to be in their handshake at
#: once; past that the oldest is dropped, so a flood of silent connections
#: cannot lock out a real client (whose handshake takes milliseconds).
MAX_PENDING_HANDSHAKES = 64
#: Minimum seconds between two "limit reached" log lines of one pair.
LIMIT_LOG_INTERVAL = 10.0

log = logger("tigertunnel.services")

EndpointFor = Callable[[ProxyPair], IStreamClientEndpoint]


def _short_reason(error: CannotListenError) -> str:
    reason = error.socketError
    return getattr(reason, "strerror", None) or str(reason)


def target_host(pair: ProxyPair) -> str:
    """The host to connect to; ``:PORT`` targets mean this machine."""
    return pair.target.host or "127.0.0.1"


class PoolSlot(Service):
    """Keeps one pool connection up: connect, handshake, reconnect with backoff.

    A failed TCP connect, a failed handshake and the loss of an established
    pool connection all schedule the next attempt after
    ``policy(consecutive failures)`` seconds; a completed handshake resets
    the count.
    """

    def __init__(self, mux: "ClientMultiplexer", index: int,
                 policy: Callable[[int], float]) -> None:
        self.mux = mux
        self.index = index
        self.policy = policy
        self.failures = 0
        self.connected_before = False
        self.link: Optional[TunnelProtocol] = None
        self._connecting: Optional[Deferred[Any]] = None
        self._retry: Optional[IDelayedCall] = None
        self._stopped: Optional[Deferred[None]] = None

    def startService(self) -> None:
        super().startService()
        self._attempt()

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self.link is None:
            return succeed(None)
        self._stopped = Deferred()
        self.link.close_gracefully()
        return self._stopped

    def _attempt(self) -> None:
        self._retry = None
        if not self.running:
            return
        link = self.mux.new_link(self.index)
        link.on_lost = self._lost
        d = self.mux.endpoint_for(self.mux.pair).connect(PrebuiltFactory(link))
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, link: TunnelProtocol) -> None:
        self._connecting = None
        self.link = link
        link.ready.addCallbacks(self._ready, lambda f: None)

    def _ready(self, link: TunnelProtocol) -> None:
        self.failures = 0
        if self.connected_before:
            self.mux.stats["pool_reconnects"] += 1
        self.connected_before = True

    def _connect_failed(self, reason: Failure) -> None:
        self._connecting = None
        if reason.check(CancelledError, ConnectingCancelledError):
            return
        log.info("client {pair}: cannot connect pool connection {slot} to "
                 "{target}: {reason}", pair=self.mux.name, slot=self.index,
                 target=self.mux.backend_name,
                 reason=reason.getErrorMessage())
        self._schedule()

    def _lost(self, link: TunnelProtocol) -> None:
        if link is self.link:
            self.link = None
        if self._stopped is not None:
            stopped, self._stopped = self._stopped, None
            stopped.callback(None)
            return
        self._schedule()

    def _schedule(self) -> None:
        if not self.running:
            return
        self.failures += 1
        delay = self.policy(self.failures)
        log.debug("client {pair}: pool connection {slot} retry in {delay:.2f} s",
                  pair=self.mux.name, slot=self.index, delay=delay)
        self._retry = self.mux.clock.callLater(delay, self._attempt)


class SessionMultiplexer(MultiService):
    """Joins the TB-side connections and the pool connections of one pair.

    The role subclasses add what their protocols call: ``attach`` (a TB
    client connected: :class:`ClientMultiplexer`) and ``open_backend`` (a
    stream was opened: :class:`ServerMultiplexer`).

    :param config: the tunnel end's configuration.
    :param pair: the proxy pair this multiplexer serves.
    :param reactor: the reactor (or a ``MemoryReactorClock`` in tests).
    """

    role = ""

    def __init__(self, config: TunnelConfig, pair: ProxyPair, reactor: Any,
                 endpoint_for: Optional[EndpointFor] = None) -> None:
        super().__init__()
        self.endpoint_for: EndpointFor = endpoint_for or self._tcp_endpoint
        self.config = config
        self.pair = pair
        self.clock = reactor
        self.reactor = reactor
        self.name = pair.name
        self.handshake_timeout = config.handshake_timeout
        self.links: List[TunnelProtocol] = []
        self.sessions: Set[FrameProtocol] = set()
        #: Monotonic counters for metrics: frames_/bytes_to_tunnel (read from
        #: the TB side), frames_/bytes_from_tunnel (written to the TB side),
        #: sessions_opened, sessions_refused_<why>, handshake_failures_<kind>,
        #: pool_connects, pool_reconnects, pool_losses, link_failures.
        self.stats: Counter[str] = Counter()
        #: Established pool connections keyed with a retired key
        #: (:mod:`tigertunnel.ops.reload`): no new sessions go to them.
        self.draining: Set[TunnelProtocol] = set()
        #: Set by a graceful shutdown: no new sessions or streams.
        self.stopping = False
        self._last_limit_log = -1e9

    def _tcp_endpoint(self, pair: ProxyPair) -> IStreamClientEndpoint:
        host = target_host(pair)
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            # A name: resolved on every connect (in Twisted's thread pool),
            # trying each address it has.
            return HostnameEndpoint(self.reactor, host, pair.target.port,
                                    timeout=CONNECT_TIMEOUT)
        # An address (the usual backend, 127.0.0.1:3001): a plain TCP
        # connect, without a resolver round trip per session.
        cls = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
        return cls(self.reactor, host, pair.target.port, timeout=CONNECT_TIMEOUT)

    def privilegedStartService(self) -> None:
        """Bind the listener; a port that cannot be bound is a one-line error."""
        self._listen_errors(super().privilegedStartService)

    def startService(self) -> None:
        self._listen_errors(super().startService)

    def _listen_errors(self, start: Callable[[], None]) -> None:
        try:
            start()
        except CannotListenError as e:
            raise ListenError(f"cannot listen on {self.pair.listen}: "
                              f"{_short_reason(e)}") from None

    @property
    def cluster_value(self) -> int:
        """The configured cluster id, 0 when none (PROTOCOL.md section 7.6)."""
        return self.config.cluster_id or 0

    @property
    def backend_name(self) -> str:
        """The target address, for logs."""
        return str(self.pair.target)

    def new_session(self) -> FrameProtocol:
        """Build the protocol of a TB-side connection of this pair."""
        encrypted = self.config.psk is not None
        return FrameProtocol(self, self.config.cluster_id,
                             check_cluster=encrypted or
                             self.config.cluster_id is not None)

    def session_ended(self, session: FrameProtocol) -> None:
        """A TB-side connection is gone; forget it."""
        self.sessions.discard(session)

    def link_up(self, link: TunnelProtocol) -> None:
        """A pool connection finished its handshake."""
        self.stats["pool_connects"] += 1
        self.links.append(link)
        self.listener.release()
        log.info("{role} pool connection {link} up (key id {key_id})",
                 role=self.role, link=link.name, key_id=link.key_id)

    def link_down(self, link: TunnelProtocol) -> None:
        """A pool connection that was up is gone."""
        self.draining.discard(link)
        if link in self.links:
            self.stats["pool_losses"] += 1
            self.links.remove(link)

    def handshake_started(self, link: TunnelProtocol) -> None:
        """A pool connection started its handshake."""

    def handshake_ended(self, link: TunnelProtocol) -> None:
        """A pool connection's handshake finished, failed or was cut."""

    @property
    def handshake_failures(self) -> int:
        """Failed handshakes of this pair, all kinds."""
        return sum(v for k, v in self.stats.items()
                   if k.startswith("handshake_failures_"))

    def handshake_failed(self, link: TunnelProtocol, reason: str,
                         skew: Optional[int] = None, kind: str = "other") -> None:
        """Count and log a failed handshake."""
        self.stats[f"handshake_failures_{kind}"] += 1
        if skew is not None:
            log.warn("{role} pool connection {link}: handshake failed: "
                     "{reason} (clock skew {skew} s)", role=self.role,
                     link=link.name, reason=reason, skew=skew)
        else:
            log.warn("{role} pool connection {link}: handshake failed: "
                     "{reason}", role=self.role, link=link.name, reason=reason)

    def limit_log(self, message: str, **fields: Any) -> None:
        """Log a warning at most once per LIMIT_LOG_INTERVAL for this pair."""
        now = self.clock.seconds()
        if now - self._last_limit_log >= LIMIT_LOG_INTERVAL:
            self._last_limit_log = now
            log.warn(message, **fields)


class ClientMultiplexer(SessionMultiplexer):
    """The tunnel client's side of a proxy pair."""

    role = "client"

    def __init__(self, config: TunnelConfig, pair: ProxyPair, reactor: Any,
                 endpoint_for: Optional[EndpointFor] = None,
                 rand: Callable[[], float] = random.random) -> None:
        super().__init__(config, pair, reactor, endpoint_for)
        self._rr = 0
        self.frame_factory = FrameFactory(self)
        self.listener = pair_listener(config, pair, self.frame_factory, reactor)
        # A worker on a shared socket takes TB connections once it can carry them.
        self.listener.held = pair.index in config.extra.get("inherited", {})
        self.listener.setServiceParent(self)
        self._link_count = 0
        #: The KEM public key each pool connection's handshake was built
        #: with (key reload retires those built with a replaced one).
        self.link_kem: "WeakKeyDictionary[TunnelProtocol, Optional[Tuple[int, bytes]]]"
        self.link_kem = WeakKeyDictionary()
        self.pool: List[PoolSlot] = []
        for index in range(config.pool_size):
            slot = PoolSlot(self, index, backoff_policy(rand))
            slot.setServiceParent(self)
            self.pool.append(slot)

    def new_link(self, slot: int) -> TunnelProtocol:
        """Build the protocol of a new pool connection for ``slot``."""
        self._link_count += 1
        name = f"{self.name}/{slot}#{self._link_count}"
        link = TunnelProtocol(self.role, self._make_handshake(), self, name)
        self.link_kem[link] = self.config.kem_public
        return link

    def _make_handshake(self) -> Optional[ClientHandshake]:
        psk = self.config.psk
        if psk is None:
            return None
        key_id, key = psk.first()
        return ClientHandshake(key_id, key, self.cluster_value,
                               kem_public=self.config.kem_public,
                               now=self.clock.seconds)

    def attach(self, session: FrameProtocol) -> bool:
        """Place a new TB connection on a healthy pool connection.

        :returns: ``False`` when it must be closed (no healthy pool
            connection, or ``-m`` sessions already open).
        """
        if self.stopping:
            self.stats["sessions_refused_stopping"] += 1
            return False
        established = [link for link in self.links if link.established]
        # Draining pool connections only take sessions when nothing else can.
        healthy = [link for link in established
                   if link not in self.draining] or established
        if not healthy:
            self.stats["sessions_refused_no_pool"] += 1
            self.limit_log("client {pair}: no healthy pool connection to "
                            "{target}; closing new TB connections",
                            pair=self.name, target=self.backend_name)
            return False
        if len(self.sessions) >= self.config.max_sessions:
            self.stats["sessions_refused_max_sessions"] += 1
            self.limit_log("client {pair}: max sessions ({max}) reached; "
                            "closing new TB connections", pair=self.name,
                            max=self.config.max_sessions)
            return False
        link = healthy[self._rr % len(healthy)]
        self._rr += 1
        self.sessions.add(session)
        self.stats["sessions_opened"] += 1
        stream_id = link.open_stream(session)
        log.debug("client {pair}: session {stream} on {link}", pair=self.name,
                  stream=stream_id, link=link.name)
        return True


class ServerMultiplexer(SessionMultiplexer):
    """The tunnel server's side of a proxy pair."""

    role = "server"

    def __init__(self, config: TunnelConfig, pair: ProxyPair, reactor: Any,
                 endpoint_for: Optional[EndpointFor] = None) -> None:
        super().__init__(config, pair, reactor, endpoint_for)
        self.replay_cache = ReplayCache(now=reactor.seconds)
        self.pending: "OrderedDict[TunnelProtocol, None]" = OrderedDict()
        self.evictions = 0
        self.tunnel_factory = TunnelFactory(self, self._make_handshake)
        self.listener = pair_listener(config, pair, self.tunnel_factory, reactor)
        self.listener.setServiceParent(self)

    def _make_handshake(self) -> Optional[ServerHandshake]:
        psk = self.config.psk
        if psk is None:
            return None
        return ServerHandshake(psk, self.config.kem_secret, self.cluster_value,
                               now=self.clock.seconds,
                               require_kem=self.config.require_kem,
                               replay_cache=self.replay_cache,
                               hide_unknown_key=True,
                               versions=(PROTOCOL_VERSION, EXTENDED_VERSION))

    def handshake_started(self, link: TunnelProtocol) -> None:
        """Track a pending handshake; evict the oldest past the limit."""
        self.pending[link] = None
        while len(self.pending) > MAX_PENDING_HANDSHAKES:
            oldest, _ = self.pending.popitem(last=False)
            self.evictions += 1
            self.stats["handshake_evictions"] += 1
            self.limit_log("server {pair}: more than {max} pending handshakes;"
                            " dropping the oldest ({count} so far)",
                            pair=self.name, max=MAX_PENDING_HANDSHAKES,
                            count=self.evictions)
            oldest.evict()

    def handshake_ended(self, link: TunnelProtocol) -> None:
        """Forget a handshake that is no longer pending."""
        self.pending.pop(link, None)

    def open_backend(self, link: TunnelProtocol,
                     stream_id: int) -> Optional[FrameProtocol]:
        """Register a newly opened stream on ``link`` and connect its backend.

        :returns: the session, or ``None`` when the stream is refused
            (``-m`` streams already open on this pair).
        """
        if self.stopping:
            self.stats["sessions_refused_stopping"] += 1
            return None
        if len(self.sessions) >= self.config.max_sessions:
            self.stats["sessions_refused_max_sessions"] += 1
            self.limit_log("server {pair}: max sessions ({max}) reached; "
                            "refusing streams", pair=self.name,
                            max=self.config.max_sessions)
            return None
        session = self.new_session()
        self.sessions.add(session)
        self.stats["sessions_opened"] += 1
        endpoint = self.endpoint_for(self.pair)
        link.streams[stream_id] = session
        session.attached(link, stream_id)
        d = endpoint.connect(PrebuiltFactory(session))
        session.connecting = d

        def connected(proto: Any) -> None:
            session.connecting = None

        d.addCallbacks(connected, session.connect_failed)
        return session


def pair_listen_description(config: TunnelConfig, pair: ProxyPair) -> str:
    """The server endpoint description a pair listens on.

    ``config.extra["listen"]`` may map a pair index to another description
    (a ``systemd:`` socket handed over by socket activation).
    """
    override = config.extra.get("listen", {}).get(pair.index)
    return str(override) if override else listen_description(pair.listen)


class ListenerService(StreamServerEndpointService):
    """A pair's listening service; keeps its port (``--workers`` hands the
    socket to the worker processes).

    :ivar held: accept nothing until :meth:`release` (a client worker
        leaves the connections on the shared socket to the other workers
        until its own pool is up).
    """

    port: Optional[Any] = None
    held = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._waitingForPort is not None:
            self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        if self.held:
            port.stopReading()
        return port

    def release(self) -> None:
        """Start accepting (once)."""
        if self.held:
            self.held = False
            if self.port is not None:
                self.port.startReading()


def pair_listener(config: TunnelConfig, pair: ProxyPair, factory: Any,
                  reactor: Any) -> ListenerService:
    """The listening service of a pair.

    A worker process (``--workers``) accepts on the socket it inherited from
    worker 0; otherwise the pair's address (or its systemd socket) is used.
    """
    inherited = config.extra.get("inherited", {}).get(pair.index)
    if inherited is not None:
        endpoint: Any = AdoptedStreamServerEndpoint(reactor, inherited,
                                                    socket_family(inherited))
    else:
        endpoint = serverFromString(reactor,
                                    pair_listen_description(config, pair))
    service = ListenerService(endpoint, factory)
    service._raiseSynchronously = True  # as strports.service does
    return service


def build_service(config: TunnelConfig, reactor: Any = None,
                  endpoint_for: Optional[EndpointFor] = None,
                  top: Optional[MultiService] = None) -> MultiService:
    """Build the service tree of a tunnel end: one multiplexer per pair.

    :param endpoint_for: returns the client endpoint that reaches a pair's
        target (tests pass in-memory endpoints); TCP by default.
    :param top: the parent to add the multiplexers to (a new
        ``MultiService`` by default); returned.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = _reactor
    if top is None:
        top = MultiService()
    cls: Union[type[ClientMultiplexer], type[ServerMultiplexer]]
    cls = ClientMultiplexer if config.role == "client" else ServerMultiplexer
    for pair in config.pairs:
        cls(config, pair, reactor, endpoint_for).setServiceParent(top)
    return top
