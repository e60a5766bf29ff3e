"""Tests for :mod:`tigertunnel.ops.backend` (a tunnel server's backend reachability), on the in-memory network."""

import json
from typing import Any, List

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.memnet import Tunnel
from tests.test_metrics import SERVER_PAIR, get, samples, value
from tigertunnel.net.multiplexer import ServerMultiplexer
from tigertunnel.ops.backend import PROBE_INTERVAL, BackendProbe, backend_probes
from tigertunnel.ops.metrics import make_site, status


@implementer(IStreamClientEndpoint)
class Silent:
    """An endpoint whose connects never end (a backend that drops SYNs)."""

    def __init__(self) -> None:
        self.attempts: List["defer.Deferred[Any]"] = []

    def connect(self, factory: Factory) -> "defer.Deferred[Any]":
        d: "defer.Deferred[Any]" = defer.Deferred()
        self.attempts.append(d)
        return d


class ProbeTests(SynchronousTestCase):
    """The probe keeps a server pair's backend record current; /status and /metrics follow it."""

    def setUp(self) -> None:
        self.t = Tunnel()
        self.t.start()
        self.probe = BackendProbe(self.t.server, self.t.clock)
        self.site = make_site([self.t.server], None)
        self.backend = self.t.backend_addr

    def probes(self) -> int:
        return self.t.net.connect_attempts.count(self.backend)

    def reachable(self) -> float:
        return value(samples(get(self.site, b"/metrics")[2].decode()),
                     "tigertunnel_backend_reachable", pair=SERVER_PAIR)

    def test_up_then_down_then_up(self) -> None:
        """A replica that stops listening makes the server pair unhealthy (503, metric 0) within one interval, and healthy again after."""
        self.probe.startService()
        self.addCleanup(self.probe.stopService)
        self.t.net.flush()
        self.assertEqual((self.probes(), self.reachable()), (1, 1))
        self.assertEqual(get(self.site, b"/status")[0], 200)
        self.t.net.refusing.add(self.backend)
        self.t.net.advance(PROBE_INTERVAL + 0.1)
        self.assertEqual((self.probes(), self.reachable()), (2, 0))
        code, _, body = get(self.site, b"/status")
        self.assertEqual(code, 503)
        pair = json.loads(body)["pairs"][0]
        self.assertFalse(pair["healthy"])
        self.assertEqual(pair["backend"]["reachable"], False)
        self.assertIn("127.0.0.1:3001", pair["backend"]["error"])
        self.assertGreaterEqual(pair["backend"]["checked"], PROBE_INTERVAL)
        self.t.net.refusing.clear()
        self.t.net.advance(PROBE_INTERVAL + 0.1)
        self.assertEqual((self.probes(), self.reachable()), (3, 1))
        self.assertEqual(get(self.site, b"/status")[0], 200)

    def test_unknown_before_first_connect(self) -> None:
        """Before any backend connect the pair counts as healthy and the gauge is absent."""
        doc = status([self.t.server], None)
        self.assertEqual(doc["pairs"][0]["backend"],
                         {"reachable": None, "checked": None, "error": None})
        self.assertTrue(doc["healthy"])
        found = samples(get(self.site, b"/metrics")[2].decode())
        self.assertEqual([s for s in found if s[0] == "tigertunnel_backend_reachable"], [])

    def test_sessions_count_as_probes(self) -> None:
        """A session's backend connect is recorded, and no probe is made while they are recent."""
        self.probe.startService()
        self.addCleanup(self.probe.stopService)
        self.t.net.flush()
        self.t.net.advance(PROBE_INTERVAL / 2)
        self.t.tb_client()  # opens a stream: the server connects the backend
        self.t.net.flush()
        self.assertEqual(self.probes(), 2)
        connected = self.t.server.backend.checked
        self.assertEqual(connected, self.t.clock.seconds())
        self.t.net.advance(PROBE_INTERVAL / 2 + 0.1)  # the probe's turn: record is recent
        self.assertEqual(self.probes(), 2)
        self.t.net.advance(PROBE_INTERVAL + 0.1)
        self.assertEqual(self.probes(), 3)

    def test_failed_session_connect_recorded(self) -> None:
        """A session whose backend connect is refused marks the backend unreachable (no probe running)."""
        self.t.net.refusing.add(self.backend)
        self.t.tb_client()
        self.t.net.flush()
        self.assertEqual(self.t.server.backend.reachable, False)
        self.assertEqual(self.t.server.stats.backend_connect_failures, 1)
        self.assertEqual(get(self.site, b"/status")[0], 503)

    def test_connect_without_answer(self) -> None:
        """A probe still waiting after one interval counts as a failure and is cancelled."""
        silent = Silent()
        server = ServerMultiplexer(self.t.server.config, self.t.server.pair, self.t.clock,
                                   lambda pair: silent)
        probe = BackendProbe(server, self.t.clock)
        probe.startService()
        self.assertEqual(len(silent.attempts), 1)
        self.assertIsNone(server.backend.reachable)
        self.t.clock.advance(PROBE_INTERVAL)
        self.assertEqual(len(silent.attempts), 2)
        self.assertTrue(silent.attempts[0].called)  # cancelled
        self.assertFalse(server.backend.reachable)
        self.assertIn("no answer", server.backend.error)
        probe.stopService()
        self.assertTrue(silent.attempts[1].called)
        self.assertEqual([c for c in self.t.clock.getDelayedCalls() if c.func == probe.probe], [])

    def test_stop_ends_probing(self) -> None:
        """A stopped probe connects no more."""
        self.probe.startService()
        self.t.net.flush()
        self.probe.stopService()
        self.t.net.advance(3 * PROBE_INTERVAL)
        self.assertEqual(self.probes(), 1)

    def test_servers_only(self) -> None:
        """Only tunnel server pairs get a probe."""
        probes = backend_probes([self.t.client, self.t.server], self.t.clock)
        self.assertEqual([p.mux for p in probes], [self.t.server])
