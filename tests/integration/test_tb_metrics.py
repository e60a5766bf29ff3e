"""TB-shaped requests through real tunnel processes show up in the client's /metrics.

A scripted replica in this process answers every TB ``request`` frame with
its ``reply`` (the header layout of TB 0.17); the tunnel server and client
are daemonized ``twistd`` processes, with one process per end and with
``--workers 2`` (where worker 0 serves the sum of every worker's figures).
"""

import json
import os
import signal
from typing import Any, Dict, List, Set

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from tests import tbdata
from tests.integration import procs
from tests.integration.test_operations import _OperationsCase, _reactor, http_get, metric
from tigertunnel.tools.dashboard import load_dashboard_metric_names
from tigertunnel.wire.frames import FrameParser

CREATE_TRANSFERS, LOOKUP_ACCOUNTS = 147, 140
DASHBOARD = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "contrib", "grafana", "tigertunnel.json")


class Replica(Protocol):
    """Answers each TB request with the matching reply (view 7)."""

    def connectionMade(self) -> None:
        self.parser = FrameParser()

    def dataReceived(self, data: bytes) -> None:
        for frame in self.parser.feed(data):
            if frame[tbdata.offset(tbdata.REQUEST, "command")] != tbdata.COMMAND["request"]:
                continue
            client = int.from_bytes(frame[tbdata.offset(tbdata.REQUEST, "client"):][:16], "little")
            number = int.from_bytes(frame[tbdata.offset(tbdata.REQUEST, "request"):][:4], "little")
            operation = frame[tbdata.offset(tbdata.REQUEST, "operation")]
            self.transport.write(tbdata.reply(client, number, operation, view=7))


class Client(Protocol):
    """A TB client: counts the replies it gets."""

    def connectionMade(self) -> None:
        self.parser = FrameParser()
        self.replies = 0

    def dataReceived(self, data: bytes) -> None:
        self.replies += len(self.parser.feed(data))


class TBMetricsTests(_OperationsCase):
    """The client's /metrics count TB requests by operation, per process and summed over workers."""

    timeout = 90

    def setUp(self) -> None:
        super().setUp()
        port = _reactor().listenTCP(0, Factory.forProtocol(Replica), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.backend = f"127.0.0.1:{port.getHost().port}"

    async def run_ends(self, *extra: str) -> int:
        """Start both ends (with ``extra`` options); return the client's metrics port."""
        key = self.write_keys("secret.key", 1_700_000_000_000_000_001)
        server_port, client_port, cmetrics = procs.free_ports(3)
        self.client_port = client_port
        #: The client pair's ``pair`` label: the address it reaches.
        self.pair = f"127.0.0.1:{server_port}"
        spid = await self.daemon("server", "-p", f"127.0.0.1:{server_port},{self.backend}",
                                 "-k", key, *extra)
        cpid = await self.daemon("client", "-p", f"127.0.0.1:{client_port},127.0.0.1:{server_port}",
                                 "-k", key, "-n", "2", "--metrics",
                                 f"tcp:{cmetrics}:interface=127.0.0.1", *extra)
        self.addCleanup(procs.stop_pid, spid, 15)
        self.addCleanup(procs.stop_pid, cpid, 15)
        await procs.wait_for_text(self.path("client.log"), " up (key id ", 20)
        return cmetrics

    async def sessions(self, count: int) -> List[Client]:
        """``count`` TB clients, each sending create_transfers, create_transfers, lookup_accounts."""
        endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", self.client_port, timeout=5)
        clients = []
        for index in range(count):
            client: Any = await endpoint.connect(Factory.forProtocol(Client))
            self.addCleanup(client.transport.abortConnection)
            clients.append(client)
        for number, operation in enumerate([CREATE_TRANSFERS, CREATE_TRANSFERS,
                                            LOOKUP_ACCOUNTS], start=1):
            for index, client in enumerate(clients):
                client.transport.write(tbdata.request(1000 + index, number, operation))
            await procs.wait_until(lambda: all(c.replies >= number for c in clients), 15,
                                   f"reply {number} on every session")
        return clients

    async def scrape_until(self, port: int, name: str, want: float, **labels: str) -> str:
        """Scrape /metrics until ``name{labels}`` reaches ``want`` (workers report every 2 s)."""
        text = [""]

        async def scrape() -> None:
            text[0] = (await http_get(f"http://127.0.0.1:{port}/metrics"))[1].decode()

        for _ in range(40):
            await scrape()
            try:
                if metric(text[0], name, **labels) >= want:
                    break
            except AssertionError:
                pass
            await task.deferLater(_reactor(), 0.25, lambda: None)
        return text[0]

    def check_counts(self, text: str, sessions: int) -> None:
        self.assertEqual(metric(text, "tigertunnel_tigerbeetle_requests_total", pair=self.pair,
                                operation="create_transfers"), 2 * sessions)
        self.assertEqual(metric(text, "tigertunnel_tigerbeetle_requests_total", pair=self.pair,
                                operation="lookup_accounts"), sessions)
        self.assertEqual(metric(text, "tigertunnel_tigerbeetle_request_duration_seconds_count",
                                pair=self.pair, operation="create_transfers"), 2 * sessions)
        self.assertEqual(metric(text, "tigertunnel_tigerbeetle_request_duration_seconds_count",
                                pair=self.pair, operation="lookup_accounts"), sessions)
        self.assertEqual(metric(text, "tigertunnel_tigerbeetle_frames_total", pair=self.pair,
                                command="reply", direction="from_tunnel"), 3 * sessions)
        self.assertEqual(metric(text, "tigertunnel_tigerbeetle_view", pair=self.pair), 7)

    async def test_one_process_per_end(self) -> None:
        """Requests by operation, their durations and reply frames are counted; status and dashboard agree."""
        port = await self.run_ends()
        await self.sessions(4)
        text = await self.scrape_until(port, "tigertunnel_tigerbeetle_requests_total", 4,
                                       pair=self.pair, operation="lookup_accounts")
        self.check_counts(text, 4)
        # Every metric the Grafana dashboard queries exists in this /metrics
        # (after a key reload, so that the reload figures exist too; a
        # counter with no event yet is declared by its TYPE line).
        os.kill(procs.read_pidfile(self.path("client.pid")) or 0, signal.SIGHUP)
        await procs.wait_for_text(self.path("client.log"), "reloading key files", 10)
        text = await self.scrape_until(port, "tigertunnel_key_reload_last_success", 1)
        names: Set[str] = {line.split()[2] for line in text.splitlines()
                           if line.startswith("# TYPE ")}
        for family in text_string_to_metric_families(text):
            names.update(s.name for s in family.samples)
        missing = sorted(load_dashboard_metric_names(DASHBOARD) - names)
        self.assertEqual(missing, [])
        # tigertunnel status reads the same figures and says healthy.
        result = await procs.run([procs.executable("tigertunnel"), "status", "--json",
                                  f"http://127.0.0.1:{port}/status"])
        self.assertEqual(result.status, 0, result.describe())
        doc: Dict[str, Any] = json.loads(result.stdout)
        self.assertEqual(doc["pairs"][0]["tb"]["requests"],
                         {"create_transfers": 8, "lookup_accounts": 4})
        result = await procs.run([procs.executable("tigertunnel"), "status",
                                  f"http://127.0.0.1:{port}/status"])
        self.assertEqual(result.status, 0, result.describe())
        self.assertIn("lookup_accounts", result.stdout)

    async def test_workers_summed(self) -> None:
        """With --workers 2 at both ends, worker 0's /metrics shows the sum over both workers."""
        port = await self.run_ends("--workers", "2")
        await procs.wait_for_text(self.path("client.log"), " up (key id ", 20, count=4)
        await self.sessions(16)
        text = await self.scrape_until(port, "tigertunnel_tigerbeetle_requests_total", 16,
                                       pair=self.pair, operation="lookup_accounts")
        self.check_counts(text, 16)
        # Every family is the sum over both workers, not worker 0's share.
        text = await self.scrape_until(port, "tigertunnel_frames_total", 48,
                                       pair=self.pair, direction="from_tunnel")
        self.assertEqual(metric(text, "tigertunnel_sessions_opened_total", pair=self.pair), 16)
        self.assertEqual(metric(text, "tigertunnel_sessions", pair=self.pair), 16)
        self.assertEqual(metric(text, "tigertunnel_frames_total", pair=self.pair,
                                direction="to_tunnel"), 48)
        # -n 2 in each of 2 workers (a worker reports every 2 s: wait for it)
        text = await self.scrape_until(port, "tigertunnel_pool_connections", 4,
                                       pair=self.pair, state="healthy")
        self.assertEqual(metric(text, "tigertunnel_pool_connections", pair=self.pair,
                                state="healthy"), 4)
        self.assertEqual(metric(text, "tigertunnel_pool_size", pair=self.pair), 4)
        for worker in ("0", "1"):
            self.assertGreater(metric(text, "process_cpu_seconds_total", worker=worker), 0)
