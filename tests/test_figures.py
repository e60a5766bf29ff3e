"""Tests for :mod:`tigertunnel.ops.figures`: the /status document and its sum over ``--workers``."""

import json
from typing import Any, Dict, List

from twisted.internet.task import Clock
from twisted.logger import eventAsJSON
from twisted.trial.unittest import SynchronousTestCase

from tests.memnet import Tunnel
from tests.test_metrics import CLIENT_PAIR, SERVER_PAIR, frame, get, samples, value
from tigertunnel.net.stats import HandshakeFailure
from tigertunnel.ops.figures import (
    FIGURES_INTERVAL,
    WorkerProcessCollector,
    figures_reporter,
    merge_pair_documents,
    pair_status,
    worker_report,
)
from tigertunnel.ops.metrics import make_site, process_collectors
from tigertunnel.ops.tbmetrics import watch_pairs
from tigertunnel.ops.workers.logpipe import decode_line, figures_of, report_figures


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
        # The report travels as a log event's JSON, as over the log pipe.
        events: List[Dict[str, Any]] = []
        report_figures(worker_report([self.other.client], other_recorders,
                                     process_collectors()), events.append)
        line = eventAsJSON(events[0]).encode()
        report = figures_of(decode_line(1, line, 0.0))
        assert report is not None
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
        """The reporter sends a full report at start and then every interval."""
        t = busy_tunnel(1)
        recorders = watch_pairs([t.server])
        sent: List[Dict[str, Any]] = []
        clock = Clock()
        service = figures_reporter([t.server], recorders, clock, process_collectors(),
                                   sent.append)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(sent), 1)
        clock.advance(FIGURES_INTERVAL)
        self.assertEqual(len(sent), 2)
        report = sent[-1]
        self.assertEqual([p["name"] for p in report["pairs"]], [SERVER_PAIR])
        self.assertEqual(list(report["tb"]), [SERVER_PAIR])
        self.assertIn("process_cpu_seconds", report["process"])
        json.dumps(report)  # it must cross the log pipe as JSON

    def test_process_collector_without_reports(self) -> None:
        """Without other workers, the process families have worker 0's samples only."""
        families = list(WorkerProcessCollector(process_collectors(), dict).collect())
        self.assertTrue(families)
        for family in families:
            self.assertEqual({s.labels["worker"] for s in family.samples}, {"0"})
