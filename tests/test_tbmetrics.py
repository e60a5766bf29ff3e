"""Tests for :mod:`tigertunnel.ops.tbmetrics` (TB metric families, snapshots, the worker merge)."""

import json
from typing import Any, Dict, List, Tuple

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from twisted.logger import LogLevel, globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase

from tests import tbdata
from tigertunnel.ops.tbmetrics import (BUCKETS, TBCollector, TBRecorder, merge_pair_snapshots,
                                       merge_snapshots, quantile)
from tigertunnel.wire.tbwatch import FROM_TUNNEL, TO_TUNNEL, InFlight

SINGLE = "tb-0.17.8-single"
CLUSTER3 = "tb-0.17.8-cluster3"
Sample = Tuple[str, Dict[str, str], float]


def feed(recorder: TBRecorder, records: List[Dict[str, Any]]) -> None:
    """Feed trace records to ``recorder`` as a tunnel client next to the connecting side."""
    for rec in records:
        direction = TO_TUNNEL if rec["dir"] == "up" else FROM_TUNNEL
        recorder.watch.frame(direction, rec["data"], rec["t"])


def exposition(collector: TBCollector) -> List[Sample]:
    """The collector's Prometheus text exposition, parsed into samples."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def values(found: List[Sample], name: str, key: str, **labels: str) -> Dict[str, float]:
    """The samples ``name`` with ``labels``, by their label ``key``."""
    return {l[key]: v for n, l, v in found
            if n == name and all(l.get(k) == x for k, x in labels.items())}


def stated_ops(trace: str, command: str) -> Dict[str, int]:
    """The summary's frames per operation of ``command``."""
    return {op: n for (c, op), n in tbdata.summary(trace)["command/operation"].items()
            if c == command}


class ExpositionTests(SynchronousTestCase):
    """The families of the single-replica trace, as Prometheus scrapes them."""

    def setUp(self) -> None:
        self.records = tbdata.trace_records(SINGLE)
        self.recorder = TBRecorder("pair0")
        feed(self.recorder, self.records)
        self.found = exposition(TBCollector.of_recorders([self.recorder]))

    def test_histogram_counts(self) -> None:
        """The histogram counts one round trip per reply of each operation."""
        counts = values(self.found, "tigertunnel_tigerbeetle_request_duration_seconds_count",
                        "operation", pair="pair0")
        self.assertEqual(counts, stated_ops(SINGLE, "reply"))

    def test_histogram_buckets_and_sum(self) -> None:
        """Buckets are cumulative over the bounds, end at +Inf with the count, and the sum is the recorded time."""
        records = self.records
        sent = [r["t"] for r in records if r["command_name"] == "request"]
        got = [r["t"] for r in records if r["command_name"] == "reply"]
        ops = [r["operation_name"] for r in records if r["command_name"] == "request"]
        durations: Dict[str, List[float]] = {}
        for op, a, b in zip(ops, sent, got):
            durations.setdefault(op, []).append(b - a)
        for op, seen in durations.items():
            buckets = values(self.found, "tigertunnel_tigerbeetle_request_duration_seconds_bucket",
                             "le", pair="pair0", operation=op)
            self.assertEqual(len(buckets), len(BUCKETS) + 1)
            self.assertEqual(buckets["+Inf"], len(seen))
            for bound in BUCKETS:
                self.assertEqual(buckets[repr(bound)], sum(1 for d in seen if d <= bound))
            total = values(self.found, "tigertunnel_tigerbeetle_request_duration_seconds_sum",
                           "operation", pair="pair0")[op]
            self.assertAlmostEqual(total, sum(seen), places=9)

    def test_requests_and_frames(self) -> None:
        """Request frames per operation and frames per command and direction equal the summary."""
        self.assertEqual(values(self.found, "tigertunnel_tigerbeetle_requests_total", "operation",
                                pair="pair0"), stated_ops(SINGLE, "request"))
        frames = {(l["command"], l["direction"]): v for n, l, v in self.found
                  if n == "tigertunnel_tigerbeetle_frames_total"}
        stated = {(c, "to_tunnel" if d == "up" else "from_tunnel"): n
                  for (_, d, c), n in tbdata.summary(SINGLE)["link dir command"].items()}
        self.assertEqual(frames, stated)

    def test_view_and_zero_counters(self) -> None:
        """The view gauge is the replies' view; mismatches and every known eviction reason are 0."""
        view = max(r["view"] for r in self.records if r["command_name"] == "reply")
        self.assertEqual(values(self.found, "tigertunnel_tigerbeetle_view", "pair"), {"pair0": view})
        self.assertEqual(values(self.found, "tigertunnel_tigerbeetle_cluster_mismatch_total", "pair"),
                         {"pair0": 0})
        self.assertEqual(values(self.found, "tigertunnel_tigerbeetle_evictions_total", "reason"),
                         dict.fromkeys(["no_session", "client_release_too_low",
                                        "client_release_too_high", "invalid_request_operation",
                                        "invalid_request_body", "invalid_request_body_size",
                                        "session_too_low", "session_release_mismatch"], 0))

    def test_no_view_before_replies(self) -> None:
        """A pair that has seen no reply has no view sample."""
        found = exposition(TBCollector.of_recorders([TBRecorder("idle")]))
        self.assertEqual(values(found, "tigertunnel_tigerbeetle_view", "pair"), {})
        self.assertEqual(values(found, "tigertunnel_tigerbeetle_cluster_mismatch_total", "pair"),
                         {"idle": 0})

    def test_snapshot_is_json(self) -> None:
        """The snapshot survives a JSON round trip unchanged and has p50/p99 in range."""
        snap = self.recorder.snapshot()
        self.assertEqual(json.loads(json.dumps(snap)), snap)
        for entry in snap["latency"].values():
            self.assertTrue(0 < entry["p50"] <= entry["p99"] <= BUCKETS[-1])


class RecorderTests(SynchronousTestCase):
    """Observations, evictions, views and mismatches in the recorder."""

    def setUp(self) -> None:
        self.recorder = TBRecorder("pair1")
        # Typed for TestCase; SynchronousTestCase has the addCleanup it uses.
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def test_bucket_edges(self) -> None:
        """A duration equal to a bound falls in that bucket; beyond 10 s in +Inf; negative in the first."""
        for seconds in (0.0001, 0.00010001, 10.0, 20.0, -1.0):
            self.recorder.request_done(140, seconds)
        buckets = self.recorder.snapshot()["latency"]["lookup_accounts"]["buckets"]
        expected = [0] * (len(BUCKETS) + 1)
        expected[0] = 2       # 0.0001 and the clamped -1
        expected[1] = 1       # 0.00010001 <= 0.00025
        expected[-2] = 1      # 10.0
        expected[-1] = 1      # 20.0
        self.assertEqual(buckets, expected)

    def test_eviction_logged_and_counted(self) -> None:
        """An eviction frame logs one warning naming pair, client, replica and reason, and counts it."""
        self.recorder.watch.frame(FROM_TUNNEL, tbdata.eviction(99, 2, replica=1), 0.0)
        self.assertEqual(self.recorder.snapshot()["evictions"], {"client_release_too_low": 1})
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual((warnings[0]["pair"], warnings[0]["client"], warnings[0]["replica"],
                          warnings[0]["reason"]), ("pair1", 99, 1, "client_release_too_low"))
        found = exposition(TBCollector.of_recorders([self.recorder]))
        evictions = values(found, "tigertunnel_tigerbeetle_evictions_total", "reason", pair="pair1")
        self.assertEqual(evictions["client_release_too_low"], 1)
        self.assertEqual({r: n for r, n in evictions.items() if r != "client_release_too_low"},
                         dict.fromkeys(set(evictions) - {"client_release_too_low"}, 0))

    def test_view_change_logged_once(self) -> None:
        """A rise of the view logs one line; the first view and repeats log nothing."""
        for view in (1, 1, 2, 2):
            self.recorder.watch.frame(FROM_TUNNEL, tbdata.reply(5, 1, 140, view=view), 0.0)
        lines = [e for e in self.events if e.get("log_namespace") == "tigertunnel.tb"]
        self.assertEqual([(e["old"], e["new"]) for e in lines], [(1, 2)])
        self.assertEqual(self.recorder.snapshot()["view"], 2)

    def test_cluster_mismatch_counted(self) -> None:
        """Cluster mismatches passed to the watch are counted."""
        self.recorder.watch.cluster_mismatch(0, 5)
        self.recorder.watch.cluster_mismatch(0, 6)
        found = exposition(TBCollector.of_recorders([self.recorder]))
        self.assertEqual(values(found, "tigertunnel_tigerbeetle_cluster_mismatch_total", "pair"),
                         {"pair1": 2})


class QuantileTests(SynchronousTestCase):
    """Quantiles from bucket counts, as PromQL's histogram_quantile computes them."""

    def test_interpolation(self) -> None:
        """Within a bucket the quantile is interpolated linearly from its lower bound."""
        bounds = (1.0, 2.0, 4.0)
        self.assertEqual(quantile(0.5, bounds, [0, 10, 0, 0]), 1.5)
        self.assertEqual(quantile(0.25, bounds, [10, 0, 10, 0]), 0.5)
        self.assertEqual(quantile(0.75, bounds, [10, 0, 10, 0]), 3.0)
        self.assertEqual(quantile(1.0, bounds, [10, 0, 10, 0]), 4.0)

    def test_inf_bucket(self) -> None:
        """A quantile in the +Inf bucket is the highest finite bound."""
        self.assertEqual(quantile(0.99, (1.0, 2.0), [1, 0, 99]), 2.0)

    def test_empty(self) -> None:
        """No observations give no quantile."""
        self.assertIsNone(quantile(0.5, (1.0,), [0, 0]))

    def test_bad_arguments(self) -> None:
        """A quantile outside 0..1 or counts that do not fit the bounds are refused, naming them."""
        self.assertIn("1.5", str(self.assertRaises(ValueError, quantile, 1.5, (1.0,), [1, 0])))
        self.assertIn("3 bucket counts", str(self.assertRaises(ValueError, quantile, 0.5,
                                                                 (1.0,), [1, 0, 0])))


class MergeTests(SynchronousTestCase):
    """Worker snapshots add up to what one process would have recorded."""

    def test_split_trace_merges_to_whole(self) -> None:
        """The cluster trace split between two workers merges into the snapshot of one recorder fed it all."""
        records = tbdata.trace_records(CLUSTER3)
        whole = TBRecorder("p")
        feed(whole, records)
        table = InFlight()
        # Workers split by connection, as a kernel's accept would; both
        # see the shared in-flight table, so replies complete requests
        # that the other worker forwarded.
        halves = [TBRecorder("p", table), TBRecorder("p", table)]
        for rec in records:
            feed(halves[rec["conn"] % 2], [rec])
        merged = merge_snapshots([h.snapshot() for h in halves])
        expected = whole.snapshot()
        self.assertEqual(merged["frames"], expected["frames"])
        self.assertEqual(merged["requests"], expected["requests"])
        self.assertEqual(merged["view"], expected["view"])
        self.assertEqual(set(merged["latency"]), set(expected["latency"]))
        for op, entry in expected["latency"].items():
            got = merged["latency"][op]
            self.assertEqual((got["buckets"], got["count"], got["p50"], got["p99"]),
                             (entry["buckets"], entry["count"], entry["p50"], entry["p99"]))
            self.assertAlmostEqual(got["sum"], entry["sum"], places=9)

    def test_counters_add_view_max(self) -> None:
        """Evictions and mismatches add up; the view is the highest; a worker without a view does not lower it."""
        a, b, c = TBRecorder("p"), TBRecorder("p"), TBRecorder("p")
        a.evicted(1, 1, 0)
        b.evicted(2, 1, 0)
        b.evicted(3, 7, 0)
        a.cluster_mismatch(0, 1)
        b.cluster_mismatch(0, 1)
        a.watch.frame(FROM_TUNNEL, tbdata.reply(1, 1, 140, view=4), 0.0)
        b.watch.frame(FROM_TUNNEL, tbdata.reply(1, 1, 140, view=2), 0.0)
        merged = merge_snapshots([a.snapshot(), b.snapshot(), c.snapshot()])
        self.assertEqual(merged["evictions"], {"no_session": 2, "session_too_low": 1})
        self.assertEqual(merged["cluster_mismatches"], 2)
        self.assertEqual(merged["view"], 4)
        self.assertEqual(merged["frames"], {"reply": {"to_tunnel": 0, "from_tunnel": 2}})
        self.assertIsNone(merge_snapshots([c.snapshot()])["view"])

    def test_quantiles_from_summed_buckets(self) -> None:
        """p50 of the merge comes from the summed buckets, not an average of the workers' p50."""
        fast, slow = TBRecorder("p"), TBRecorder("p")
        for _ in range(3):
            fast.request_done(147, 0.0002)
        slow.request_done(147, 2.0)
        merged = merge_snapshots([fast.snapshot(), slow.snapshot()])["latency"]["create_transfers"]
        self.assertEqual(merged["count"], 4)
        self.assertTrue(0.0001 < merged["p50"] <= 0.00025)
        self.assertTrue(1.0 < merged["p99"] <= 2.5)

    def test_pairs_merge(self) -> None:
        """Worker documents merge pair by pair; a pair only some workers have keeps their figures."""
        a, b = TBRecorder("p0"), TBRecorder("p0")
        a.request_done(146, 0.001)
        b.request_done(146, 0.001)
        only = TBRecorder("p1")
        only.request_done(2, 0.5)
        merged = merge_pair_snapshots([{"p0": a.snapshot()},
                                       {"p0": b.snapshot(), "p1": only.snapshot()}])
        self.assertEqual(list(merged), ["p0", "p1"])
        self.assertEqual(merged["p0"]["latency"]["create_accounts"]["count"], 2)
        self.assertEqual(merged["p1"], merge_snapshots([only.snapshot()]))
        found = exposition(TBCollector(lambda: merged))
        self.assertEqual(values(found, "tigertunnel_tigerbeetle_request_duration_seconds_count", "pair"),
                         {"p0": 2, "p1": 1})

    def test_bad_merges(self) -> None:
        """Nothing to merge, or different bucket bounds, are refused with a message naming them."""
        self.assertIn("no snapshots", str(self.assertRaises(ValueError, merge_snapshots, [])))
        snap = TBRecorder("p").snapshot()
        other = dict(snap, bounds=[1.0, 2.0])
        error = self.assertRaises(ValueError, merge_snapshots, [snap, other])
        self.assertIn("[1.0, 2.0]", str(error))
