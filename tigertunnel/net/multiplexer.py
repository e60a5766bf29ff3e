"""The multiplexer of a proxy pair: joins its sessions and pool connections.

One :class:`~tigertunnel.net.pairmux.SessionMultiplexer` runs per proxy pair (``-p``):

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
:data:`~tigertunnel.net.pairmux.HANDSHAKE_LOG_BURST` times per
:data:`~tigertunnel.net.pairmux.HANDSHAKE_LOG_INTERVAL` per
pair (a flood must not flood the log); the next line logged says how many
were left out. Limits hit (no pool connection, ``-m`` sessions, pending
handshakes, file descriptors) are warnings at most once per
:data:`~tigertunnel.net.pairmux.LIMIT_LOG_INTERVAL` per pair and kind of limit.

What both share is :class:`~tigertunnel.net.pairmux.SessionMultiplexer`
(re-exported here). The sessions and pool connections it builds see it
only through the
protocols of :mod:`tigertunnel.interfaces` (``SessionHost``,
``SessionPlacer``, ``PoolHost``, ``BackendOpener``, ``PoolOwner``).
"""

import random
from typing import Any, Callable, Dict, List, Optional, Set, cast

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

from tigertunnel.config.model import ProxyPair, Role, TunnelConfig
from tigertunnel.interfaces import Reactor
from tigertunnel.keys.ring import KeyUse
from tigertunnel.logs import logger
from tigertunnel.net.admission import Admission
from tigertunnel.net.backoff import backoff_policy
from tigertunnel.net.frame_protocol import FrameFactory, FrameProtocol, PrebuiltFactory
from tigertunnel.net.listeners import pair_listener
from tigertunnel.net.outage import OutageReport, PoolOutage
from tigertunnel.net.pairmux import CONNECT_TIMEOUT as CONNECT_TIMEOUT
from tigertunnel.net.pairmux import HANDSHAKE_LOG_BURST as HANDSHAKE_LOG_BURST
from tigertunnel.net.pairmux import HANDSHAKE_LOG_INTERVAL as HANDSHAKE_LOG_INTERVAL
from tigertunnel.net.pairmux import LIMIT_LOG_INTERVAL as LIMIT_LOG_INTERVAL
from tigertunnel.net.pairmux import EndpointFor as EndpointFor
from tigertunnel.net.pairmux import SessionMultiplexer as SessionMultiplexer
from tigertunnel.net.pairmux import target_host as target_host
from tigertunnel.net.pool import PoolSlot
from tigertunnel.net.pool_client import ClientPoolProtocol
from tigertunnel.net.pool_server import ServerPoolProtocol, TunnelFactory
from tigertunnel.net.retire import DRAIN_TIMEOUT
from tigertunnel.net.states import PoolState
from tigertunnel.stats import Reachability, Refusal
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.wire.handshake import (
    EXTENDED_VERSION,
    PROTOCOL_VERSION,
    ClientHandshake,
    HelloReplayCache,
    ReplayCache,
    ServerHandshake,
)

log = logger(__name__)

_ESTABLISHED = PoolState.ESTABLISHED


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

    def new_pool_connection(self, slot: int) -> ClientPoolProtocol:
        """Build the protocol of a new pool connection for ``slot``."""
        self._connection_count += 1
        name = f"{self.name}/{slot}#{self._connection_count}"
        return ClientPoolProtocol(self._make_handshake(), self, name)

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
        # A client pair's pool connections are its own ClientPoolProtocols
        # (new_pool_connection builds them).
        connection = cast(ClientPoolProtocol, healthy[self._rr % len(healthy)])
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
                if _served(victim).read_waiting():
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
            _served(victim).evict()
            victim = admission.victim()

    def handshake_progress(self, connection: TunnelProtocol, count: int) -> None:
        """A pending connection sent ``count`` bytes of its hello."""
        self.admission.data_received(connection, count)

    def handshake_ended(self, connection: TunnelProtocol) -> None:
        """Forget a handshake that is no longer pending."""
        self.pending.pop(connection, None)
        self.admission.connection_done(connection)

    def open_backend(self, connection: ServerPoolProtocol,
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


def _served(connection: TunnelProtocol) -> ServerPoolProtocol:
    """A server pair's pool connection: one its factory built."""
    return cast(ServerPoolProtocol, connection)


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
