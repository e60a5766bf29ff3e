"""The multiplexer of a proxy pair: joins its sessions and pool connections.

One :class:`SessionMultiplexer` runs per proxy pair (``-p``):

* :class:`ClientMultiplexer` (tunnel client) listens for TB clients at
  start-up, keeps ``-n`` pool connections to the tunnel server (each a
  :class:`~tigertunnel.net.pool.PoolSlot` reconnecting with exponential
  backoff and jitter, 100 ms doubling to 10 s) and places every new TB
  connection on a healthy pool connection, round-robin. With no healthy pool
  connection, or ``-m`` sessions already open, the TB connection is closed at
  once (TB reconnects by itself).
* :class:`ServerMultiplexer` (tunnel server) accepts pool connections and
  opens one backend connection per stream (``-m`` streams per pair at most)
  once the stream has proven itself (see
  :mod:`~tigertunnel.net.tunnel_protocol`). Pending handshakes are admitted
  fairly (:mod:`~tigertunnel.net.admission`: per source group, the one that
  made least progress toward its hello evicted first, after its waiting
  bytes were read), and every pool connection of the tunnel end checks
  hellos against one replay cache.

Failed handshakes are counted one by one in the metrics but logged at most
:data:`HANDSHAKE_LOG_BURST` times per :data:`HANDSHAKE_LOG_INTERVAL` per
pair (a flood must not flood the log); the next line logged says how many
were left out. Limits hit (no pool connection, ``-m`` sessions, pending
handshakes, file descriptors) are warnings at most once per
:data:`LIMIT_LOG_INTERVAL` per pair and kind of limit.

The sessions and pool connections it builds see it only through the
protocols of :mod:`tigertunnel.interfaces` (``SessionHost``,
``SessionPlacer``, ``PoolHost``, ``BackendOpener``, ``PoolOwner``).
"""

import ipaddress
import random
from typing import Any, Callable, Dict, List, Optional, Set, cast

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint

from tigertunnel.config.model import ProxyPair, Role, TunnelConfig
from tigertunnel.interfaces import Reactor, SessionPlacer
from tigertunnel.keys.ring import KeyRing
from tigertunnel.logs import LogRateLimit, logger
from tigertunnel.net.admission import Admission
from tigertunnel.net.outage import OutageReport, PoolOutage
from tigertunnel.net.backoff import backoff_policy
from tigertunnel.net.frame_protocol import FrameFactory, FrameProtocol, PrebuiltFactory
from tigertunnel.net.listeners import ListenerService, pair_listener, start_listening
from tigertunnel.net.pairstatus import PairStatus, PoolConnectionStatus
from tigertunnel.net.pool import PoolSlot
from tigertunnel.net.retire import DRAIN_TIMEOUT, RETIRE_GRACE, Retirements
from tigertunnel.net.states import PoolState
from tigertunnel.wire.tbwatch import TBWatch
from tigertunnel.net.stats import HandshakeFailure, Reachability, Refusal, Stats
from tigertunnel.net.tunnel_protocol import TunnelFactory, TunnelProtocol
from tigertunnel.wire.handshake import (
    EXTENDED_VERSION,
    PROTOCOL_VERSION,
    ClientHandshake,
    HelloReplayCache,
    KeyUse,
    ReplayCache,
    ServerHandshake,
)

#: Seconds allowed for a TCP connect (pool connection or backend).
CONNECT_TIMEOUT = 10.0
#: Minimum seconds between two "limit reached" log lines of one kind on one pair.
LIMIT_LOG_INTERVAL = 10.0
#: "Handshake failed" log lines of one pair: at most HANDSHAKE_LOG_BURST
#: per HANDSHAKE_LOG_INTERVAL seconds.
HANDSHAKE_LOG_INTERVAL = 10.0
HANDSHAKE_LOG_BURST = 5

log = logger(__name__)

_ESTABLISHED = PoolState.ESTABLISHED

EndpointFor = Callable[[ProxyPair], IStreamClientEndpoint]


def target_host(pair: ProxyPair) -> str:
    """The host to connect to; ``:PORT`` targets mean this machine."""
    return pair.target.host or "127.0.0.1"


class SessionMultiplexer(MultiService):
    """Joins the TB-side connections and the pool connections of one pair.

    :param config: the tunnel end's configuration.
    :param pair: the proxy pair this multiplexer serves.
    :param reactor: the reactor (or a ``MemoryReactorClock`` in tests).
    :param endpoint_for: the client endpoint that reaches a pair's target
        (tests pass in-memory endpoints); TCP by default.
    """

    role: Role
    listener: ListenerService
    #: Seconds a retired pool connection may keep its streams.
    retire_wait = RETIRE_GRACE
    #: Places new TB clients' sessions (tunnel client only).
    _placer: "Optional[SessionPlacer[FrameProtocol]]" = None

    def __init__(self, config: TunnelConfig, pair: ProxyPair, reactor: Reactor,
                 endpoint_for: Optional[EndpointFor] = None) -> None:
        super().__init__()
        self.endpoint_for: EndpointFor = endpoint_for or self._tcp_endpoint
        self.config = config
        #: The keys in use: the start-up keys, until a reload
        #: (:mod:`tigertunnel.ops.reload`) swaps in a newer ring.
        self.keyring: KeyRing = config.keyring
        self.pair = pair
        self.clock = reactor
        self.reactor = reactor
        self.name = pair.name
        self.handshake_timeout = config.handshake_timeout
        #: Established pool connections, in the order they came up.
        self.pool_connections: List[TunnelProtocol] = []
        self.sessions: Set[FrameProtocol] = set()
        #: Monotonic counters for metrics.
        self.stats = Stats()
        #: What this pair sees of TigerBeetle (set by the tunnel end's
        #: operations layer, :func:`tigertunnel.ops.tbmetrics.watch_pairs`).
        self.tb_watch: Optional[TBWatch] = None
        #: The pool connections a key reload retired, with their deadlines.
        self._retired = Retirements(self.role, pair.name, self.retire_wait,
                                    patient=self.role is Role.CLIENT)
        #: Set by a graceful shutdown: no new sessions or streams.
        self.stopping = False
        self._limit_log = LogRateLimit(LIMIT_LOG_INTERVAL)
        self._failure_log = LogRateLimit(HANDSHAKE_LOG_INTERVAL, HANDSHAKE_LOG_BURST)

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
        start_listening(super().privilegedStartService, str(self.pair.listen))

    def startService(self) -> None:
        start_listening(super().startService, str(self.pair.listen))

    @property
    def pair_name(self) -> str:
        """The proxy pair's name in logs (``pair0``)."""
        return self.pair.name

    @property
    def pair_label(self) -> str:
        """What the pair reaches, as metrics name it (label ``pair``)."""
        return self.pair.label or self.pair.name

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
        encrypted = self.keyring.psk is not None
        return FrameProtocol(self, self.config.cluster_id,
                             check_cluster=encrypted or
                             self.config.cluster_id is not None,
                             placer=self._placer)

    def accept_load(self) -> Optional[int]:
        """What this process serves on the pair, for ``--workers`` accept
        balancing (each role counts its own; ``None``: take nothing now)."""
        raise NotImplementedError

    def session_ended(self, session: FrameProtocol) -> None:
        """A TB-side connection is gone; forget it."""
        self.sessions.discard(session)

    def pool_connection_up(self, connection: TunnelProtocol) -> None:
        """A pool connection finished its handshake."""
        self.stats.pool_connects += 1
        self.pool_connections.append(connection)
        self.listener.release()
        log.info("{role} pool connection {pool_connection} up (key id {key_id})",
                 role=self.role, pair=self.name, pool_connection=connection.name,
                 key_id=connection.key_id)

    def pool_connection_down(self, connection: TunnelProtocol) -> None:
        """A pool connection that was up is gone."""
        self._retired.forget(connection)
        if connection in self.pool_connections:
            self.stats.pool_losses += 1
            self.pool_connections.remove(connection)

    def handshake_started(self, connection: TunnelProtocol) -> None:
        """A pool connection started its handshake."""

    def handshake_progress(self, connection: TunnelProtocol, count: int) -> None:
        """A pool connection received ``count`` handshake bytes."""

    def handshake_ended(self, connection: TunnelProtocol) -> None:
        """A pool connection's handshake finished, failed or was cut."""

    @property
    def handshake_failures(self) -> int:
        """Failed handshakes of this pair, all kinds."""
        return sum(self.stats.handshake_failures.values())

    def handshake_failed(self, connection: TunnelProtocol, reason: str,
                         kind: HandshakeFailure,
                         skew: Optional[int] = None) -> None:
        """Count a failed handshake; log it unless one was logged lately."""
        self.stats.handshake_failures[kind] += 1
        held = self._failure_log.allow(self.clock.seconds())
        if held is None:
            return
        more = (f" ({held} handshake failures before this one not logged)"
                if held else "")
        if skew is not None:
            log.warn("{role} pool connection {pool_connection}: handshake "
                     "failed: {reason} (clock skew {skew} s){more}",
                     role=self.role, pair=self.name,
                     pool_connection=connection.name, reason=reason, skew=skew,
                     more=more, held=held)
        else:
            log.warn("{role} pool connection {pool_connection}: handshake "
                     "failed: {reason}{more}", role=self.role, pair=self.name,
                     pool_connection=connection.name, reason=reason, more=more,
                     held=held)

    def refuse(self, why: Refusal) -> None:
        """Count a session or stream refused for ``why``."""
        self.stats.sessions_refused[why] += 1

    def limit_log(self, message: str, **fields: Any) -> None:
        """Log a warning at most once per LIMIT_LOG_INTERVAL for this pair
        and ``message`` (each message has its own window); the next line of a
        message says how many it left out (field ``held``)."""
        held = self._limit_log.allow(self.clock.seconds(), message)
        if held is None:
            return
        more = f" ({held} more since the last such line)" if held else ""
        log.warn(message + "{more}", more=more, held=held, **fields)

    # -- key reload and status ------------------------------------------------

    def current(self, use: KeyUse) -> bool:
        """Whether a pool connection keyed with ``use`` uses keys that are
        still current for this tunnel end (see :class:`KeyRing`)."""
        raise NotImplementedError

    @property
    def draining(self) -> Set[TunnelProtocol]:
        """The pool connections a key reload retired, until they are gone."""
        return {c for c in self.pool_connections if c in self._retired}

    def retire_outdated(self, keyring: KeyRing, now: float) -> bool:
        """Use ``keyring`` from now on; retire (``DRAINING``) the established
        pool connections keyed with a key it no longer has as current, renew
        those current again, and close those that may go now (see
        :meth:`close_retired`).

        :returns: whether retired pool connections remain (call
            :meth:`close_retired` again later).
        """
        self.keyring = keyring
        if not self.stopping:
            self._retired.mark(list(self.pool_connections),
                               lambda c: c.key_use is None or self.current(c.key_use),
                               now)
        return self.close_retired(now)

    def close_retired(self, now: float) -> bool:
        """Close the retired pool connections that may go now: once idle or
        past their deadline (a tunnel client keeps them until a pool
        connection with the current key is up, closing one idle one at a
        time to try the key).

        :returns: whether retired pool connections remain.
        """
        psk = self.keyring.psk
        return self._retired.close_due(
            [c for c in self.pool_connections if c.established], now,
            psk.first()[0] if psk is not None else None)

    def handshaking(self) -> int:
        """Pool connections in their handshake."""
        raise NotImplementedError

    def snapshot(self) -> PairStatus:
        """This pair's figures now (for ``/status`` and metrics)."""
        retired = self._retired
        return PairStatus(
            role=self.role, name=self.pair.name, label=self.pair_label,
            listen=str(self.pair.listen), target=str(self.pair.target),
            healthy=self._healthy(), stopping=self.stopping,
            pool_size=self.config.pool_size if self.role is Role.CLIENT else None,
            handshaking=self.handshaking(),
            pool_connections=tuple(
                PoolConnectionStatus(c.name, c.key_id, len(c.streams),
                                     "draining" if c in retired else "healthy")
                for c in self.pool_connections if c.established),
            sessions=len(self.sessions), stats=self.stats,
            backend=self._backend())

    def _healthy(self) -> bool:
        raise NotImplementedError

    def _backend(self) -> Optional[Reachability]:
        return None


class ClientMultiplexer(SessionMultiplexer):
    """The tunnel client's side of a proxy pair."""

    role = Role.CLIENT
    retire_wait = DRAIN_TIMEOUT

    def __init__(self, config: TunnelConfig, pair: ProxyPair, reactor: Reactor,
                 endpoint_for: Optional[EndpointFor] = None,
                 rand: Callable[[], float] = random.random) -> None:
        super().__init__(config, pair, reactor, endpoint_for)
        self._placer = self
        self._rr = 0
        self.frame_factory = FrameFactory(self.new_session)
        self.listener = pair_listener(config, pair, self.frame_factory, reactor)
        # A worker on a shared socket takes TB connections once it can carry them.
        self.listener.held = pair.index in config.inherited_fds
        self.listener.setServiceParent(self)
        self._connection_count = 0
        #: Failed pool connects since the pool was last up (for the logs).
        self.outage = PoolOutage(pair.name, self.backend_name)
        self.pool: List[PoolSlot] = []
        for index in range(config.pool_size):
            slot = PoolSlot(self, index, backoff_policy(rand))
            slot.setServiceParent(self)
            self.pool.append(slot)

    def pool_connect_failed(self, slot: int, reason: str, next_retry: float) -> None:
        """Log a failed pool connect: the first of an outage, then a summary at
        most every 30 s; warnings while the pair has no pool connection up
        (:mod:`tigertunnel.net.outage`)."""
        self._log_outage(self.outage.failed(self.clock.seconds(), reason, next_retry,
                                            len(self.pool_connections), slot))

    def pool_connection_up(self, connection: TunnelProtocol) -> None:
        """A pool connection finished its handshake (ends an outage)."""
        super().pool_connection_up(connection)
        self._log_outage(self.outage.recovered(self.clock.seconds()))

    def pool_connection_down(self, connection: TunnelProtocol) -> None:
        """A pool connection that was up is gone; losing the pair's last one
        (not while stopping) is a warning."""
        was_up = connection in self.pool_connections
        super().pool_connection_down(connection)
        if was_up and not self.pool_connections and self.running and not self.stopping:
            self._log_outage(self.outage.lost_last(self.clock.seconds(), connection.name))

    def _log_outage(self, report: Optional[OutageReport]) -> None:
        if report is not None:
            log.emit(report.level, report.format, **report.fields())

    def pool_endpoint(self) -> IStreamClientEndpoint:
        """The endpoint that reaches the tunnel server."""
        return self.endpoint_for(self.pair)

    def new_pool_connection(self, slot: int) -> TunnelProtocol:
        """Build the protocol of a new pool connection for ``slot``."""
        self._connection_count += 1
        name = f"{self.name}/{slot}#{self._connection_count}"
        return TunnelProtocol(self.role, self._make_handshake(), self, name)

    def current(self, use: KeyUse) -> bool:
        """The first PSK and the configured KEM public key are current."""
        return self.keyring.client_current(use)

    def handshaking(self) -> int:
        return sum(1 for slot in self.pool if slot.connection is not None
                   and not slot.connection.established)

    def _healthy(self) -> bool:
        return any(c.established for c in self.pool_connections)

    def _make_handshake(self) -> Optional[ClientHandshake]:
        keys = self.keyring
        if keys.psk is None:
            return None
        key_id, key = keys.psk.first()
        return ClientHandshake(key_id, key, self.cluster_value,
                               kem_public=keys.kem_public,
                               now=self.clock.seconds)

    def attach(self, session: FrameProtocol) -> bool:
        """Place a new TB connection on a healthy pool connection.

        :returns: ``False`` when it must be closed (no healthy pool
            connection, or ``-m`` sessions already open).
        """
        if self.stopping:
            self.refuse(Refusal.STOPPING)
            return False
        # Draining pool connections only take sessions when nothing else can.
        healthy = ([c for c in self.pool_connections if c.state is _ESTABLISHED]
                   or [c for c in self.pool_connections if c.established])
        if not healthy:
            self.refuse(Refusal.NO_POOL)
            self.limit_log("client {pair}: no healthy pool connection to "
                           "{target}; closing new TB connections",
                           pair=self.name, target=self.backend_name)
            return False
        if len(self.sessions) >= self.config.max_sessions:
            self.refuse(Refusal.MAX_SESSIONS)
            self.limit_log("client {pair}: max sessions ({max}) reached; "
                           "closing new TB connections", pair=self.name,
                           max=self.config.max_sessions)
            return False
        connection = healthy[self._rr % len(healthy)]
        self._rr += 1
        self.sessions.add(session)
        self.stats.sessions_opened += 1
        stream_id = connection.open_stream(session)
        log.debug("client {pair}: session {stream} on {pool_connection}", pair=self.name,
                  stream=stream_id, pool_connection=connection.name)
        return True

    def accept_load(self) -> Optional[int]:
        """TB sessions served, for ``--workers`` accept balancing; ``None``
        while this worker could only refuse a new one (no established pool
        connection, or stopping)."""
        if self.stopping or not any(c.established for c in self.pool_connections):
            return None
        return len(self.sessions)


class ServerMultiplexer(SessionMultiplexer):
    """The tunnel server's side of a proxy pair."""

    role = Role.SERVER

    def __init__(self, config: TunnelConfig, pair: ProxyPair, reactor: Reactor,
                 endpoint_for: Optional[EndpointFor] = None,
                 replay_cache: Optional[HelloReplayCache] = None,
                 admission: "Optional[Admission[TunnelProtocol]]" = None) -> None:
        """
        :param replay_cache: the tunnel end's replay cache, shared by its
            pairs (a new in-memory one by default).
        :param admission: decides which pending handshakes to evict
            (:class:`Admission` with its default limits by default).
        """
        super().__init__(config, pair, reactor, endpoint_for)
        self.replay_cache: HelloReplayCache = (
            replay_cache if replay_cache is not None
            else ReplayCache(now=reactor.seconds))
        self.admission: "Admission[TunnelProtocol]" = (
            admission or Admission(reactor.seconds))
        #: Pool connections in their handshake, oldest first.
        self.pending: Dict[TunnelProtocol, None] = {}
        self.evictions = 0
        self.tunnel_factory = TunnelFactory(self, self._make_handshake, self,
                                            self.pair_name)
        self.listener = pair_listener(config, pair, self.tunnel_factory, reactor)
        #: The outcome of the last backend connect (sessions and probe).
        self.backend = Reachability()
        self.listener.setServiceParent(self)

    def accept_load(self) -> Optional[int]:
        """Pool connections served (in their handshake or up), for
        ``--workers`` accept balancing; ``None`` once stopping."""
        if self.stopping:
            return None
        return len(self.pending) + len(self.pool_connections)

    def current(self, use: KeyUse) -> bool:
        """Every key id still in the files, with the same bytes, is current."""
        return self.keyring.server_accepts(use)

    def handshaking(self) -> int:
        return len(self.pending)

    def _healthy(self) -> bool:
        # Healthy while it listens and its replica took the last backend
        # connect (not known yet: healthy).
        return not self.stopping and self.backend.reachable is not False

    def _backend(self) -> Optional[Reachability]:
        return self.backend

    def _make_handshake(self) -> Optional[ServerHandshake]:
        keys = self.keyring
        if keys.psk is None:
            return None
        return ServerHandshake(keys.psk, keys.kem_secret, self.cluster_value,
                               now=self.clock.seconds,
                               require_kem=self.config.require_kem,
                               replay_cache=self.replay_cache,
                               hide_unknown_key=True,
                               versions=(PROTOCOL_VERSION, EXTENDED_VERSION))

    def handshake_started(self, connection: TunnelProtocol) -> None:
        """Track a pending handshake; past a cap, evict the one the
        admission policy picks (possibly ``connection`` itself).

        Each pick's waiting bytes are read first (once): a hello that has
        arrived but that the reactor has not read yet runs its handshake
        now, which may complete it, and the policy picks again.
        """
        self.pending[connection] = None
        admission = self.admission
        admission.connection_made(connection, connection.peer_host)
        read: Set[TunnelProtocol] = set()
        victim = admission.victim()
        while victim is not None:
            if victim not in read:
                read.add(victim)
                if victim.read_waiting():
                    victim = admission.victim()
                    continue
            admission.evict(victim)
            self.pending.pop(victim, None)
            self.evictions += 1
            self.stats.handshake_evictions += 1
            self.limit_log("server {pair}: too many pending handshakes ({max} "
                           "in all, {per_group} per source group); dropping "
                           "those with least progress toward a hello, such as "
                           "{peer} ({count} so far)", pair=self.name,
                           max=admission.max_pending,
                           per_group=admission.per_group,
                           peer=victim.peer_host, count=self.evictions)
            victim.evict()
            victim = admission.victim()

    def handshake_progress(self, connection: TunnelProtocol, count: int) -> None:
        """A pending connection sent ``count`` bytes of its hello."""
        self.admission.data_received(connection, count)

    def handshake_ended(self, connection: TunnelProtocol) -> None:
        """Forget a handshake that is no longer pending."""
        self.pending.pop(connection, None)
        self.admission.connection_done(connection)

    def open_backend(self, connection: TunnelProtocol,
                     stream_id: int) -> Optional[FrameProtocol]:
        """Accept stream ``stream_id`` on ``connection`` and connect its backend.

        :returns: the session, or ``None`` when the stream is refused
            (``-m`` streams already open on this pair).
        """
        if self.stopping:
            self.refuse(Refusal.STOPPING)
            return None
        if len(self.sessions) >= self.config.max_sessions:
            self.refuse(Refusal.MAX_SESSIONS)
            self.limit_log("server {pair}: max sessions ({max}) reached; "
                           "refusing streams", pair=self.name,
                           max=self.config.max_sessions)
            return None
        session = self.new_session()
        self.sessions.add(session)
        self.stats.sessions_opened += 1
        endpoint = self.endpoint_for(self.pair)
        connection.accept_stream(stream_id, session)
        d = endpoint.connect(PrebuiltFactory(session))
        session.connecting = d

        def connected(proto: Any) -> None:
            session.connecting = None
            self.backend.record(True, self.clock.seconds())

        def failed(reason: Failure) -> None:
            if not reason.check(CancelledError):
                self.backend.record(False, self.clock.seconds(),
                                    reason.getErrorMessage())
            session.connect_failed(reason)

        d.addCallbacks(connected, failed)
        return session


def build_service(config: TunnelConfig, reactor: Optional[Reactor] = None,
                  endpoint_for: Optional[EndpointFor] = None,
                  top: Optional[MultiService] = None,
                  replay_cache: Optional[HelloReplayCache] = None) -> MultiService:
    """Build the service tree of a tunnel end: one multiplexer per pair.

    :param endpoint_for: returns the client endpoint that reaches a pair's
        target (tests pass in-memory endpoints); TCP by default.
    :param top: the parent to add the multiplexers to (a new
        ``MultiService`` by default); returned.
    :param replay_cache: tunnel server: the replay cache every pair
        shares (one in memory by default).
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = cast(Reactor, _reactor)
    if top is None:
        top = MultiService()
    if config.role is Role.CLIENT:
        for pair in config.pairs:
            ClientMultiplexer(config, pair, reactor, endpoint_for).setServiceParent(top)
        return top
    if replay_cache is None:
        replay_cache = ReplayCache(now=reactor.seconds)
    for pair in config.pairs:
        ServerMultiplexer(config, pair, reactor, endpoint_for,
                          replay_cache).setServiceParent(top)
    return top
