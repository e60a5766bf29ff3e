"""TigerBeetle-aware metrics of a proxy pair: the Prometheus families, the /status snapshot.

A :class:`TBRecorder` per proxy pair owns the pair's
:class:`~tigertunnel.wire.tbwatch.TBWatch` (fed every TB frame header) and
receives its events: completed requests go into a latency histogram per
operation, evictions are counted and logged at warning level, a rise of the
view in replies is logged once, cluster mismatches are counted.

Families (label ``pair`` on each):

``tigertunnel_tigerbeetle_request_duration_seconds{operation}`` (histogram)
    from the first time a request was seen to its first reply;
    :data:`BUCKETS` run from 100 µs to 10 s.
``tigertunnel_tigerbeetle_requests_total{operation}``
    ``request`` frames forwarded, resent and hedged copies included (a
    client of a cluster sends each request to the primary and a backup), so
    it is at least the histogram's count; ``op_<n>`` for unknown numbers.
``tigertunnel_tigerbeetle_frames_total{command,direction}``
    every TB frame by command (``request``, ``reply``, ``ping``,
    ``prepare`` ... ``cmd_<n>``) and direction (``to_tunnel``,
    ``from_tunnel``).
``tigertunnel_tigerbeetle_evictions_total{reason}``
    every reason TB 0.17 names, at 0 until its first eviction.
``tigertunnel_tigerbeetle_cluster_mismatch_total``
    frames whose cluster id is not the configured one.
``tigertunnel_tigerbeetle_view`` (gauge)
    the highest view seen in replies, absent before the first reply.

The families are rendered from :meth:`TBRecorder.snapshot` documents, the
JSON-able form that ``/status`` shows under each pair's ``tb`` key (and
``tigertunnel status`` reads). With ``--workers N`` each worker
sends its snapshots to worker 0 (:mod:`tigertunnel.ops.figures`), which
adds them up with
:func:`merge_pair_snapshots` / :func:`merge_snapshots` (counters and
histogram buckets add, the view is the highest) and renders the sum:
p50 and p99 are recomputed from the summed buckets, never averaged.
"""

from __future__ import annotations

import bisect
import time
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Protocol, Sequence, Tuple)

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.utils import floatToGoString

from tigertunnel.logs import LogRateLimit, logger
from tigertunnel.wire.tbheader import (COMMAND_NAMES, EVICTION_REASON_NAMES,
                                       EVICTION_REASONS, OPERATION_NAMES)
from tigertunnel.wire.tbwatch import DIRECTIONS, InFlight, TBWatch

__all__ = ["BUCKETS", "TBRecorder", "quantile", "merge_snapshots",
           "merge_pair_snapshots", "tb_families", "TBCollector"]

#: Upper bounds (seconds) of the latency buckets, ``+Inf`` implied. A TB
#: request takes from about 100 µs (a lookup on an idle local replica) to
#: seconds (a full batch behind a view change, or a slow disk).
BUCKETS: Tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# prometheus_client's own spelling of a bucket bound ("0.0001", "1.0"); untyped.
_le: Callable[[float], str] = floatToGoString

#: A JSON-able snapshot of one proxy pair (see :meth:`TBRecorder.snapshot`).
Snapshot = Dict[str, Any]


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> Optional[float]:
    """Estimate quantile ``q`` from histogram buckets, as PromQL's ``histogram_quantile``.

    :param q: in 0 ... 1.
    :param bounds: the finite upper bounds, ascending.
    :param counts: observations per bucket (not cumulative), one more than
        ``bounds`` (the last is ``+Inf``).
    :returns: linear interpolation inside the bucket holding rank
        ``q * total`` (from 0 below the first bound); the highest finite
        bound if that bucket is ``+Inf``; ``None`` without observations.
    :raises ValueError: if ``q`` is outside 0 ... 1 or the lengths disagree.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside 0..1")
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"{len(counts)} bucket counts for {len(bounds)} bounds "
                         f"(need {len(bounds) + 1})")
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for i, count in enumerate(counts):
        if count and below + count >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / count
        below += count
    return bounds[-1]  # not reached: rank <= total


log = logger(__name__)

#: Minimum seconds between two eviction warnings of one pair; the next one
#: says how many evictions were not logged in between.
EVICTION_LOG_INTERVAL = 10.0


class TBRecorder:
    """The TB-aware figures of one proxy pair (the events of its
    :class:`~tigertunnel.wire.tbwatch.TBWatch`).

    Feed it frames with ``recorder.watch.frame(direction, header, now)``.
    """

    def __init__(self, pair: str, in_flight: "InFlight | None" = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """
        :param pair: the proxy pair's name (label ``pair``).
        :param in_flight: the waiting-request table shared by the pairs of
            this tunnel end (a private one if ``None``).
        :param clock: seconds, for the eviction warnings' rate limit.
        """
        self.pair = pair
        self._clock = clock
        self._eviction_log = LogRateLimit(EVICTION_LOG_INTERVAL)
        self.watch = TBWatch(self, in_flight)
        #: Completed requests per operation number: bucket counts
        #: (``len(BUCKETS) + 1``, not cumulative) and the sum of durations.
        self.latency: Dict[int, List[int]] = {}
        self.latency_sum: Dict[int, float] = {}
        self.evictions: Dict[int, int] = {}
        self.cluster_mismatches = 0

    # TBEvents

    def request_done(self, operation: int, seconds: float) -> None:
        """Count a completed request in its operation's histogram."""
        if seconds < 0.0:
            seconds = 0.0  # the wall clock stepped back
        counts = self.latency.get(operation)
        if counts is None:
            counts = self.latency[operation] = [0] * (len(BUCKETS) + 1)
            self.latency_sum[operation] = 0.0
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum[operation] += seconds

    def evicted(self, client: int, reason: int, replica: int) -> None:
        """Count an eviction and log it: the evicted client's requests now fail."""
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        unlogged = self._eviction_log.allow(self._clock())
        if unlogged is None:
            return
        log.warn("pair {pair}: TB replica {replica} evicted client {client}: "
                      "{reason}{more}", pair=self.pair, replica=replica,
                      client=client, reason=EVICTION_REASON_NAMES[reason],
                      more=f" ({unlogged} more evictions since the last line)"
                      if unlogged else "")

    def view_changed(self, old: int, new: int) -> None:
        """Log a rise of the view seen in replies (not the first view seen)."""
        if old >= 0:
            log.info("pair {pair}: TB view {old} -> {new} in replies "
                          "(a new primary)", pair=self.pair, old=old, new=new)

    def cluster_mismatch(self, expected: int, got: int) -> None:
        """Count a frame of the wrong cluster (its session is closed and logged elsewhere)."""
        self.cluster_mismatches += 1

    # Figures

    def snapshot(self) -> Snapshot:
        """The pair's figures as a JSON-able document.

        ``{"bounds": [...], "requests": {operation: n}, "latency": {operation:
        {"count", "sum", "buckets", "p50", "p99"}}, "frames": {command:
        {"to_tunnel", "from_tunnel"}}, "evictions": {reason: n},
        "cluster_mismatches": n, "view": n or None}``; names as in
        :mod:`tigertunnel.wire.tbheader`, bucket counts not cumulative.
        """
        watch = self.watch
        requests: Dict[str, int] = {}
        for op, n in enumerate(watch.requests):
            if n:
                name = OPERATION_NAMES[op]
                requests[name] = requests.get(name, 0) + n
        frames: Dict[str, Dict[str, int]] = {}
        counts = watch.frames
        for command in range(256):
            up, down = counts[2 * command], counts[2 * command + 1]
            if up or down:
                frames[COMMAND_NAMES[command]] = {DIRECTIONS[0]: up, DIRECTIONS[1]: down}
        latency: Dict[str, Dict[str, Any]] = {}
        for op, buckets in sorted(self.latency.items()):
            name = OPERATION_NAMES[op]
            if name in latency:  # two numbers with one name (pulse)
                _add_latency(latency[name], buckets, self.latency_sum[op])
            else:
                latency[name] = {"count": sum(buckets), "sum": self.latency_sum[op],
                                 "buckets": list(buckets)}
        for entry in latency.values():
            _set_quantiles(entry, BUCKETS)
        return {
            "bounds": list(BUCKETS),
            "requests": requests,
            "latency": latency,
            "frames": frames,
            "evictions": {EVICTION_REASON_NAMES[r]: n
                          for r, n in sorted(self.evictions.items())},
            "cluster_mismatches": self.cluster_mismatches,
            "view": watch.view if watch.view >= 0 else None,
        }


def _add_latency(into: Dict[str, Any], buckets: Sequence[int], total: float) -> None:
    into["buckets"] = [a + b for a, b in zip(into["buckets"], buckets)]
    into["count"] = sum(into["buckets"])
    into["sum"] += total


def _set_quantiles(entry: Dict[str, Any], bounds: Sequence[float]) -> None:
    entry["p50"] = quantile(0.5, bounds, entry["buckets"])
    entry["p99"] = quantile(0.99, bounds, entry["buckets"])


def merge_snapshots(snapshots: Sequence[Snapshot]) -> Snapshot:
    """Add up the snapshots of one proxy pair taken in several worker processes.

    Counters and histogram buckets add, the view is the highest seen, p50
    and p99 are recomputed from the summed buckets.

    :raises ValueError: if ``snapshots`` is empty or their bucket bounds differ.
    """
    if not snapshots:
        raise ValueError("no snapshots to merge")
    bounds = list(snapshots[0]["bounds"])
    for snap in snapshots[1:]:
        if list(snap["bounds"]) != bounds:
            raise ValueError(f"bucket bounds differ: {snap['bounds']} != {bounds}")
    requests: Dict[str, int] = {}
    evictions: Dict[str, int] = {}
    frames: Dict[str, Dict[str, int]] = {}
    latency: Dict[str, Dict[str, Any]] = {}
    views = [s["view"] for s in snapshots if s["view"] is not None]
    for snap in snapshots:
        _add_counts(requests, snap["requests"])
        _add_counts(evictions, snap["evictions"])
        for command, by_dir in snap["frames"].items():
            _add_counts(frames.setdefault(command, {d: 0 for d in DIRECTIONS}), by_dir)
        for op, entry in snap["latency"].items():
            if op in latency:
                _add_latency(latency[op], entry["buckets"], entry["sum"])
            else:
                latency[op] = {"count": entry["count"], "sum": entry["sum"],
                               "buckets": list(entry["buckets"])}
    for entry in latency.values():
        _set_quantiles(entry, bounds)
    return {
        "bounds": bounds,
        "requests": requests,
        "latency": latency,
        "frames": frames,
        "evictions": evictions,
        "cluster_mismatches": sum(s["cluster_mismatches"] for s in snapshots),
        "view": max(views) if views else None,
    }


def _add_counts(into: Dict[str, int], counts: Mapping[str, int]) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n


def merge_pair_snapshots(workers: Sequence[Mapping[str, Snapshot]]) -> Dict[str, Snapshot]:
    """Add up ``{pair: snapshot}`` documents of several workers, pair by pair.

    A pair present in only some workers keeps the figures of those.

    :raises ValueError: as :func:`merge_snapshots`.
    """
    names: List[str] = []
    for doc in workers:
        names.extend(name for name in doc if name not in names)
    return {name: merge_snapshots([doc[name] for doc in workers if name in doc])
            for name in names}


#: The eviction reasons a TB 0.17 replica sends, present at 0 in
#: ``tigertunnel_tigerbeetle_evictions_total`` before the first eviction
#: (``reserved`` is never sent).
KNOWN_EVICTION_REASONS = tuple(name for name, n in sorted(EVICTION_REASONS.items(),
                                                          key=lambda item: item[1]) if n)


def _with_known_reasons(counts: Mapping[str, int]) -> Dict[str, int]:
    found = {reason: 0 for reason in KNOWN_EVICTION_REASONS}
    found.update(counts)
    return found


def tb_families(pairs: Mapping[str, Snapshot]) -> Iterator[Metric]:
    """Yield the TB metric families of ``{pair: snapshot}``."""
    duration = HistogramMetricFamily(
        "tigertunnel_tigerbeetle_request_duration_seconds", "TB request round trips, "
        "from the request first seen to its first reply, by operation.",
        labels=["pair", "operation"])
    requests = CounterMetricFamily(
        "tigertunnel_tigerbeetle_requests", "TB request frames forwarded (resent and "
        "hedged copies included), by operation.", labels=["pair", "operation"])
    frames = CounterMetricFamily(
        "tigertunnel_tigerbeetle_frames", "TB frames forwarded, by command and direction "
        "(to_tunnel: read from the TB side).", labels=["pair", "command", "direction"])
    evictions = CounterMetricFamily(
        "tigertunnel_tigerbeetle_evictions", "TB eviction frames (a replica dropped a "
        "client session), by reason.", labels=["pair", "reason"])
    mismatches = CounterMetricFamily(
        "tigertunnel_tigerbeetle_cluster_mismatch", "TB frames whose cluster is not the "
        "configured one (each closes its session).", labels=["pair"])
    view = GaugeMetricFamily(
        "tigertunnel_tigerbeetle_view", "The highest TB view seen in replies.",
        labels=["pair"])
    for pair, snap in pairs.items():
        les = [_le(b) for b in snap["bounds"]] + ["+Inf"]
        for op, entry in snap["latency"].items():
            cumulative = 0
            buckets = []
            for le, count in zip(les, entry["buckets"]):
                cumulative += count
                buckets.append((le, float(cumulative)))
            duration.add_metric([pair, op], buckets, entry["sum"])
        for op, n in snap["requests"].items():
            requests.add_metric([pair, op], n)
        for command, by_dir in snap["frames"].items():
            for direction, n in by_dir.items():
                if n:
                    frames.add_metric([pair, command, direction], n)
        for reason, n in _with_known_reasons(snap["evictions"]).items():
            evictions.add_metric([pair, reason], n)
        mismatches.add_metric([pair], snap["cluster_mismatches"])
        if snap["view"] is not None:
            view.add_metric([pair], snap["view"])
    yield from (duration, requests, frames, evictions, mismatches, view)


class TBCollector:
    """A prometheus_client collector of the TB families.

    It renders whatever ``source`` returns at each scrape: the snapshots of
    this process's recorders (:meth:`of_recorders`) or, in worker 0 of
    ``--workers N``, the merge of every worker's.
    """

    def __init__(self, source: Callable[[], Mapping[str, Snapshot]]) -> None:
        self.source = source

    @classmethod
    def of_recorders(cls, recorders: Iterable[TBRecorder]) -> "TBCollector":
        """A collector over ``recorders`` (read at each scrape)."""
        found = list(recorders)
        return cls(lambda: {r.pair: r.snapshot() for r in found})

    def collect(self) -> Iterator[Metric]:
        """Yield every TB metric family, read now."""
        return tb_families(self.source())


class PairWatched(Protocol):
    """A proxy pair the TB figures can be attached to (a multiplexer)."""

    @property
    def pair_label(self) -> str:
        """What the pair reaches (label ``pair``)."""

    tb_watch: "TBWatch | None"


def watch_pairs(muxes: Iterable[PairWatched],
                clock: Callable[[], float] = time.monotonic) -> List[TBRecorder]:
    """Give every proxy pair of a tunnel end a recorder, sharing one request table.

    A TB client talks to every replica of its cluster, so a request sent
    through one pair may be answered through another: one waiting-request
    table for the whole tunnel end pairs it once.

    :returns: the recorders, in the order of ``muxes``.
    """
    in_flight = InFlight()
    recorders = []
    for mux in muxes:
        recorder = TBRecorder(mux.pair_label, in_flight, clock)
        mux.tb_watch = recorder.watch
        recorders.append(recorder)
    return recorders
