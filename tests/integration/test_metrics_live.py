"""/metrics and /status of real tunnel processes: naming rules, labels, backend reachability, jq.

Daemonized ``twistd`` tunnel ends on 127.0.0.1 carry TB requests to a
scripted replica in this process; their scrapes go through the naming check
of :mod:`tigertunnel.tools.promlint` and, where it is installed, through
``promtool check metrics``. A tunnel server whose replica is down answers
503; the docs' ``jq`` recipes run against a live ``/status``.
"""

import json
import re
import shutil
from typing import Any, Dict, List, Tuple

from twisted.internet import task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory

from tests import promtool, tbdata
from tests.integration import procs
from tests.integration.test_operations import _OperationsCase, _reactor, http_get, metric
from tests.integration.test_tb_metrics import Client, Replica
from tigertunnel.keys.format import format_key_line
from tigertunnel.ops.backend import PROBE_INTERVAL
from tigertunnel.tools.promlint import lint

#: A key id above 2^53: a JSON number would lose its last digits in jq.
BIG_ID = 1796677740593560132
#: The pages that show ``tigertunnel status --json | jq`` recipes.
DOCS = [__file__.rsplit("/tests/", 1)[0] + "/docs/" + page
        for page in ("usage.rst", "operations.rst")]


class _LiveCase(_OperationsCase):
    """Polls an HTTP URL of a tunnel end with a deadline."""

    timeout = 90

    async def poll(self, url: str, done: Any, what: str, timeout: float = 30.0
                   ) -> Tuple[int, str]:
        """GET ``url`` until ``done(code, text)`` holds; (code, text) of the last answer."""
        deadline = _reactor().seconds() + timeout
        while True:
            code, body = await http_get(url)
            text = body.decode()
            try:
                if done(code, text):
                    return code, text
            except AssertionError:
                pass
            if _reactor().seconds() >= deadline:
                self.fail(f"gave up after {timeout} s waiting for {what}: {code} {text[:300]}")
            await task.deferLater(_reactor(), 0.25, lambda: None)


class LiveMetricsTests(_LiveCase):
    """Both ends' live scrapes follow the naming rules and say what each pair reaches."""

    async def start_pair(self) -> Dict[str, Any]:
        """A replica, a server (pair name=replica0) and a client, both with --metrics."""
        port = _reactor().listenTCP(0, Factory.forProtocol(Replica), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        replica = f"127.0.0.1:{port.getHost().port}"
        key = self.write("secret.key", format_key_line(BIG_ID, bytes(range(32))))
        sp, cp, sm, cm = procs.free_ports(4)
        spid = await self.daemon("server", "-p", f"127.0.0.1:{sp},{replica},name=replica0",
                                 "-k", key, "--metrics", f"tcp:{sm}:interface=127.0.0.1")
        self.addCleanup(procs.stop_pid, spid, 15)
        cpid = await self.daemon("client", "-p", f"127.0.0.1:{cp},127.0.0.1:{sp}", "-k", key,
                                 "-n", "2", "--metrics", f"tcp:{cm}:interface=127.0.0.1")
        self.addCleanup(procs.stop_pid, cpid, 15)
        await procs.wait_for_text(self.path("client.log"), " up (key id ", 20)
        return {"client_port": cp, "server": f"http://127.0.0.1:{sm}",
                "client": f"http://127.0.0.1:{cm}", "client_pair": f"127.0.0.1:{sp}"}

    async def tb_requests(self, port: int, count: int) -> None:
        """One TB client sends ``count`` lookup_accounts requests, each answered."""
        endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", port, timeout=5)
        client: Any = await endpoint.connect(Factory.forProtocol(Client))
        self.addCleanup(client.transport.abortConnection)
        for number in range(1, count + 1):
            client.transport.write(tbdata.request(77, number, 140))
            await procs.wait_until(lambda: client.replies >= number, 15, f"reply {number}")

    async def test_scrapes_pass_the_naming_rules(self) -> None:
        """Live client and server scrapes: no naming problem, labels name the replica or target, reasons at 0, build info."""
        ends = await self.start_pair()
        await self.tb_requests(ends["client_port"], 3)
        _, server = await self.poll(
            ends["server"] + "/metrics",
            lambda c, t: metric(t, "tigertunnel_backend_reachable", pair="replica0") == 1,
            "the server's backend probe")
        _, client = await self.poll(
            ends["client"] + "/metrics",
            lambda c, t: metric(t, "tigertunnel_tigerbeetle_requests_total",
                                pair=ends["client_pair"], operation="lookup_accounts") == 3,
            "the client's TB figures")
        self.assertEqual(lint(client), [])
        self.assertEqual(lint(server), [])
        self.assertEqual(metric(server, "tigertunnel_pair_healthy", pair="replica0"), 1)
        self.assertEqual(metric(client, "tigertunnel_pair_healthy", pair=ends["client_pair"]), 1)
        self.assertEqual(metric(client, "tigertunnel_tigerbeetle_evictions_total",
                                pair=ends["client_pair"], reason="no_session"), 0)
        self.assertEqual(metric(client, "tigertunnel_handshake_failures_total",
                                pair=ends["client_pair"], reason="server_auth"), 0)
        self.assertEqual(metric(server, "tigertunnel_handshake_failures_total",
                                pair="replica0", reason="replay"), 0)
        self.assertEqual(metric(server, "tigertunnel_sessions_refused_total",
                                pair="replica0", reason="max_sessions"), 0)
        for text in (client, server):
            self.assertEqual(len(re.findall(r"^tigertunnel_build_info\{", text, re.M)), 1)
        found = promtool.find()
        if found is not None:
            for text in (client, server):
                self.assertEqual(promtool.run(found, ["check", "metrics"], text.encode()),
                                 (0, ""))
        # /status: key ids are exact strings.
        for url in (ends["client"], ends["server"]):
            doc = json.loads((await http_get(url + "/status"))[1])
            self.assertEqual(doc["keys"]["psk"], [str(BIG_ID)])
            self.assertEqual({link["key_id"] for link in doc["pairs"][0]["links"]},
                             {str(BIG_ID)})
        doc = json.loads((await http_get(ends["server"] + "/status"))[1])
        self.assertEqual(doc["pairs"][0]["name"], "replica0")
        self.assertTrue(doc["pairs"][0]["backend"]["reachable"])

    async def test_readme_jq_recipes(self) -> None:
        """Every ``tigertunnel status --json | jq`` line of the docs runs on a live /status; the key id comes out exact."""
        if shutil.which("jq") is None:
            self.skipTest("jq is not installed")
        recipes = [line.strip() for page in DOCS for line in open(page, encoding="utf-8")
                   if line.strip().startswith("tigertunnel status --json | jq")]
        self.assertGreaterEqual(len(recipes), 3)
        ends = await self.start_pair()
        tigertunnel = procs.executable("tigertunnel")
        outputs: List[str] = []
        for recipe in recipes:
            command = recipe.replace("tigertunnel status --json",
                                     f"{tigertunnel} status --json {ends['client']}", 1)
            result = await procs.run(["/bin/sh", "-c", command])
            self.assertEqual(result.status, 0, result.describe())
            outputs.append(result.stdout)
        by_recipe = dict(zip(recipes, outputs))
        key_ids = [out for recipe, out in by_recipe.items() if ".key_id" in recipe]
        self.assertEqual(key_ids, [f"{BIG_ID}\n"])
        pools = [out for recipe, out in by_recipe.items() if "{name, healthy, pool}" in recipe]
        self.assertEqual(json.loads(pools[0])["name"], ends["client_pair"])
        unhealthy = [out for recipe, out in by_recipe.items() if "select(.healthy | not)" in recipe]
        self.assertEqual(unhealthy, [""])


class ReplicaDownTests(_LiveCase):
    """A tunnel server in front of a replica that is down is unhealthy."""

    async def test_replica_down_then_up(self) -> None:
        """/status answers 503 and tigertunnel_backend_reachable is 0 until the replica listens; then 200 and 1."""
        key = self.write("secret.key", format_key_line(BIG_ID, bytes(range(32))))
        sp, replica_port, sm = procs.free_ports(3)
        spid = await self.daemon("server", "-p", f"127.0.0.1:{sp},127.0.0.1:{replica_port}",
                                 "-k", key, "--metrics", f"tcp:{sm}:interface=127.0.0.1")
        self.addCleanup(procs.stop_pid, spid, 15)
        base = f"http://127.0.0.1:{sm}"
        pair = f"127.0.0.1:{replica_port}"
        code, body = await self.poll(
            base + "/status",
            lambda c, t: json.loads(t)["pairs"][0]["backend"]["reachable"] is False,
            "the failed probe")
        self.assertEqual(code, 503)
        doc = json.loads(body)
        self.assertFalse(doc["healthy"])
        self.assertIn("refused", doc["pairs"][0]["backend"]["error"])
        text = (await http_get(base + "/metrics"))[1].decode()
        self.assertEqual(metric(text, "tigertunnel_backend_reachable", pair=pair), 0)
        self.assertEqual(metric(text, "tigertunnel_pair_healthy", pair=pair), 0)
        result = await procs.run([procs.executable("tigertunnel"), "status", base])
        self.assertEqual(result.status, 1, result.describe())
        self.assertIn("UNHEALTHY (HTTP 503)", result.stdout)
        # The replica comes up: healthy within a probe interval (generous bound).
        port = _reactor().listenTCP(replica_port, Factory.forProtocol(Replica),
                                    interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        code, _ = await self.poll(
            base + "/status",
            lambda c, t: c == 200, "the replica seen up", timeout=PROBE_INTERVAL * 6)
        text = (await http_get(base + "/metrics"))[1].decode()
        self.assertEqual(metric(text, "tigertunnel_backend_reachable", pair=pair), 1)
