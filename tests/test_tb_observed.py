"""What a tunnel end sees of TigerBeetle, fed by the frames it forwards (in memory)."""

import json
from typing import Any, Dict, List, Tuple

from twisted.logger import globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase

from tests import tbdata
from tests.memnet import BackendFactory, TBPeer, Tunnel
from tests.test_metrics import get, samples, value
from tigertunnel.ops.metrics import make_site
from tigertunnel.ops.tbmetrics import TBRecorder, watch_pairs

CREATE_TRANSFERS = 147
LOOKUP_ACCOUNTS = 140
CLIENT = 0x1234_5678_9ABC_DEF0_0FED_CBA9_8765_4321
NO_SESSION = 1


class Replica:
    """A scripted TB replica: answers each request with a reply after a delay."""

    def __init__(self, tunnel: "List[Tunnel]", delay: float, view: int = 3,
                 evict: bool = False) -> None:
        self.tunnel = tunnel
        self.delay = delay
        self.view = view
        self.evict = evict

    def __call__(self, peer: TBPeer, frame: bytes) -> None:
        client = int.from_bytes(frame[tbdata.offset(tbdata.REQUEST, "client"):][:16], "little")
        number = int.from_bytes(frame[tbdata.offset(tbdata.REQUEST, "request"):][:4], "little")
        operation = frame[tbdata.offset(tbdata.REQUEST, "operation")]
        if self.evict:
            peer.send(tbdata.eviction(client, NO_SESSION, replica=2))
            return
        clock = self.tunnel[0].clock
        clock.callLater(self.delay, peer.send,
                        tbdata.reply(client, number, operation, view=self.view))


class ObservedTrafficTests(SynchronousTestCase):
    """Requests and replies through an in-memory tunnel show up in the TB figures."""

    def build(self, replica: Replica) -> Tuple[Tunnel, List[TBRecorder], List[TBRecorder]]:
        holder: List[Tunnel] = []
        t = Tunnel(BackendFactory(replica))
        holder.append(t)
        replica.tunnel = holder
        t.start()
        client = watch_pairs([t.client], t.clock.seconds)
        server = watch_pairs([t.server], t.clock.seconds)
        return t, client, server

    def round_trips(self, t: Tunnel, operations: List[int]) -> None:
        peer, _ = t.tb_client()
        for number, operation in enumerate(operations, start=1):
            peer.send(tbdata.request(CLIENT, number, operation))
            t.net.flush()
            t.clock.advance(0.25)
            t.net.flush()

    def test_requests_paired_with_replies(self) -> None:
        """Each request through the tunnel client is paired with its reply and timed, by operation."""
        t, (client,), (server,) = self.build(Replica([], delay=0.25, view=3))
        self.round_trips(t, [CREATE_TRANSFERS, CREATE_TRANSFERS, LOOKUP_ACCOUNTS])
        snap = client.snapshot()
        self.assertEqual(snap["requests"], {"create_transfers": 2, "lookup_accounts": 1})
        latency = snap["latency"]
        self.assertEqual(latency["create_transfers"]["count"], 2)
        self.assertAlmostEqual(latency["create_transfers"]["sum"], 0.5)
        self.assertEqual(latency["lookup_accounts"]["count"], 1)
        self.assertEqual(snap["frames"]["request"], {"to_tunnel": 3, "from_tunnel": 0})
        self.assertEqual(snap["frames"]["reply"], {"to_tunnel": 0, "from_tunnel": 3})
        self.assertEqual(snap["view"], 3)
        # The server end sees the same frames the other way round.
        self.assertEqual(server.snapshot()["frames"]["request"],
                         {"to_tunnel": 0, "from_tunnel": 3})

    def test_metrics_and_status_serve_the_figures(self) -> None:
        """/metrics has the TB families with operation labels; /status has them under the pair."""
        t, recorders, _ = self.build(Replica([], delay=0.01))
        self.round_trips(t, [CREATE_TRANSFERS, LOOKUP_ACCOUNTS, LOOKUP_ACCOUNTS])
        site = make_site([t.client], None, recorders)
        found = samples(get(site, b"/metrics")[2].decode())
        self.assertEqual(value(found, "tigertunnel_tigerbeetle_requests_total", pair="127.0.0.1:3000",
                               operation="lookup_accounts"), 2)
        self.assertEqual(value(found, "tigertunnel_tigerbeetle_request_duration_seconds_count",
                               pair="127.0.0.1:3000", operation="create_transfers"), 1)
        self.assertEqual(value(found, "tigertunnel_tigerbeetle_frames_total", pair="127.0.0.1:3000",
                               command="reply", direction="from_tunnel"), 3)
        doc: Dict[str, Any] = json.loads(get(site, b"/status")[2])
        tb = doc["pairs"][0]["tb"]
        self.assertEqual(tb["requests"], {"create_transfers": 1, "lookup_accounts": 2})

    def test_eviction_warned_and_counted(self) -> None:
        """An eviction frame from the replica gives one warning naming the reason and client, and a count."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        t, (client,), _ = self.build(Replica([], delay=0.0, evict=True))
        self.round_trips(t, [CREATE_TRANSFERS, CREATE_TRANSFERS])
        self.assertEqual(client.snapshot()["evictions"], {"no_session": 2})
        warned = [e for e in events if e.get("log_namespace") == "tigertunnel.tb"
                  and "evicted client" in e.get("log_format", "")]
        self.assertEqual(len(warned), 2)  # client and server end: once per pair each
        self.assertEqual({e["reason"] for e in warned}, {"no_session"})
        self.assertEqual({e["client"] for e in warned}, {CLIENT})

    def test_cluster_mismatch_counted(self) -> None:
        """A frame of another cluster closes its session and is counted as a mismatch."""
        t, (client,), _ = self.build(Replica([], delay=0.0))
        peer, _ = t.tb_client()
        peer.send(tbdata.request(CLIENT, 1, CREATE_TRANSFERS, cluster=7))
        t.net.flush()
        self.assertEqual(client.snapshot()["cluster_mismatches"], 1)
        self.assertTrue(peer.lost)
        self.flushLoggedErrors()


class EvictionLogLimitTests(SynchronousTestCase):
    """Eviction warnings are rate-limited per pair; the counter counts them all."""

    def test_one_line_per_interval(self) -> None:
        """Within 10 s only the first eviction is logged; the next line says how many were left out."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        now = [100.0]
        recorder = TBRecorder("pair0", clock=lambda: now[0])
        for _ in range(4):
            recorder.evicted(CLIENT, NO_SESSION, 1)
            now[0] += 1.0
        now[0] += 10.0
        recorder.evicted(CLIENT, NO_SESSION, 1)
        lines = [e for e in events if e.get("log_namespace") == "tigertunnel.tb"]
        self.assertEqual([e["more"] for e in lines],
                         ["", " (3 more evictions since the last line)"])
        self.assertEqual(recorder.snapshot()["evictions"], {"no_session": 5})
