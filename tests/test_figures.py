"""Tests for :mod:`tigertunnel.ops.figures`: the /status document and its sum over ``--workers``."""

import json
from dataclasses import FrozenInstanceError
from typing import Any, Dict, List

from twisted.internet.task import Clock
from twisted.logger import eventAsJSON
from twisted.trial.unittest import SynchronousTestCase

from tests.memnet import Tunnel
from tigertunnel.config.model import Address, ProxyPair, Role, TunnelConfig
from tigertunnel.net.multiplexer import ClientMultiplexer
from tests.test_metrics import CLIENT_PAIR, SERVER_PAIR, frame, get, samples, value
from tigertunnel.net.pairstatus import PairStatus, PoolConnectionStatus
from tigertunnel.stats import HandshakeFailure, Reachability, Stats
from tigertunnel.ops.figures import (
    FIGURES_INTERVAL,
    WorkerProcessCollector,
    counters,
    figures_reporter,
    merge_pair_documents,
    pair_status,
    render_pair,
    report_pairs,
    report_parts,
    report_tb,
)
from tigertunnel.ops.metrics import make_site, process_collectors
from tigertunnel.ops.tbmetrics import watch_pairs
from tigertunnel.ops.workers.logpipe import MAX_LINE, decode_line, figures_of, report_figures
from tigertunnel.wire.tbheader import OPERATIONS
from tigertunnel.wire.tbwatch import FROM_TUNNEL, TO_TUNNEL
from tests import tbdata


def busy_tunnel(sessions: int) -> Tunnel:
    """An in-memory tunnel that carried ``sessions`` sessions of two frames each."""
    t = Tunnel()
    t.start()
    for i in range(sessions):
        peer, _ = t.tb_client()
        peer.send(frame(10, i), frame(20, i))
    t.net.flush()
    return t


class MergeTests(SynchronousTestCase):
    """Pair documents of several workers add up."""

    def test_counts_add_health_ands(self) -> None:
        """Counts add, a pair is healthy only if healthy in every worker, pool connections name their worker."""
        one, two = busy_tunnel(1), busy_tunnel(2)
        a, b = pair_status(one.client), pair_status(two.client)
        b["healthy"] = False
        merged = merge_pair_documents({0: [a], 3: [b]})
        self.assertEqual(len(merged), 1)
        pair = merged[0]
        self.assertEqual(pair["name"], CLIENT_PAIR)
        self.assertEqual(pair["sessions"], 3)
        self.assertEqual(pair["frames"], {"to_tunnel": 6, "from_tunnel": 6})
        self.assertEqual(pair["pool"], {"healthy": 4, "draining": 0, "handshaking": 0, "size": 4})
        self.assertEqual(pair["counters"]["sessions_opened"], 3)
        self.assertFalse(pair["healthy"])
        self.assertEqual(sorted(link["worker"] for link in pair["links"]), [0, 0, 3, 3])
        self.assertEqual(pair["listen"], a["listen"])

    def test_newest_backend_record(self) -> None:
        """Of the workers' backend records, the most recent one is kept."""
        one, two = busy_tunnel(0), busy_tunnel(0)
        one.server.backend.record(True, 10.0)
        two.server.backend.record(False, 20.0, "refused")
        merged = merge_pair_documents({0: [pair_status(one.server)],
                                       1: [pair_status(two.server)]})
        self.assertEqual(merged[0]["backend"],
                         {"reachable": False, "checked": 20.0, "error": "refused"})
        self.assertFalse(merged[0]["healthy"])
        merged = merge_pair_documents({0: [pair_status(two.server)],
                                       1: [pair_status(one.server)]})
        self.assertEqual(merged[0]["backend"]["checked"], 20.0)
        # A worker's old failure does not outlive a newer success elsewhere.
        one.server.backend.record(True, 30.0)
        merged = merge_pair_documents({0: [pair_status(one.server)],
                                       1: [pair_status(two.server)]})
        self.assertEqual(merged[0]["backend"]["reachable"], True)
        self.assertTrue(merged[0]["healthy"])
        # A stopping worker still makes the pair unhealthy.
        one.server.stopping = True
        merged = merge_pair_documents({0: [pair_status(one.server)],
                                       1: [pair_status(two.server)]})
        self.assertFalse(merged[0]["healthy"])

    def test_reasons_union(self) -> None:
        """Failure reasons seen by only one worker are kept, shared ones add."""
        one, two = busy_tunnel(0), busy_tunnel(0)
        one.server.stats.handshake_failures[HandshakeFailure.BAD_HASH] += 2
        two.server.stats.handshake_failures[HandshakeFailure.BAD_HASH] += 1
        two.server.stats.handshake_failures[HandshakeFailure.REPLAY] += 4
        merged = merge_pair_documents({0: [pair_status(one.server)],
                                       1: [pair_status(two.server)]})
        self.assertEqual(merged[0]["handshake_failures"], {"bad_hash": 3, "replay": 4})


class WorkerZeroTests(SynchronousTestCase):
    """Worker 0 serves the sum of its own figures and the other workers' reports."""

    def setUp(self) -> None:
        self.zero, self.other = busy_tunnel(1), busy_tunnel(3)
        other_recorders = watch_pairs([self.other.client])
        # The parts travel as log events' JSON, as over the log pipe, and
        # are kept as the supervisor keeps them.
        report: Dict[str, Any] = {}
        for part in report_parts([self.other.client], other_recorders, process_collectors()):
            events: List[Dict[str, Any]] = []
            report_figures(part, events.append)
            line = eventAsJSON(events[0]).encode()
            got = figures_of(decode_line(1, line, 0.0))
            assert got is not None
            report.update(got)
        self.reports = {1: report}
        self.recorders = watch_pairs([self.zero.client])
        self.site = make_site([self.zero.client], None, self.recorders,
                              lambda: self.reports)

    def test_metrics_summed(self) -> None:
        """Sessions, frames, bytes, pool connections and counters are the sum over workers."""
        found = samples(get(self.site, b"/metrics")[2].decode())
        self.assertEqual(value(found, "tigertunnel_sessions", pair=CLIENT_PAIR), 4)
        self.assertEqual(value(found, "tigertunnel_sessions_opened_total", pair=CLIENT_PAIR), 4)
        self.assertEqual(value(found, "tigertunnel_frames_total", pair=CLIENT_PAIR,
                               direction="to_tunnel"), 8)
        self.assertEqual(value(found, "tigertunnel_pool_connections", pair=CLIENT_PAIR,
                               state="healthy"), 4)
        self.assertEqual(value(found, "tigertunnel_pool_connects_total", pair=CLIENT_PAIR), 4)
        self.assertEqual(value(found, "tigertunnel_pool_size", pair=CLIENT_PAIR), 4)

    def test_process_metrics_per_worker(self) -> None:
        """Process metrics carry a worker label: worker 0's own and each reporting worker's."""
        found = samples(get(self.site, b"/metrics")[2].decode())
        workers = {labels.get("worker") for name, labels, _ in found
                   if name == "process_resident_memory_bytes"}
        self.assertEqual(workers, {"0", "1"})
        self.assertEqual({labels.get("worker") for name, labels, _ in found
                          if name.startswith("python_gc_")}, {"0", "1"})

    def test_status_summed(self) -> None:
        """/status shows the summed pair with every worker's pool connections."""
        doc = json.loads(get(self.site, b"/status")[2])
        pair = doc["pairs"][0]
        self.assertEqual(pair["sessions"], 4)
        self.assertEqual(sorted({link["worker"] for link in pair["links"]}), [0, 1])
        self.assertTrue(doc["healthy"])

    def test_worker_gone(self) -> None:
        """A worker that stopped reporting drops out of the sum."""
        self.reports.clear()
        found = samples(get(self.site, b"/metrics")[2].decode())
        self.assertEqual(value(found, "tigertunnel_sessions", pair=CLIENT_PAIR), 1)
        self.assertEqual({labels.get("worker") for name, labels, _ in found
                          if name == "process_resident_memory_bytes"}, {"0"})


class ReporterTests(SynchronousTestCase):
    """A worker reports its figures every FIGURES_INTERVAL seconds."""

    def test_reports_on_clock(self) -> None:
        """The reporter sends every part of its report at start and then every interval."""
        t = busy_tunnel(1)
        recorders = watch_pairs([t.server])
        sent: List[Dict[str, Any]] = []
        clock = Clock()
        service = figures_reporter([t.server], recorders, clock, process_collectors(),
                                   sent.append)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([list(part) for part in sent], [[f"pair {SERVER_PAIR}"], ["process"]])
        clock.advance(FIGURES_INTERVAL)
        self.assertEqual(len(sent), 4)
        report: Dict[str, Any] = {}
        for part in sent:
            report.update(part)
        self.assertEqual([p["name"] for p in report_pairs(report)], [SERVER_PAIR])
        self.assertEqual(list(report_tb(report)), [SERVER_PAIR])
        self.assertIn("process_cpu_seconds", report["process"])
        json.dumps(report)  # it must cross the log pipe as JSON

    def test_parts_fit_a_log_line(self) -> None:
        """With 16 pairs that saw every TB operation, each part stays far below the log
        pipe's line limit, though the whole report would not fit in one line."""
        config = TunnelConfig("client", [ProxyPair(i, Address("127.0.0.1", 4000 + i),
                                                   Address("127.0.0.1", 3000 + i))
                                         for i in range(16)])
        clock = Clock()
        muxes = [ClientMultiplexer(config, pair, clock) for pair in config.pairs]
        recorders = watch_pairs(muxes)
        for recorder in recorders:
            number = 0
            for operation in OPERATIONS:
                for i in range(16):
                    number += 1
                    recorder.watch.frame(TO_TUNNEL, tbdata.request(number, 1, operation), 0.0)
                    recorder.watch.frame(FROM_TUNNEL, tbdata.reply(number, 1, operation),
                                         0.0001 * 2 ** i)
        parts = report_parts(muxes, recorders, process_collectors())
        self.assertEqual(len(parts), 17)
        self.assertEqual(len(report_tb(parts[0])["127.0.0.1:3000"]["latency"]),
                         len(set(OPERATIONS.values())))
        sizes = []
        for part in parts:
            events: List[Dict[str, Any]] = []
            report_figures(part, events.append)
            sizes.append(len(eventAsJSON(events[0]).encode()))
        self.assertLess(max(sizes), MAX_LINE // 4)
        self.assertGreater(sum(sizes), MAX_LINE)

    def test_process_collector_without_reports(self) -> None:
        """Without other workers, the process families have worker 0's samples only."""
        families = list(WorkerProcessCollector(process_collectors(), dict).collect())
        self.assertTrue(families)
        for family in families:
            self.assertEqual({s.labels["worker"] for s in family.samples}, {"0"})


class PoolConnectionsKeyTests(SynchronousTestCase):
    """/status lists pool connections under ``pool_connections`` (and ``links`` for one release)."""

    def test_both_keys_same_list(self) -> None:
        """A pair's document lists every established pool connection under both keys."""
        t = busy_tunnel(1)
        doc = pair_status(t.client)
        self.assertEqual(len(doc["pool_connections"]), 2)
        self.assertEqual(doc["pool_connections"], doc["links"])
        self.assertEqual({c["name"] for c in doc["pool_connections"]},
                         {c.name for c in t.client.pool_connections})

    def test_merged_keys_name_their_worker(self) -> None:
        """Merged over workers, both keys carry each connection's worker."""
        one, two = busy_tunnel(0), busy_tunnel(0)
        merged = merge_pair_documents({0: [pair_status(one.client)],
                                       2: [pair_status(two.client)]})[0]
        self.assertEqual(sorted(c["worker"] for c in merged["pool_connections"]),
                         [0, 0, 2, 2])
        self.assertEqual(merged["pool_connections"], merged["links"])


class RenderPairTests(SynchronousTestCase):
    """The /status document is rendered from a typed PairStatus, whatever built it."""

    def snap(self, **changes: Any) -> PairStatus:
        fields: Dict[str, Any] = dict(
            role=Role.SERVER, name="pair0", label="replica0", listen=":3000",
            target="127.0.0.1:3001", healthy=True, stopping=False, pool_size=None,
            handshaking=3,
            pool_connections=(PoolConnectionStatus("a", 2 ** 60 + 1, 2, "healthy"),
                              PoolConnectionStatus("b", 2 ** 60 + 1, 0, "draining"),
                              PoolConnectionStatus("c", None, 0, "healthy")),
            sessions=2, stats=Stats(), backend=Reachability(False, 9.0, "refused"))
        fields.update(changes)
        return PairStatus(**fields)

    def test_server_pair(self) -> None:
        """Counts by state and key id (ids as strings), and the backend record."""
        doc = render_pair(self.snap())
        self.assertEqual(doc["pool"], {"healthy": 2, "draining": 1, "handshaking": 3})
        self.assertEqual(doc["key_ids"], {str(2 ** 60 + 1): 2, "none": 1})
        self.assertEqual([c["state"] for c in doc["pool_connections"]],
                         ["healthy", "draining", "healthy"])
        self.assertEqual(doc["backend"], {"reachable": False, "checked": 9.0,
                                          "error": "refused"})
        self.assertEqual((doc["name"], doc["healthy"]), ("replica0", True))

    def test_client_pair(self) -> None:
        """A client pair has a pool size and no backend record."""
        doc = render_pair(self.snap(role=Role.CLIENT, pool_size=4, backend=None))
        self.assertEqual(doc["pool"]["size"], 4)
        self.assertNotIn("backend", doc)

    def test_snapshot_is_typed_and_frozen(self) -> None:
        """A multiplexer's snapshot is a frozen PairStatus of either role."""
        t = busy_tunnel(1)
        for mux in (t.client, t.server):
            snap = mux.snapshot()
            self.assertIsInstance(snap, PairStatus)
            self.assertIs(snap.role, mux.role)
            with self.assertRaises(FrozenInstanceError):
                snap.healthy = False  # type: ignore[misc]
        self.assertEqual((t.client.snapshot().pool_size, t.server.snapshot().pool_size),
                         (2, None))


class CounterNameTests(SynchronousTestCase):
    """/status counters carry the Stats names, and former names for one release."""

    def test_pool_failures_and_alias(self) -> None:
        """pool_failures is listed as such, and as link_failures (its former name)."""
        stats = Stats()
        stats.pool_failures = 3
        flat = counters(stats)
        self.assertEqual((flat["pool_failures"], flat["link_failures"]), (3, 3))
        self.assertEqual(list(flat), sorted(flat))
        self.assertNotIn("link_failures", counters(Stats()))
