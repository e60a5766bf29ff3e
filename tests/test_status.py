"""Tests for :mod:`tigertunnel.tools.status` without sockets: the terminal view, URLs, options.

Fetching over HTTP, exit statuses and unreachable tunnel ends are in
``tests/integration/test_status.py``.
"""

import io
from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from tests import tbdata
from tests.memnet import Tunnel
from tigertunnel.ops.metrics import status
from tigertunnel.ops.tbmetrics import TBRecorder
from tigertunnel.tools.status import UsageError, main, render, status_url
from tigertunnel.wire.tbwatch import FROM_TUNNEL, TO_TUNNEL


def tunnel_status() -> Dict[str, Any]:
    """The /status document of a real in-memory tunnel client, its pair carrying a TB section."""
    t = Tunnel(pool_size=2)
    t.start()
    doc = status([t.client], None)
    recorder = TBRecorder(doc["pairs"][0]["name"])
    for rec in tbdata.trace_records("tb-0.17.8-single"):
        recorder.watch.frame(TO_TUNNEL if rec["dir"] == "up" else FROM_TUNNEL,
                             rec["data"], rec["t"])
    recorder.evicted(5, 1, 0)
    doc["pairs"][0]["tb"] = recorder.snapshot()
    return doc


class RenderTests(SynchronousTestCase):
    """The terminal view shows what an operator looks for."""

    def test_full_document(self) -> None:
        """Pairs, pool connections with key ids, sessions and TB p50/p99 per operation are shown."""
        doc = tunnel_status()
        text = render(doc, "http://h:1/status", 200)
        pair = doc["pairs"][0]
        self.assertIn("client at http://h:1/status: healthy (HTTP 200)", text)
        self.assertIn(f"pair {pair['name']}  {pair['listen']} -> {pair['target']}  healthy", text)
        self.assertIn("pool: 2/2 healthy, 0 draining, 0 handshaking", text)
        key_id = pair["links"][0]["key_id"]
        self.assertEqual(text.count(f"key {key_id}  healthy"), 2)
        self.assertIn("TigerBeetle: view 1, evictions: no_session 1, cluster mismatches: 0", text)
        latency = pair["tb"]["latency"]["create_transfers"]
        row = [line.split() for line in text.splitlines() if "create_transfers" in line][0]
        self.assertEqual(row[:3], ["create_transfers", "3", "3"])
        self.assertEqual(float(row[3]), float(f"{latency['p50'] * 1000:.3g}"))
        self.assertEqual(len([line for line in text.splitlines()
                              if line.strip().startswith(("register", "lookup_"))]), 3)

    def test_backend_reachability(self) -> None:
        """A server pair's backend shows as reachable, or UNREACHABLE with the reason."""
        t = Tunnel()
        t.start()
        self.assertNotIn("backend", render(status([t.server], None), "u", 200))
        t.server.backend.record(True, 1.0)
        self.assertIn("  backend 127.0.0.1:3001: reachable\n",
                      render(status([t.server], None), "u", 200))
        t.server.backend.record(False, 2.0, "Connection refused")
        text = render(status([t.server], None), "u", 503)
        self.assertIn("  backend 127.0.0.1:3001: UNREACHABLE (Connection refused)\n", text)
        self.assertIn("UNHEALTHY (HTTP 503)", text)

    def test_unhealthy(self) -> None:
        """A 503 document is shown as UNHEALTHY, shutting down when it says so."""
        text = render({"role": "server", "healthy": False, "stopping": True, "pairs": []},
                      "http://h/status", 503)
        self.assertIn("UNHEALTHY (shutting down) (HTTP 503)", text)
        self.assertIn("no proxy pairs", text)

    def test_missing_sections(self) -> None:
        """Documents without pool, links, keys or TB sections render without them."""
        text = render({"pairs": [{"name": "p", "healthy": True}, "junk"]}, "http://h", 200)
        self.assertEqual(text.splitlines(), [
            "tigertunnel ? at http://h: healthy (HTTP 200)",
            "pair p  ? -> ?  healthy  sessions ?"])

    def test_tb_without_requests(self) -> None:
        """A TB section that saw no reply shows a dash for the view and no latency table."""
        doc = {"pairs": [{"name": "p", "healthy": True, "tb": TBRecorder("p").snapshot()}]}
        lines = render(doc, "http://h", 200).splitlines()
        self.assertEqual(lines[-1], "  TigerBeetle: view -, evictions: none, cluster mismatches: 0")

    def test_failed_reload(self) -> None:
        """A failed key reload is shown with its error."""
        doc = {"reload": {"time": 1.0, "ok": False, "error": "k.key:3: InvalidKeyFormat",
                          "results": {"ok": 1, "error": 1}}, "pairs": []}
        self.assertIn("last key reload: FAILED: k.key:3: InvalidKeyFormat (1 ok, 1 failed)",
                      render(doc, "http://h", 200))


class ArgumentTests(SynchronousTestCase):
    """URLs and options are checked before anything is fetched."""

    def test_url_gets_status_path(self) -> None:
        """A URL without a path gets /status; one with a path keeps it."""
        self.assertEqual(status_url("http://10.0.0.5:9101"), "http://10.0.0.5:9101/status")
        self.assertEqual(status_url("http://h:1/"), "http://h:1/status")
        self.assertEqual(status_url("https://h/x/status?a=1"), "https://h/x/status?a=1")

    def test_host_and_port(self) -> None:
        """HOST:PORT (a name, IPv4, [IPv6] or a bare IPv6 address) means http://HOST:PORT/status."""
        self.assertEqual(status_url("10.0.0.5:9101"), "http://10.0.0.5:9101/status")
        self.assertEqual(status_url("localhost:9101"), "http://localhost:9101/status")
        self.assertEqual(status_url("[::1]:9101"), "http://[::1]:9101/status")
        self.assertEqual(status_url("::1:9101"), "http://[::1]:9101/status")

    def test_bad_url(self) -> None:
        """A URL that is not http(s) with a host, nor HOST:PORT, is a usage error naming it."""
        for url in ("ftp://h/status", "127.0.0.1", "127.0.0.1:99999", "h:port",
                    "http:///status"):
            error = self.assertRaises(UsageError, status_url, url)
            self.assertIn(repr(url), str(error))

    def test_bad_options_exit_2(self) -> None:
        """A bad URL or timeout prints one line naming it and exits 2."""
        for argv, bad in ((["gopher://x"], "gopher://x"), (["--timeout", "soon"], "soon"),
                          (["--timeout", "0"], "'0'"), (["--color"], "--color"),
                          (["a", "b"], "b")):
            err = io.StringIO()
            self.assertEqual(main(argv, io.StringIO(), err), 2)
            self.assertEqual(len(err.getvalue().splitlines()), 1)
            self.assertIn(bad, err.getvalue())

    def test_tls_options(self) -> None:
        """--ca, --cert and --key need an https:// URL, --cert and --key each other: one line, exit 2."""
        for argv, expected in (
                (["--ca", "ca.pem", "http://h:9101"],
                 "--ca is for an https:// URL, not 'http://h:9101/status'"),
                (["--cert", "c.pem", "https://h:9101"], "--cert needs --key"),
                (["--key", "c.key", "https://h:9101"], "--key needs --cert")):
            err = io.StringIO()
            self.assertEqual(main(argv, io.StringIO(), err), 2)
            self.assertEqual(err.getvalue(), f"tigertunnel: error: status: {expected}\n")

    def test_unusable_ca_file(self) -> None:
        """An unreadable --ca file is one line naming it, exit 2, before any connection."""
        missing = self.mktemp()
        err = io.StringIO()
        self.assertEqual(main(["--ca", missing, "https://127.0.0.1:1"], io.StringIO(), err), 2)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
        self.assertTrue(repr(missing) in err.getvalue() or "pyOpenSSL" in err.getvalue(),
                        err.getvalue())

    def test_help(self) -> None:
        """--help exits 0 after printing the synopsis and examples."""
        out = io.StringIO()
        import sys
        saved, sys.stdout = sys.stdout, out
        try:
            self.assertEqual(main(["--help"]), 0)
        finally:
            sys.stdout = saved
        self.assertIn("usage: tigertunnel status [-h] [--json]", out.getvalue())
        self.assertIn("Examples:", out.getvalue())


class PoolConnectionsKeyTests(SynchronousTestCase):
    """The terminal view reads ``pool_connections``, and ``links`` from an older tunnel end."""

    def test_reads_pool_connections_first(self) -> None:
        """Connections are listed from pool_connections; an end that sends only links still shows."""
        doc = tunnel_status()
        pair = doc["pairs"][0]
        key_id = pair["pool_connections"][0]["key_id"]
        pair["links"] = []
        self.assertEqual(render(doc, "u", 200).count(f"key {key_id}  healthy"), 2)
        pair["links"] = pair.pop("pool_connections")
        self.assertEqual(render(doc, "u", 200).count(f"key {key_id}  healthy"), 2)
