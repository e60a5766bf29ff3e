"""SessionMultiplexer: what the multiplexers of both tunnel ends share.

The multiplexer of a proxy pair joins its sessions and pool connections
(:mod:`~tigertunnel.net.multiplexer` has the client's and the server's).
This base keeps the pair's established pool connections, its sessions and
counters, logs failed handshakes and limits at a bounded rate, owns the
retirement of pool connections after a key reload
(:meth:`SessionMultiplexer.retire_outdated`, :mod:`~tigertunnel.net.retire`)
and reports the pair as a typed :class:`~tigertunnel.net.pairstatus.PairStatus`
(:meth:`SessionMultiplexer.snapshot`); the operations layer uses only those.
"""

import ipaddress
from typing import Any, Callable, List, Optional, Set

from twisted.application.service import MultiService
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
from tigertunnel.net.frame_protocol import FrameProtocol
from tigertunnel.net.listeners import ListenerService, start_listening
from tigertunnel.net.pairstatus import PairStatus, PoolConnectionStatus
from tigertunnel.net.retire import RETIRE_GRACE, Retirements
from tigertunnel.stats import HandshakeFailure, Reachability, Refusal, Stats
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.keys.ring import KeyUse
from tigertunnel.wire.tbwatch import TBWatch

#: Seconds allowed for a TCP connect (pool connection or backend).
CONNECT_TIMEOUT = 10.0
#: Minimum seconds between two "limit reached" log lines of one kind on one pair.
LIMIT_LOG_INTERVAL = 10.0
#: "Handshake failed" log lines of one pair: at most HANDSHAKE_LOG_BURST
#: per HANDSHAKE_LOG_INTERVAL seconds.
HANDSHAKE_LOG_INTERVAL = 10.0
#: Failed handshakes logged per pair and interval.
HANDSHAKE_LOG_BURST = 5

log = logger(__name__)


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
        """The configured cluster id, 0 when none (docs/protocol.rst §7.6)."""
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
        still current for this tunnel end (see :class:`~tigertunnel.keys.ring.KeyRing`)."""
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
