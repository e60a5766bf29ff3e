"""``tigertunnel status`` against a real HTTP server on 127.0.0.1 (twisted.web, in process).

The command runs in a thread (urllib blocks) while the reactor serves the
answers; every fetch has the command's own timeout.
"""

import io
import json
import socket
from typing import Any, List, Tuple

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.test_status import tunnel_status
from tigertunnel.tools.status import main


def _reactor() -> Any:
    from twisted.internet import reactor
    return reactor


class Canned(Resource):
    """Answers every GET with a set status code and body, and keeps the paths asked for."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.body = b"{}"
        self.paths: List[bytes] = []

    def render_GET(self, request: Request) -> bytes:
        self.paths.append(request.path)
        request.setResponseCode(self.code)
        request.setHeader("Content-Type", "application/json")
        return self.body


class StatusCommandTests(TestCase):
    """Exit statuses and output of ``tigertunnel status`` over HTTP."""

    def setUp(self) -> None:
        self.resource = Canned()
        site = Site(self.resource)
        site.noisy = False
        port = _reactor().listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    def run_status(self, *argv: str) -> "defer.Deferred[Tuple[int, str, str]]":
        """Run the command in a thread: (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()

        def run() -> Tuple[int, str, str]:
            code = main(["--timeout", "10", *argv], out, err)
            return code, out.getvalue(), err.getvalue()

        return threads.deferToThread(run)

    async def test_healthy(self) -> None:
        """A 200 document exits 0 and shows its pairs; a URL without a path asks for /status."""
        doc = tunnel_status()
        self.resource.body = json.dumps(doc).encode()
        code, out, err = await self.run_status(self.base)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.resource.paths, [b"/status"])
        self.assertIn(f"at {self.base}/status: healthy (HTTP 200)", out)
        self.assertIn("create_transfers", out)

    async def test_unhealthy(self) -> None:
        """A 503 document exits 1 and still shows what the tunnel end reported."""
        self.resource.code = 503
        self.resource.body = json.dumps({"role": "client", "healthy": False,
                                         "pairs": [{"name": "p0", "healthy": False}]}).encode()
        code, out, err = await self.run_status(self.base + "/status")
        self.assertEqual((code, err), (1, ""))
        self.assertIn("UNHEALTHY (HTTP 503)", out)
        self.assertIn("pair p0  ? -> ?  UNHEALTHY", out)

    async def test_json(self) -> None:
        """--json prints the document as received, and the exit status still follows health."""
        doc = tunnel_status()
        self.resource.body = json.dumps(doc).encode()
        code, out, _ = await self.run_status("--json", self.base)
        self.assertEqual((code, json.loads(out)), (0, doc))
        self.resource.code = 503
        code, out, _ = await self.run_status("--json", self.base)
        self.assertEqual((code, json.loads(out)), (1, doc))

    async def test_not_json(self) -> None:
        """An answer that is not JSON exits 1 with one line naming the URL and the status."""
        self.resource.code = 404
        self.resource.body = b"<html>No Such Resource</html>"
        code, out, err = await self.run_status(self.base + "/nope")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"tigertunnel: error: status: cannot read {self.base}/nope: "
                              f"HTTP 404, not JSON\n")

    async def test_unreachable(self) -> None:
        """A port nobody listens on exits 1 with one line naming the URL."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/status"
        probe.close()
        code, out, err = await self.run_status(url)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertTrue(err.startswith(f"tigertunnel: error: status: cannot read {url}: "), err)
