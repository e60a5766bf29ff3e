"""Tests for :mod:`tigertunnel.ops.metrics` (/metrics and /status), on the in-memory network."""

import json
from dataclasses import replace
from typing import Any, Dict, List, Tuple

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.memnet import Tunnel, psk_store
from tests.strategies import make_tb_frame
from tigertunnel.errors import ListenError
from tigertunnel.ops.metrics import MetricsService, make_site, status
from tigertunnel.net.multiplexer import ServerMultiplexer
from tigertunnel.stats import HandshakeFailure, Refusal
from tigertunnel.ops.reload import KeyReloader

Sample = Tuple[str, Dict[str, str], float]

#: The ``pair`` label of the in-memory tunnel's client and server pairs
#: (each pair is named for the address it reaches).
CLIENT_PAIR, SERVER_PAIR = "127.0.0.1:3000", "127.0.0.1:3001"


def frame(size: int, tag: int) -> bytes:
    """A TB frame with a ``size``-byte body."""
    return make_tb_frame(bytes([tag]) * size, bytes([tag]) * 64)


def get(site: Any, path: bytes, accept: str = "") -> Tuple[int, str, bytes]:
    """Render ``path`` of ``site``: (status code, content type, body)."""
    request = DummyRequest(path.strip(b"/").split(b"/"))
    if accept:
        request.requestHeaders.setRawHeaders(b"accept", [accept.encode()])
    resource = site.getResourceFor(request)
    body = resource.render(request)
    content_type = request.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
    return request.responseCode or 200, content_type.decode(), body


def samples(text: str) -> List[Sample]:
    """Parse Prometheus text into (name, labels, value) samples."""
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples]


def value(found: List[Sample], name: str, **labels: str) -> float:
    """The value of the one sample ``name`` with ``labels``."""
    matches = [v for n, l, v in found if n == name and all(l.get(k) == x for k, x in labels.items())]
    if len(matches) != 1:
        raise AssertionError(f"{len(matches)} samples {name} {labels}")
    return matches[0]


class TrafficTests(SynchronousTestCase):
    """The figures match the traffic that went through the tunnel."""

    def setUp(self) -> None:
        self.t = Tunnel(pool_size=3)
        self.t.start()
        self.reloader = KeyReloader([self.t.client], self.t.clock, now=lambda: 99.0)
        self.client_site = make_site([self.t.client], self.reloader)
        self.server_site = make_site([self.t.server], None)
        self.sizes = [0, 10, 1000, 5000]
        peer, _ = self.t.tb_client()
        peer.send(*[frame(n, i) for i, n in enumerate(self.sizes)])
        self.t.net.flush()
        self.peer = peer

    def test_prometheus_counts(self) -> None:
        """Frames and bytes in both directions, sessions and pool connections match what was sent."""
        code, content_type, body = get(self.client_site, b"/metrics")
        self.assertEqual(code, 200)
        self.assertIn("text/plain", content_type)
        found = samples(body.decode())
        total = sum(256 + n for n in self.sizes)
        for direction in ("to_tunnel", "from_tunnel"):
            self.assertEqual(value(found, "tigertunnel_frames_total", pair=CLIENT_PAIR,
                                   direction=direction), len(self.sizes))
            self.assertEqual(value(found, "tigertunnel_bytes_total", pair=CLIENT_PAIR,
                                   direction=direction), total)
        self.assertEqual(value(found, "tigertunnel_sessions", pair=CLIENT_PAIR), 1)
        self.assertEqual(value(found, "tigertunnel_sessions_opened_total", pair=CLIENT_PAIR), 1)
        self.assertEqual(value(found, "tigertunnel_pool_connections", pair=CLIENT_PAIR,
                               state="healthy"), 3)
        self.assertEqual(value(found, "tigertunnel_pool_size", pair=CLIENT_PAIR), 3)
        self.assertEqual(value(found, "tigertunnel_pool_connects_total", pair=CLIENT_PAIR), 3)
        key_id = str(self.t.client.config.psk.first()[0])
        self.assertEqual(value(found, "tigertunnel_pool_connections_by_key", pair=CLIENT_PAIR,
                               key_id=key_id), 3)
        self.assertEqual(value(found, "tigertunnel_key_info", kind="psk", key_id=key_id), 1)
        self.assertEqual(value(found, "tigertunnel_pair_healthy", pair=CLIENT_PAIR), 1)
        self.assertEqual(value(found, "tigertunnel_pair_info", pair=CLIENT_PAIR, role="client",
                               listen="127.0.0.1:4000", target="127.0.0.1:3000"), 1)
        self.assertTrue(any(n.startswith("process_") for n, _, _ in found))

    def test_server_side(self) -> None:
        """The server counts the same frames (from_tunnel = towards its replica)."""
        found = samples(get(self.server_site, b"/metrics")[2].decode())
        self.assertEqual(value(found, "tigertunnel_frames_total", pair=SERVER_PAIR,
                               direction="from_tunnel"), len(self.sizes))
        self.assertEqual(value(found, "tigertunnel_pool_connections", pair=SERVER_PAIR,
                               state="healthy"), 3)
        self.assertEqual([n for n, _, _ in found if n.startswith("tigertunnel_key_reload")], [])

    def test_openmetrics_negotiated(self) -> None:
        """An OpenMetrics Accept header gets the OpenMetrics format."""
        code, content_type, body = get(self.client_site, b"/metrics",
                                       "application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith("application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_status_json(self) -> None:
        """/status answers 200 with per-pair figures, key ids and the reload state."""
        self.reloader.reload()
        code, content_type, body = get(self.client_site, b"/status")
        self.assertEqual((code, content_type), (200, "application/json"))
        doc = json.loads(body)
        self.assertEqual(doc["role"], "client")
        self.assertTrue(doc["healthy"])
        self.assertEqual(doc["reload"], {"time": 99.0, "ok": True, "error": None,
                                         "results": {"ok": 1, "error": 0}})
        pair = doc["pairs"][0]
        self.assertEqual(pair["frames"], {"to_tunnel": 4, "from_tunnel": 4})
        self.assertEqual(pair["pool"], {"healthy": 3, "draining": 0, "handshaking": 0, "size": 3})
        self.assertEqual(sorted(link["sessions"] for link in pair["links"]), [0, 0, 1])
        self.assertEqual(doc["keys"]["psk"], [str(self.t.client.config.psk.first()[0])])

    def test_handshake_failures_by_reason(self) -> None:
        """Rejected handshakes are counted by reason on the server."""
        self.t.server.stats.handshake_failures[HandshakeFailure.UNKNOWN_KEY] += 2
        self.t.server.stats.handshake_failures[HandshakeFailure.TIMEOUT] += 1
        found = samples(get(self.server_site, b"/metrics")[2].decode())
        self.assertEqual(value(found, "tigertunnel_handshake_failures_total", pair=SERVER_PAIR,
                               reason="unknown_key"), 2)
        self.assertEqual(value(found, "tigertunnel_handshake_failures_total", pair=SERVER_PAIR,
                               reason="timeout"), 1)

    def test_status_counters_names(self) -> None:
        """/status lists every counter that moved under its flat name, reasons as suffixes."""
        stats = self.t.server.stats
        stats.pool_failures += 1
        stats.handshake_failures[HandshakeFailure.BAD_HASH] += 3
        stats.sessions_refused[Refusal.MAX_SESSIONS] += 2
        doc = json.loads(get(self.server_site, b"/status")[2])
        flat = doc["pairs"][0]["counters"]
        self.assertEqual(list(flat), sorted(flat))
        self.assertEqual((flat["link_failures"], flat["handshake_failures_bad_hash"],
                          flat["sessions_refused_max_sessions"]), (1, 3, 2))
        self.assertEqual(flat["frames_from_tunnel"], len(self.sizes))
        self.assertNotIn("handshake_evictions", flat)
        self.assertEqual(doc["pairs"][0]["sessions_refused"], {"max_sessions": 2})

    def test_unknown_path(self) -> None:
        """Paths other than /metrics and /status are not found."""
        self.assertEqual(get(self.client_site, b"/nothing")[0], 404)


class HealthTests(SynchronousTestCase):
    """/status answers 503 when a client pair cannot carry sessions."""

    def test_server_down(self) -> None:
        """A client whose server refuses every pool connection is unhealthy (503)."""
        t = Tunnel()
        t.net.refusing.add(t.server_addr)
        t.start()
        site = make_site([t.client], None)
        code, _, body = get(site, b"/status")
        self.assertEqual(code, 503)
        self.assertFalse(json.loads(body)["pairs"][0]["healthy"])
        found = samples(get(site, b"/metrics")[2].decode())
        self.assertEqual(value(found, "tigertunnel_pair_healthy", pair=CLIENT_PAIR), 0)
        t.net.refusing.clear()
        t.net.advance(1)
        self.assertEqual(get(site, b"/status")[0], 200)

    def test_refused_sessions(self) -> None:
        """TB connections refused for lack of a pool connection are counted by reason."""
        t = Tunnel()
        t.net.refusing.add(t.server_addr)
        t.start()
        t.tb_client()
        found = samples(get(make_site([t.client], None), b"/metrics")[2].decode())
        self.assertEqual(value(found, "tigertunnel_sessions_refused_total", pair=CLIENT_PAIR,
                               reason="no_pool"), 1)

    def test_stopping_is_unhealthy(self) -> None:
        """A tunnel end that is shutting down answers 503."""
        t = Tunnel()
        t.start()
        t.server.stopping = True
        self.assertEqual(get(make_site([t.server], None), b"/status")[0], 503)
        self.assertFalse(status([t.server], None)["healthy"])


class ServiceTests(SynchronousTestCase):
    """The --metrics listener."""

    def test_listens_on_description(self) -> None:
        """The metrics service listens on the endpoint description's port and interface."""
        reactor = MemoryReactorClock()
        t = Tunnel()
        service = MetricsService("tcp:9101:interface=127.0.0.1", [t.client], None, reactor)
        service.startService()
        self.assertEqual([(p, i) for p, _, _, i in reactor.tcpServers], [(9101, "127.0.0.1")])
        self.assertIs(reactor.tcpServers[0][1], service.site)
        self.assertFalse(service.site.noisy)

    def test_busy_port_is_fatal(self) -> None:
        """A metrics port that cannot be bound is a one-line ListenError naming the endpoint."""
        from twisted.internet.error import CannotListenError

        class Busy(MemoryReactorClock):
            def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                          interface: str = "") -> Any:
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))

        t = Tunnel()
        service = MetricsService("tcp:9101", [t.client], None, Busy())
        with self.assertRaises(ListenError) as caught:
            service.privilegedStartService()
        self.assertEqual(str(caught.exception), "cannot listen on metrics endpoint "
                         "tcp:9101: Address already in use")

    def test_make_service_wires_metrics(self) -> None:
        """--metrics makes makeService listen there too, and keep the listener up during the drain."""
        from tigertunnel import tap

        options = tap.Options()
        options.parseOptions(["client", "--plaintext", "-p", "127.0.0.1:4000,:3000",
                              "--metrics", "tcp:9101:interface=127.0.0.1"])
        reactor = MemoryReactorClock()
        service = tap.makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([(p, i) for p, _, _, i in reactor.tcpServers],
                         [(4000, "127.0.0.1"), (9101, "127.0.0.1")])
        self.assertEqual([type(s) for s in service.late], [MetricsService])


class ContentTests(SynchronousTestCase):
    """Families present before their first event, build info, key ids as strings."""

    def setUp(self) -> None:
        self.t = Tunnel()
        self.t.start()

    def test_known_reasons_at_zero(self) -> None:
        """Every handshake-failure and refusal reason of the role is served at 0 before it occurs."""
        client = samples(get(make_site([self.t.client], None), b"/metrics")[2].decode())
        server = samples(get(make_site([self.t.server], None), b"/metrics")[2].decode())

        def reasons(found: List[Sample], name: str) -> Dict[str, float]:
            return {labels["reason"]: v for n, labels, v in found if n == name}

        self.assertEqual(reasons(client, "tigertunnel_handshake_failures_total"), dict.fromkeys(
            ["timeout", "server_auth", "invalid_status", "rejected_unknown_key",
             "rejected_server_error", "rejected_unknown_kem_key",
             "rejected_client_auth_failed", "rejected_timestamp_invalid"], 0))
        self.assertEqual(reasons(server, "tigertunnel_handshake_failures_total"), dict.fromkeys(
            ["timeout", "bad_version", "bad_operation", "unknown_key", "bad_hash",
             "timestamp", "replay", "replay_cache_full", "replay_cache_error",
             "kem_required", "kem"], 0))
        self.assertEqual(reasons(client, "tigertunnel_sessions_refused_total"),
                         {"stopping": 0, "no_pool": 0, "max_sessions": 0})
        self.assertEqual(reasons(server, "tigertunnel_sessions_refused_total"),
                         {"stopping": 0, "max_sessions": 0})

    def test_build_info(self) -> None:
        """tigertunnel_build_info names the version, the data path in use and the ML-KEM implementation."""
        from tigertunnel import __version__
        from tigertunnel.wire import implementation

        found = samples(get(make_site([self.t.client], None), b"/metrics")[2].decode())
        info = [labels for n, labels, v in found if n == "tigertunnel_build_info" and v == 1]
        self.assertEqual(len(info), 1)
        self.assertEqual(info[0]["version"], __version__)
        self.assertEqual(info[0]["datapath"], implementation.ACTIVE.name)
        self.assertIn(info[0]["datapath"], ("c", "python"))
        self.assertIn(info[0]["mlkem"], ("cryptography", "kyber-py", "none"))

    def test_key_ids_are_strings(self) -> None:
        """Every key id in /status is a JSON string, exact above 2^53 (jq reads numbers as doubles)."""
        key_id = 1796677740593560132  # jq 1.6 prints 1796677740593560000 for this number
        self.assertNotEqual(float(key_id), key_id)
        t = Tunnel(psk=psk_store(f"{key_id}:{'ab' * 32}\n".encode()))
        t.start()
        for mux in (t.client, t.server):
            body = get(make_site([mux], None), b"/status")[2]
            doc = json.loads(body)
            self.assertEqual(doc["keys"]["psk"], [str(key_id)])
            self.assertEqual({link["key_id"] for link in doc["pairs"][0]["links"]},
                             {str(key_id)})
            self.assertEqual(doc["pairs"][0]["key_ids"], {str(key_id): 2})
            self.assertIn(f'"{key_id}"'.encode(), body)

    def test_pair_label_is_what_the_pair_reaches(self) -> None:
        """The pair label and /status name are the pair's target address, or its name= when given."""
        found = samples(get(make_site([self.t.client], None), b"/metrics")[2].decode())
        self.assertEqual({labels["pair"] for n, labels, _ in found
                          if n == "tigertunnel_pair_info"}, {CLIENT_PAIR})
        t = Tunnel()
        named = ServerMultiplexer(t.server.config, replace(t.server.pair, label="replica2"),
                                  t.clock, t.net.endpoint_for)
        self.assertEqual(status([named], None)["pairs"][0]["name"], "replica2")
