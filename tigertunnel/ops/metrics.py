"""Metrics and health over HTTP: Prometheus text at ``/metrics``, JSON at ``/status``.

``--metrics DESCRIPTION`` (a Twisted server endpoint description such as
``tcp:9101:interface=127.0.0.1``) starts an HTTP listener serving:

* ``/metrics`` — the Prometheus exposition (``prometheus_client`` encodes
  it, with content negotiation for OpenMetrics), per proxy pair (label
  ``pair``: what the pair reaches, see
  :func:`~tigertunnel.config.model.label_pairs`): pool connections by
  state and by key id, active sessions, frames and bytes in each
  direction, handshake failures and refused sessions by reason (every
  reason the role knows, from 0), pool connects, reconnects, losses and
  failures, overflowed sessions, backend connect failures and, on a
  server, whether the backend is reachable; plus ``tigertunnel_build_info``,
  the key reload results and the configured key ids, and
  prometheus_client's process metrics. Every name passes ``promtool check
  metrics`` (:mod:`tigertunnel.tools.promlint` checks the same rules).
* ``/status`` — the same figures as JSON (:mod:`tigertunnel.ops.figures`),
  answered with status 503 when a tunnel client's proxy pair has no
  established pool connection (the server is down or refuses us), a tunnel
  server's backend refused its last connect, or the tunnel end is shutting
  down, else 200.

With ``--workers N`` worker 0 serves the sum of every worker's figures,
and the process metrics of each with a ``worker`` label.

Figures are read from the multiplexers' counters in the reactor thread
when a request comes in (prometheus_client's own Twisted resource runs the
collection in a thread pool, which would race with the reactor).
"""

import json
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

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

from tigertunnel import __version__
from tigertunnel.config.model import Role
from tigertunnel.crypto import kem
from tigertunnel.interfaces import Reactor
from tigertunnel.net.listeners import start_listening
from tigertunnel.net.multiplexer import SessionMultiplexer
from tigertunnel.stats import handshake_reasons, refusal_reasons
from tigertunnel.ops.figures import (
    SIMPLE_COUNTERS,
    WorkerProcessCollector,
    WorkerReports,
    counters,
    merge_pair_documents,
    pair_status,
    report_pairs,
    report_tb,
    status,
)
from tigertunnel.ops.reload import KeyReloader
from tigertunnel.ops.tbmetrics import Snapshot, TBCollector, TBRecorder, merge_pair_snapshots
from tigertunnel.ops.tls import ServerTLS
from tigertunnel.wire import implementation

__all__ = ["DIRECTIONS", "build_info", "counters", "pair_status", "status",
           "TunnelCollector", "make_registry", "make_site", "MetricsService"]


def _known(reasons: Sequence[str], counts: Mapping[str, int]) -> Dict[str, int]:
    """``counts`` with every known reason present (0 when it never occurred)."""
    found = {reason: 0 for reason in reasons}
    found.update(counts)
    return found


def _no_workers() -> Mapping[int, Mapping[str, Any]]:
    return {}


#: Directions of traffic, as named in the counters: ``to_tunnel`` = read from
#: the TB side and sent into the tunnel, ``from_tunnel`` = the reverse.
DIRECTIONS = ("to_tunnel", "from_tunnel")


def build_info() -> Dict[str, str]:
    """The labels of ``tigertunnel_build_info``: the version, the data path
    in use (``c`` compiled, ``python``) and the ML-KEM implementation
    (``cryptography`` native, ``kyber-py`` (tests only) or ``none``)."""
    if kem.HAVE_NATIVE_MLKEM:
        mlkem = "cryptography"
    else:
        mlkem = "kyber-py" if kem.kyber_allowed() else "none"
    return {"version": __version__, "datapath": implementation.ACTIVE.name, "mlkem": mlkem}


class TunnelCollector:
    """A prometheus_client collector over the multiplexers' counters.

    :param recorders: the pairs' TB figures (:func:`~tigertunnel.ops.tbmetrics.watch_pairs`).
    :param other_workers: worker 0 of ``--workers N``: the last report of
        each other worker (:func:`~tigertunnel.ops.figures.report_parts`),
        added to this process's figures.
    """

    def __init__(self, muxes: List[SessionMultiplexer],
                 reloader: Optional[KeyReloader],
                 recorders: Sequence[TBRecorder] = (),
                 other_workers: WorkerReports = _no_workers) -> None:
        self.muxes = muxes
        self.reloader = reloader
        self.recorders = list(recorders)
        self.other_workers = other_workers

    def tb_snapshots(self) -> Dict[str, Snapshot]:
        """The TB figures of every recorded pair, by pair name, read now:
        this process's, summed with the last ones the other workers reported."""
        own = {r.pair: r.snapshot() for r in self.recorders}
        others = [report_tb(report) for report in self.other_workers().values()]
        return merge_pair_snapshots([own] + others) if others else own

    def pairs(self) -> List[Dict[str, Any]]:
        """The pair documents, read now (summed over the workers)."""
        own = [pair_status(mux) for mux in self.muxes]
        others = self.other_workers()
        if not others:
            return own
        return merge_pair_documents({0: own, **{index: report_pairs(report)
                                                for index, report in others.items()}})

    def status(self) -> Dict[str, Any]:
        """The ``/status`` document, read now."""
        return status(self.muxes, self.reloader,
                      self.tb_snapshots() if self.recorders else None, self.pairs())

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family, read now."""
        doc = status(self.muxes, self.reloader, pairs=self.pairs())
        role = self.muxes[0].role if self.muxes else Role.CLIENT
        pair = ["pair"]
        info = GaugeMetricFamily("tigertunnel_pair_info", "A proxy pair of this "
                                 "tunnel end.", labels=["pair", "role", "listen",
                                                        "target"])
        healthy = GaugeMetricFamily("tigertunnel_pair_healthy", "1 when the pair "
                                    "can take sessions (a client has an "
                                    "established pool connection; a server's "
                                    "backend took the last connect).", labels=pair)
        reachable = GaugeMetricFamily("tigertunnel_backend_reachable", "1 when the "
                                      "server pair's backend (replica) took the "
                                      "last connect, 0 when it failed.", labels=pair)
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
                  for _, name, text in SIMPLE_COUNTERS}
        known_failures = [r.value for r in handshake_reasons(role)]
        known_refusals = [r.value for r in refusal_reasons(role)]
        for mux, p in zip(self.muxes, doc["pairs"]):
            name = p["name"]
            info.add_metric([name, mux.role.value, p["listen"], p["target"]], 1)
            healthy.add_metric([name], 1 if p["healthy"] else 0)
            backend = p.get("backend")
            if backend is not None and backend["reachable"] is not None:
                reachable.add_metric([name], 1 if backend["reachable"] else 0)
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
            for reason, count in _known(known_failures, p["handshake_failures"]).items():
                failures.add_metric([name, reason], count)
            for reason, count in _known(known_refusals, p["sessions_refused"]).items():
                refused.add_metric([name, reason], count)
            for key, metric, _ in SIMPLE_COUNTERS:
                simple[metric].add_metric([name], p["counters"].get(key, 0))
        labels = build_info()
        build = GaugeMetricFamily("tigertunnel_build_info", "The tunnel's version, "
                                  "data path (c or python) and ML-KEM "
                                  "implementation.", labels=list(labels))
        build.add_metric(list(labels.values()), 1)
        yield build
        yield from (info, healthy, reachable, pool_size, pool, by_key, sessions, frames,
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


def process_collectors() -> List[Any]:
    """This process's process and GC collectors (in a registry of their own)."""
    aside = CollectorRegistry(auto_describe=False)
    return [ProcessCollector(registry=aside), GCCollector(registry=aside)]


def make_registry(collector: TunnelCollector, process_metrics: bool = True,
                  per_worker: bool = False) -> CollectorRegistry:
    """A registry of our collector (plus process, platform and GC metrics).

    :param per_worker: worker 0 of ``--workers N``: the process and GC
        metrics of every worker, with a ``worker`` label.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if collector.recorders:
        registry.register(TBCollector(collector.tb_snapshots))
    if process_metrics:
        PlatformCollector(registry=registry)
        if per_worker:
            registry.register(WorkerProcessCollector(process_collectors(),
                                                     collector.other_workers))
        else:
            for each in process_collectors():
                registry.register(each)
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
              other_workers: Optional[WorkerReports] = None) -> Site:
    """The HTTP site serving ``/metrics`` and ``/status``.

    :param other_workers: worker 0 of ``--workers N``: the last reports of
        the other worker processes (summed with this process's figures).
    """
    collector = TunnelCollector(muxes, reloader, recorders,
                                other_workers or _no_workers)
    root = Resource()
    root.putChild(b"metrics", MetricsPage(make_registry(
        collector, per_worker=other_workers is not None)))
    root.putChild(b"status", StatusPage(collector))
    return MetricsSite(root)


class MetricsService(MultiService):
    """The listener of ``--metrics DESCRIPTION``: HTTP, or HTTPS with ``tls``
    (``--metrics-tls-*``, :mod:`tigertunnel.ops.tls`).

    A port that cannot be bound is fatal at start-up, as for the tunnel's
    own listeners (:class:`~tigertunnel.errors.ListenError`, one line naming the endpoint).
    """

    def __init__(self, description: str, muxes: List[SessionMultiplexer],
                 reloader: Optional[KeyReloader], reactor: Reactor,
                 recorders: Sequence[TBRecorder] = (),
                 other_workers: Optional[WorkerReports] = None,
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
