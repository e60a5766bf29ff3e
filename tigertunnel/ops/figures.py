"""What a tunnel end reports: the ``/status`` document, and its sum over ``--workers``.

:func:`pair_status` reads one proxy pair's figures (pool connections,
sessions, counters, handshake failures and refusals by reason, backend
reachability on a server) into a JSON-able document; :func:`status` makes
the whole ``/status`` document of a tunnel end. Key ids are strings
everywhere in it: they are u64 values, above the 2^53 that a JSON number
carries exactly in JavaScript or ``jq``.

With ``--workers N`` each worker sends worker 0, every
:data:`FIGURES_INTERVAL` seconds over its log pipe, its *report* in parts
(:func:`report_parts`, one log line each): each pair's document and TB
snapshot, and its process metrics' samples. Worker 0 adds the reports up
(:func:`merge_pair_documents`): counts add (pool connections, sessions,
frames, bytes, failures), a pair is healthy when it is healthy in every
worker, each pool connection is listed with its ``worker``, and the backend
record is the most recent. The process metrics are not summed: worker 0
serves them with a ``worker`` label (:class:`WorkerProcessCollector`),
since a sum of start times or file-descriptor limits means nothing.
"""

from collections import Counter
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence)

from prometheus_client.core import Metric
from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime

from tigertunnel.config.model import Role
from tigertunnel.net.multiplexer import SessionMultiplexer
from tigertunnel.net.pairstatus import PairStatus
from tigertunnel.stats import Stats
from tigertunnel.ops.reload import KeyReloader
from tigertunnel.ops.tbmetrics import Snapshot, TBRecorder

__all__ = ["SIMPLE_COUNTERS", "counters", "pair_status", "render_pair", "status", "report_parts",
           "report_pairs", "report_tb", "report_process",
           "merge_pair_documents", "FIGURES_INTERVAL", "figures_reporter",
           "WorkerProcessCollector", "WorkerReports"]

#: What worker 0 knows of the other workers: their last reports by index.
WorkerReports = Callable[[], Mapping[int, Mapping[str, Any]]]

SIMPLE_COUNTERS = (
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

#: Former names of /status ``counters`` entries, listed as well (with the
#: same value) for this release only: ``link_failures`` is ``pool_failures``.
COUNTER_ALIASES = {"pool_failures": "link_failures"}


def counters(stats: Stats) -> Dict[str, int]:
    """Every counter that moved, by name, sorted (the /status ``counters``):
    the plain counters (under the Stats attribute's name, and a former
    name of :data:`COUNTER_ALIASES` too), ``handshake_failures_<reason>``
    and ``sessions_refused_<reason>``."""
    flat: Dict[str, int] = {}
    for attribute in ("frames_to_tunnel", "bytes_to_tunnel",
                      "frames_from_tunnel", "bytes_from_tunnel",
                      *(key for key, _, _ in SIMPLE_COUNTERS)):
        value = getattr(stats, attribute)
        if value:
            flat[attribute] = value
            if attribute in COUNTER_ALIASES:
                flat[COUNTER_ALIASES[attribute]] = value
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
    """The figures of one proxy pair (the ``/status`` JSON of that pair),
    rendered from its :meth:`~tigertunnel.net.pairmux.SessionMultiplexer.snapshot`.

    ``name`` is the pair's label (what it reaches: ``replica2``, a ``-p``
    ``name=``, or the target address), as in the metrics' ``pair`` label.
    The established pool connections are listed under ``pool_connections``
    and, the same list, under ``links`` (the key's former name, kept for
    one release).
    """
    return render_pair(mux.snapshot())


def render_pair(snap: PairStatus) -> Dict[str, Any]:
    """The ``/status`` document of one pair's :class:`~tigertunnel.net.pairstatus.PairStatus`."""
    stats = snap.stats
    by_key: Dict[str, int] = {}
    for connection in snap.pool_connections:
        key = str(connection.key_id) if connection.key_id is not None else "none"
        by_key[key] = by_key.get(key, 0) + 1
    draining = snap.draining
    pool: Dict[str, Any] = {
        "healthy": len(snap.pool_connections) - draining,
        "draining": draining,
        "handshaking": snap.handshaking,
    }
    doc: Dict[str, Any] = {"name": snap.label, "listen": snap.listen,
                           "target": snap.target, "healthy": snap.healthy}
    backend = snap.backend
    if backend is not None:
        doc["backend"] = {"reachable": backend.reachable, "checked": backend.checked,
                          "error": backend.error or None}
    if snap.pool_size is not None:
        pool["size"] = snap.pool_size
    connections = [{"name": c.name,
                    "key_id": None if c.key_id is None else str(c.key_id),
                    "sessions": c.sessions, "state": c.state}
                   for c in snap.pool_connections]
    doc.update({
        "pool": pool,
        "pool_connections": connections,
        "links": connections,
        "key_ids": by_key,
        "sessions": snap.sessions,
        "sessions_opened": stats.sessions_opened,
        "frames": {"to_tunnel": stats.frames_to_tunnel,
                   "from_tunnel": stats.frames_from_tunnel},
        "bytes": {"to_tunnel": stats.bytes_to_tunnel,
                  "from_tunnel": stats.bytes_from_tunnel},
        "handshake_failures": _by_reason(stats.handshake_failures),
        "sessions_refused": _by_reason(stats.sessions_refused),
        "reconnects": stats.pool_reconnects,
        "counters": counters(stats),
    })
    return doc


def _merge(a: Any, b: Any) -> Any:
    """``a`` and ``b`` added up: numbers add, flags and, mappings key by key,
    lists concatenate, other values keep the first one set."""
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return a + b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if "reachable" in a and "checked" in a:  # a backend record: the newest
            return a if (b.get("checked") or 0) <= (a.get("checked") or 0) else b
        merged = dict(a)
        for key, value in b.items():
            merged[key] = _merge(a[key], value) if key in a else value
        return merged
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    return a if a is not None else b


def merge_pair_documents(workers: Mapping[int, Sequence[Mapping[str, Any]]]
                         ) -> List[Dict[str, Any]]:
    """Add up the pair documents of several workers, pair by pair (by name).

    :param workers: each worker's :func:`pair_status` documents, by worker
        index; the order of pairs is that of the lowest index.
    :returns: one document per pair; each pool connection
        (``pool_connections``, and the same under ``links``) carries the
        index of its ``worker``.
    """
    merged: Dict[str, Dict[str, Any]] = {}
    serving: Dict[str, bool] = {}
    for index in sorted(workers):
        for doc in workers[index]:
            tagged = dict(doc)
            listed = doc.get("pool_connections") or doc.get("links") or ()
            tagged["pool_connections"] = [dict(c, worker=index) for c in listed]
            tagged["links"] = tagged["pool_connections"]
            name = doc.get("name")
            if not isinstance(name, str):
                continue
            merged[name] = _merge(merged[name], tagged) if name in merged else tagged
            backend = doc.get("backend")
            if isinstance(backend, Mapping):
                # A server pair: healthy unless stopping or its backend is
                # down, which only the newest record says.
                serving[name] = serving.get(name, True) and bool(
                    doc.get("healthy") or backend.get("reachable") is False)
    for name, up in serving.items():
        merged[name]["healthy"] = up and merged[name]["backend"].get("reachable") is not False
    return list(merged.values())


def _key_ids(ids: Iterable[int]) -> List[str]:
    return [str(key_id) for key_id in ids]


def status(muxes: List[SessionMultiplexer],
           reloader: Optional[KeyReloader],
           tb: Optional[Mapping[str, Snapshot]] = None,
           pairs: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The whole ``/status`` document (JSON-serialisable).

    :param tb: the TB figures of each pair by pair name (``"tb"`` of that
        pair's entry), when the tunnel end records them.
    :param pairs: the pair documents to show (worker 0: the sum over the
        workers); those of ``muxes`` by default.
    """
    role = muxes[0].role.value if muxes else ""
    ring = muxes[0].keyring if muxes else None
    keys: Dict[str, Any] = {"psk": None, "kem": None}
    if ring is not None and ring.psk is not None:
        ids = ring.psk.ids()
        keys["psk"] = _key_ids(ids[:1] if muxes[0].role is Role.CLIENT else ids)
        if ring.kem_public is not None:
            keys["kem"] = _key_ids([ring.kem_public[0]])
        elif ring.kem_secret is not None:
            keys["kem"] = _key_ids(ring.kem_secret.ids())
    if pairs is None:
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


def process_samples(collectors: Iterable[Any]) -> Dict[str, List[List[Any]]]:
    """The samples of ``collectors`` (process and GC metrics) as JSON:
    ``{family name: [[sample name, labels, value], ...]}``."""
    found: Dict[str, List[List[Any]]] = {}
    for collector in collectors:
        for family in collector.collect():
            found.setdefault(family.name, []).extend(
                [s.name, dict(s.labels), s.value] for s in family.samples)
    return found


class WorkerProcessCollector:
    """Worker 0's process and GC metrics: its own and the other workers'
    last reported samples, each with a ``worker`` label.

    :param collectors: this process's collectors (not registered anywhere).
    :param others: the other workers' reports (their ``process`` samples).
    """

    def __init__(self, collectors: Sequence[Any], others: WorkerReports) -> None:
        self.collectors = list(collectors)
        self.others = others

    def collect(self) -> Iterator[Metric]:
        """Yield every family of the collectors, with every worker's samples."""
        reports = self.others()
        for collector in self.collectors:
            for family in collector.collect():
                labelled = Metric(family.name, family.documentation, family.type,
                                  family.unit)
                for sample in family.samples:
                    labelled.add_sample(sample.name, dict(sample.labels, worker="0"),
                                        sample.value)
                for index in sorted(reports):
                    samples = report_process(reports[index]).get(family.name)
                    for name, labels, value in samples or ():
                        labelled.add_sample(name, dict(labels, worker=str(index)),
                                            float(value))
                yield labelled


#: The key of a pair's part in a worker's report (then the pair's name).
PAIR_PART = "pair "
#: The key of the process samples' part.
PROCESS_PART = "process"


def report_parts(muxes: Sequence[SessionMultiplexer], recorders: Sequence[TBRecorder],
                 process: Iterable[Any] = ()) -> List[Dict[str, Any]]:
    """What a worker tells worker 0, in parts small enough for one log line
    each (a worker's log pipe cuts lines at 64 KiB; a pair's part is a few
    KiB): ``{"pair NAME": {"status": pair document, "tb": snapshot or
    None}}`` per pair, then ``{"process": process_samples(process)}``.

    Worker 0 keeps the parts of each worker in one dict (a later part
    replaces the one with the same key): its *report*.
    """
    snapshots = {r.pair: r for r in recorders}
    parts: List[Dict[str, Any]] = []
    for mux in muxes:
        recorder = snapshots.get(mux.pair_label)
        parts.append({PAIR_PART + mux.pair_label: {
            "status": pair_status(mux),
            "tb": recorder.snapshot() if recorder is not None else None}})
    parts.append({PROCESS_PART: process_samples(process)})
    return parts


def report_pairs(report: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The pair documents of a worker's report."""
    return [part["status"] for key, part in report.items()
            if key.startswith(PAIR_PART) and isinstance(part, Mapping)]


def report_tb(report: Mapping[str, Any]) -> Dict[str, Snapshot]:
    """The TB snapshots of a worker's report, by pair name."""
    return {key[len(PAIR_PART):]: part["tb"] for key, part in report.items()
            if key.startswith(PAIR_PART) and isinstance(part, Mapping)
            and part.get("tb") is not None}


def report_process(report: Mapping[str, Any]) -> Mapping[str, Any]:
    """The process samples of a worker's report."""
    samples = report.get(PROCESS_PART)
    return samples if isinstance(samples, Mapping) else {}


#: Seconds between two reports of a worker to worker 0 (so worker 0's
#: /metrics and /status lag the other workers by at most this).
FIGURES_INTERVAL = 2.0


def figures_reporter(muxes: Sequence[SessionMultiplexer], recorders: Sequence[TBRecorder],
                     clock: IReactorTime, process: Sequence[Any] = (),
                     report: "Callable[[Dict[str, Any]], None] | None" = None
                     ) -> TimerService:
    """In a worker of ``--workers N``: a service sending the parts of its
    report (:func:`report_parts`) to worker 0 every :data:`FIGURES_INTERVAL`
    seconds (over its log pipe)."""
    if report is None:
        from tigertunnel.ops.workers.logpipe import report_figures
        report = report_figures
    send = report

    def tick() -> None:
        for part in report_parts(muxes, recorders, process):
            send(part)

    service = TimerService(FIGURES_INTERVAL, tick)
    service.clock = clock
    return service
