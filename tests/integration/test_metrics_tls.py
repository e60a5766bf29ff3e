"""``--metrics`` over TLS on a real tunnel end, read by ``tigertunnel status https://...``.

A ``twistd`` tunnel server serves ``/metrics`` and ``/status`` over HTTPS
with a certificate for ``localhost`` only, requiring a client certificate
signed by the test CA (all made at test time, :mod:`tests.tlscerts`). The
``tigertunnel status`` command, run as a process, succeeds with the right CA
and client certificate, and fails with one line for a wrong CA, a host name
the certificate does not name, no client certificate, or one from another
CA. A scrape of ``/metrics`` with the client certificate gets the
Prometheus text; a plain HTTP request to the port gets nothing.
"""

from typing import Dict

from twisted.internet import defer

from tests.integration import procs
from tests.integration.test_operations import _OperationsCase, _reactor, http_get
from tests.tlscerts import PKI, make_pki
from tests.test_tls import HAVE_TLS, NO_TLS


class MetricsOverTLSTests(_OperationsCase):
    """A tunnel server with --metrics-tls-cert, -key and -client-ca."""

    async def start_server(self) -> PKI:
        """Start the server; return the PKI, with ``self.port`` its metrics port."""
        if not HAVE_TLS:
            self.skipTest(NO_TLS)
        pki = make_pki(self.path("pki"), ("localhost",))
        server_port, self.port = procs.free_ports(2)
        await self.daemon(
            "server", "-p", f"127.0.0.1:{server_port},{self.backend}", "--plaintext",
            "--metrics", f"tcp:{self.port}:interface=127.0.0.1",
            "--metrics-tls-cert", pki["server.pem"], "--metrics-tls-key", pki["server.key"],
            "--metrics-tls-client-ca", pki["ca.pem"], "--replay-file", "memory")
        await procs.wait_for_text(self.path("server.log"), f"(TLS) starting on {self.port}", 10)
        return pki

    async def status(self, host: str, *options: str) -> procs.Result:
        """Run ``tigertunnel status OPTIONS https://HOST:PORT``."""
        return await procs.run([procs.executable("tigertunnel"), "status", "--timeout", "10",
                                *options, f"https://{host}:{self.port}"])

    async def test_status_checks_the_endpoint(self) -> None:
        """The right CA and client certificate pass; each wrong one fails with one line saying which."""
        pki = await self.start_server()
        mine = ["--cert", pki["client.pem"], "--key", pki["client.key"]]
        cases: Dict[str, "defer.Deferred[procs.Result]"] = {
            "ok": defer.ensureDeferred(self.status("localhost", "--ca", pki["ca.pem"], *mine)),
            "wrong CA": defer.ensureDeferred(
                self.status("localhost", "--ca", pki["other-ca.pem"], *mine)),
            "wrong host": defer.ensureDeferred(
                self.status("127.0.0.1", "--ca", pki["ca.pem"], *mine)),
            "no client cert": defer.ensureDeferred(
                self.status("localhost", "--ca", pki["ca.pem"])),
            "stranger": defer.ensureDeferred(self.status(
                "localhost", "--ca", pki["ca.pem"], "--cert", pki["stranger.pem"],
                "--key", pki["stranger.key"])),
        }
        results = dict(zip(cases, await defer.gatherResults(list(cases.values()))))
        ok = results.pop("ok")
        self.assertEqual(ok.status, 0, ok.describe())
        self.assertIn(f"tigertunnel server at https://localhost:{self.port}/status: healthy "
                      f"(HTTP 200)", ok.stdout)
        expected = {
            "wrong CA": "the endpoint's certificate is not signed by a CA of --ca",
            "wrong host": "the endpoint's certificate is not valid for '127.0.0.1'",
            "no client cert": "the endpoint refused us: it requires a client certificate",
            "stranger": "the endpoint refused our client certificate",
        }
        for name, result in results.items():
            self.assertEqual(result.status, 1, f"{name}: {result.describe()}")
            self.assertEqual(result.stdout, "", f"{name}: {result.describe()}")
            lines = result.stderr.splitlines()
            self.assertEqual(len(lines), 1, f"{name}: {result.describe()}")
            self.assertIn("tigertunnel: error: status: cannot read https://", lines[0])
            self.assertIn(expected[name], lines[0], name)
        log = procs.read_text(self.path("server.log"))
        self.assertNotIn("Traceback", log)

    async def test_scrape_with_client_certificate(self) -> None:
        """/metrics over TLS with the client certificate is Prometheus text; plain HTTP gets nothing."""
        from tigertunnel.ops.tls import client_tls
        from tigertunnel.tools.https import get

        pki = await self.start_server()
        creator = client_tls("localhost", pki["ca.pem"], pki["client.pem"], pki["client.key"])
        code, body = await get(_reactor(), f"https://localhost:{self.port}/metrics", creator, 10)
        self.assertEqual(code, 200)
        self.assertIn(b"tigertunnel_pair_healthy{", body)
        with self.assertRaises(Exception):
            await http_get(f"http://127.0.0.1:{self.port}/metrics")
