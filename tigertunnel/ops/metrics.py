"""Metrics and health over HTTP: Prometheus text at ``/metrics``, JSON at ``/status``.

``--metrics DESCRIPTION`` (a Twisted server endpoint description such as
``tcp:9101:interface=127.0.0.1``) starts an HTTP listener serving:

* ``/metrics`` — the Prometheus exposition (``prometheus_client`` encodes
  it, with content negotiation for OpenMetrics), per proxy pair (label
  ``pair``): pool connections by state and by key id, active sessions,
  frames and bytes in each direction, handshake failures by reason, pool
  connects, reconnects, losses and failures, refused and overflowed
  sessions, backend connect failures; plus the key reload results and the
  configured key ids, and prometheus_client's process metrics.
* ``/status`` — the same figures as JSON, answered with status 503 when a
  tunnel client's proxy pair has no established pool connection (the server
  is down or refuses us) or the tunnel end is shutting down, else 200.

Figures are read from the multiplexers' counters in the reactor thread
when a request comes in (prometheus_client's own Twisted resource runs the
collection in a thread pool, which would race with the reactor).
"""

import json
from collections import Counter
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.interfaces import IProtocolFactory, IReactorCore
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tigertunnel.config.model import Role
from tigertunnel.interfaces import Reactor
from tigertunnel.net.listeners import start_listening
from tigertunnel.net.multiplexer import (
    ClientMultiplexer,
    ServerMultiplexer,
    SessionMultiplexer,
)
from tigertunnel.net.stats import Stats
from tigertunnel.ops.reload import KeyReloader
from tigertunnel.ops.tbmetrics import Snapshot, TBCollector, TBRecorder, merge_pair_snapshots
from tigertunnel.ops.tls import ServerTLS

#: Directions of traffic, as named in the counters: ``to_tunnel`` = read from
#: the TB side and sent into the tunnel, ``from_tunnel`` = the reverse.
DIRECTIONS = ("to_tunnel", "from_tunnel")

_SIMPLE_COUNTERS = (
    # (Stats attribute, metric name, help)
    ("sessions_opened", "sessions_opened", "Sessions (streams) opened."),
    ("sessions_overflowed", "sessions_overflowed",
     "Sessions closed because their TB peer stopped reading."),
    ("pool_connects", "pool_connects",
     "Pool connections established (handshake completed)."),
    ("pool_reconnects", "pool_reconnects",
     "Pool connections re-established by a pool slot that was up before."),
    ("pool_losses", "pool_losses", "Established pool connections lost."),
    ("pool_failures", "pool_failures",
     "Pool connections closed for a protocol or authentication error."),
    ("handshake_evictions", "handshake_evictions",
     "Pending handshakes dropped because too many were pending."),
    ("backend_connect_failures", "backend_connect_failures",
     "Backend (replica) connections that could not be made."),
)


#: Names of the /status ``counters`` entries that differ from the Stats
#: attribute.
_COUNTER_NAMES = {"pool_failures": "link_failures"}


def counters(stats: Stats) -> Dict[str, int]:
    """Every counter that moved, by name, sorted (the /status ``counters``):
    the plain counters, ``handshake_failures_<reason>`` and
    ``sessions_refused_<reason>``."""
    flat: Dict[str, int] = {}
    for attribute in ("frames_to_tunnel", "bytes_to_tunnel",
                      "frames_from_tunnel", "bytes_from_tunnel",
                      *(key for key, _, _ in _SIMPLE_COUNTERS)):
        value = getattr(stats, attribute)
        if value:
            flat[_COUNTER_NAMES.get(attribute, attribute)] = value
    for reason, count in stats.handshake_failures.items():
        if count:
            flat[f"handshake_failures_{reason.value}"] = count
    for why, count in stats.sessions_refused.items():
        if count:
            flat[f"sessions_refused_{why.value}"] = count
    return dict(sorted(flat.items()))


def _by_reason(counts: "Counter[Any]") -> Dict[str, int]:
    """``{label: count}`` of the reasons that occurred, sorted by label."""
    return {reason.value: count for reason, count
            in sorted(counts.items(), key=lambda item: item[0].value) if count}


def pair_status(mux: SessionMultiplexer) -> Dict[str, Any]:
    """The figures of one proxy pair (the ``/status`` JSON of that pair)."""
    stats = mux.stats
    established = [c for c in mux.pool_connections if c.established]
    draining = [c for c in established if c in mux.draining]
    by_key: Dict[str, int] = {}
    for connection in established:
        key = str(connection.key_id) if connection.key_id is not None else "none"
        by_key[key] = by_key.get(key, 0) + 1
    client = isinstance(mux, ClientMultiplexer)
    handshaking = 0
    if isinstance(mux, ClientMultiplexer):
        handshaking = sum(1 for slot in mux.pool
                          if slot.connection is not None
                          and not slot.connection.established)
    elif isinstance(mux, ServerMultiplexer):
        handshaking = len(mux.pending)
    pool: Dict[str, Any] = {
        "healthy": len(established) - len(draining),
        "draining": len(draining),
        "handshaking": handshaking,
    }
    if client:
        pool["size"] = mux.config.pool_size
    return {
        "name": mux.name,
        "listen": str(mux.pair.listen),
        "target": str(mux.pair.target),
        # A server has no pool of its own: it is healthy while it listens.
        "healthy": bool(established) if client else not mux.stopping,
        "pool": pool,
        "links": [{"name": connection.name, "key_id": connection.key_id,
                   "sessions": len(connection.streams),
                   "state": "draining" if connection in mux.draining else "healthy"}
                  for connection in established],
        "key_ids": by_key,
        "sessions": len(mux.sessions),
        "sessions_opened": stats.sessions_opened,
        "frames": {"to_tunnel": stats.frames_to_tunnel,
                   "from_tunnel": stats.frames_from_tunnel},
        "bytes": {"to_tunnel": stats.bytes_to_tunnel,
                  "from_tunnel": stats.bytes_from_tunnel},
        "handshake_failures": _by_reason(stats.handshake_failures),
        "sessions_refused": _by_reason(stats.sessions_refused),
        "reconnects": stats.pool_reconnects,
        "counters": counters(stats),
    }


def status(muxes: List[SessionMultiplexer],
           reloader: Optional[KeyReloader],
           tb: Optional[Mapping[str, Snapshot]] = None) -> Dict[str, Any]:
    """The whole ``/status`` document (JSON-serialisable).

    :param tb: the TB figures of each pair by pair name (``"tb"`` of that
        pair's entry), when the tunnel end records them.
    """
    role = muxes[0].role.value if muxes else ""
    config = muxes[0].config if muxes else None
    keys: Dict[str, Any] = {"psk": None, "kem": None}
    if config is not None and config.psk is not None:
        ids = config.psk.ids()
        keys["psk"] = ids[:1] if config.role is Role.CLIENT else ids
        if config.kem_public is not None:
            keys["kem"] = [config.kem_public[0]]
        elif config.kem_secret is not None:
            keys["kem"] = config.kem_secret.ids()
    pairs = [pair_status(mux) for mux in muxes]
    if tb is not None:
        for pair in pairs:
            if pair["name"] in tb:
                pair["tb"] = tb[pair["name"]]
    stopping = any(mux.stopping for mux in muxes)
    return {
        "role": role,
        "healthy": bool(pairs) and all(p["healthy"] for p in pairs) and not stopping,
        "stopping": stopping,
        "keys": keys,
        "reload": reloader.status() if reloader is not None else None,
        "pairs": pairs,
    }


class TunnelCollector:
    """A prometheus_client collector over the multiplexers' counters.

    :param recorders: the pairs' TB figures (:func:`~tigertunnel.ops.tbmetrics.watch_pairs`).
    """

    def __init__(self, muxes: List[SessionMultiplexer],
                 reloader: Optional[KeyReloader],
                 recorders: Sequence[TBRecorder] = (),
                 other_workers: Callable[[], Iterable[Mapping[str, Snapshot]]] = tuple
                 ) -> None:
        self.muxes = muxes
        self.reloader = reloader
        self.recorders = list(recorders)
        self.other_workers = other_workers

    def tb_snapshots(self) -> Dict[str, Snapshot]:
        """The TB figures of every recorded pair, by pair name, read now:
        this process's, summed with the last ones the other workers reported."""
        own = {r.pair: r.snapshot() for r in self.recorders}
        others = list(self.other_workers())
        return merge_pair_snapshots([own] + others) if others else own

    def status(self) -> Dict[str, Any]:
        """The ``/status`` document, read now."""
        return status(self.muxes, self.reloader,
                      self.tb_snapshots() if self.recorders else None)

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family, read now."""
        doc = status(self.muxes, self.reloader)
        pair = ["pair"]
        info = GaugeMetricFamily("tigertunnel_pair_info", "A proxy pair of this "
                                 "tunnel end.", labels=["pair", "role", "listen",
                                                        "target"])
        healthy = GaugeMetricFamily("tigertunnel_pair_healthy", "1 when the pair "
                                    "can take sessions (a client has an "
                                    "established pool connection).", labels=pair)
        pool_size = GaugeMetricFamily("tigertunnel_pool_size", "Configured pool "
                                      "connections (-n) of a client pair.",
                                      labels=pair)
        pool = GaugeMetricFamily("tigertunnel_pool_connections", "Pool "
                                 "connections by state.", labels=["pair", "state"])
        by_key = GaugeMetricFamily("tigertunnel_pool_connections_by_key",
                                   "Established pool connections by PSK key id.",
                                   labels=["pair", "key_id"])
        sessions = GaugeMetricFamily("tigertunnel_sessions", "Active sessions "
                                     "(streams).", labels=pair)
        frames = CounterMetricFamily("tigertunnel_frames", "TB frames forwarded "
                                     "(to_tunnel: read from the TB side; "
                                     "from_tunnel: written to it).",
                                     labels=["pair", "direction"])
        octets = CounterMetricFamily("tigertunnel_bytes", "TB frame bytes "
                                     "forwarded, by direction.",
                                     labels=["pair", "direction"])
        failures = CounterMetricFamily("tigertunnel_handshake_failures",
                                       "Failed pool-connection handshakes by "
                                       "reason.", labels=["pair", "reason"])
        refused = CounterMetricFamily("tigertunnel_sessions_refused", "Sessions "
                                      "or streams refused, by reason.",
                                      labels=["pair", "reason"])
        simple = {name: CounterMetricFamily(f"tigertunnel_{name}", text,
                                            labels=pair)
                  for _, name, text in _SIMPLE_COUNTERS}
        for mux, p in zip(self.muxes, doc["pairs"]):
            name = p["name"]
            info.add_metric([name, mux.role.value, p["listen"], p["target"]], 1)
            healthy.add_metric([name], 1 if p["healthy"] else 0)
            if "size" in p["pool"]:
                pool_size.add_metric([name], p["pool"]["size"])
            for state in ("healthy", "draining", "handshaking"):
                pool.add_metric([name, state], p["pool"][state])
            for key_id, count in p["key_ids"].items():
                by_key.add_metric([name, key_id], count)
            sessions.add_metric([name], p["sessions"])
            for d in DIRECTIONS:
                frames.add_metric([name, d], p["frames"][d])
                octets.add_metric([name, d], p["bytes"][d])
            for reason, count in p["handshake_failures"].items():
                failures.add_metric([name, reason], count)
            for reason, count in p["sessions_refused"].items():
                refused.add_metric([name, reason], count)
            for key, metric, _ in _SIMPLE_COUNTERS:
                simple[metric].add_metric([name], getattr(mux.stats, key))
        yield from (info, healthy, pool_size, pool, by_key, sessions, frames,
                    octets, failures, refused, *simple.values())
        yield from self._keys_and_reloads(doc)

    def _keys_and_reloads(self, doc: Dict[str, Any]) -> Iterator[Metric]:
        keys = GaugeMetricFamily("tigertunnel_key_info", "Key ids in use: the "
                                 "client's first PSK, every PSK a server "
                                 "accepts, KEM key ids.", labels=["kind", "key_id"])
        for kind in ("psk", "kem"):
            for key_id in doc["keys"][kind] or ():
                keys.add_metric([kind, str(key_id)], 1)
        yield keys
        reload = doc["reload"]
        if reload is None:
            return
        results = CounterMetricFamily("tigertunnel_key_reloads", "Key reloads "
                                      "(SIGHUP) by result.", labels=["result"])
        for result in ("ok", "error"):
            results.add_metric([result], reload["results"][result])
        yield results
        if reload["time"] is not None:
            yield GaugeMetricFamily("tigertunnel_key_reload_last_timestamp_seconds",
                                    "Unix time of the last key reload.",
                                    value=reload["time"])
            yield GaugeMetricFamily("tigertunnel_key_reload_last_success",
                                    "1 if the last key reload succeeded.",
                                    value=1 if reload["ok"] else 0)


def make_registry(collector: TunnelCollector,
                  process_metrics: bool = True) -> CollectorRegistry:
    """A registry of our collector (plus process, platform and GC metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if collector.recorders:
        registry.register(TBCollector(collector.tb_snapshots))
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """``/metrics``: the Prometheus exposition of a registry."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        request.setHeader("Content-Type", content_type)
        return encoder(self.registry)


class StatusPage(Resource):
    """``/status``: JSON, 503 when unhealthy."""

    isLeaf = True

    def __init__(self, collector: TunnelCollector) -> None:
        super().__init__()
        self.collector = collector

    def render_GET(self, request: Request) -> bytes:
        doc = self.collector.status()
        request.setResponseCode(200 if doc["healthy"] else 503)
        request.setHeader("Content-Type", "application/json")
        return json.dumps(doc, indent=1).encode() + b"\n"


class MetricsSite(Site):
    """A Site that does not log every scrape."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def make_site(muxes: List[SessionMultiplexer],
              reloader: Optional[KeyReloader],
              recorders: Sequence[TBRecorder] = (),
              other_workers: Callable[[], Iterable[Mapping[str, Snapshot]]] = tuple
              ) -> Site:
    """The HTTP site serving ``/metrics`` and ``/status``.

    :param other_workers: the TB figures the other worker processes of
        ``--workers N`` reported last (summed with this process's).
    """
    collector = TunnelCollector(muxes, reloader, recorders, other_workers)
    root = Resource()
    root.putChild(b"metrics", MetricsPage(make_registry(collector)))
    root.putChild(b"status", StatusPage(collector))
    return MetricsSite(root)


class MetricsService(MultiService):
    """The listener of ``--metrics DESCRIPTION``: HTTP, or HTTPS with ``tls``
    (``--metrics-tls-*``, :mod:`tigertunnel.ops.tls`).

    A port that cannot be bound is fatal at start-up, as for the tunnel's
    own listeners (:class:`ListenError`, one line naming the endpoint).
    """

    def __init__(self, description: str, muxes: List[SessionMultiplexer],
                 reloader: Optional[KeyReloader], reactor: Reactor,
                 recorders: Sequence[TBRecorder] = (),
                 other_workers: Callable[[], Iterable[Mapping[str, Snapshot]]] = tuple,
                 tls: Optional[ServerTLS] = None) -> None:
        super().__init__()
        self.description = description
        self.site = make_site(muxes, reloader, recorders, other_workers)
        # With TLS the site is served inside TLSMemoryBIOProtocol, on any
        # endpoint (tcp:, unix:, a systemd: socket).
        factory: IProtocolFactory = self.site
        if tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory  # needs pyOpenSSL
            factory = TLSMemoryBIOFactory(tls.options(), False, self.site)
        strports.service(description, factory,
                         reactor=IReactorCore(reactor)).setServiceParent(self)

    def privilegedStartService(self) -> None:
        start_listening(super().privilegedStartService,
                        f"metrics endpoint {self.description}")

    def startService(self) -> None:
        start_listening(super().startService,
                        f"metrics endpoint {self.description}")
