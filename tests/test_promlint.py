"""Tests for :mod:`tigertunnel.tools.promlint`, and every family a tunnel end serves through it.

The rules are checked on a made-up exposition that breaks each of them
once; where ``promtool`` is present the same text goes through ``promtool
check metrics`` and must give the very same problems, and each tunnel
end's /metrics must pass it (exit 0).
"""

import os
import re
from typing import Any, List, Optional

from prometheus_client.exposition import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from tests import promtool, tbdata
from tests.memnet import Tunnel
from tests.test_dashboard import tunnel_series
from tigertunnel.stats import Refusal
from tigertunnel.ops.metrics import TunnelCollector, make_registry
from tigertunnel.ops.reload import KeyReloader
from tigertunnel.ops.tbmetrics import watch_pairs
from tigertunnel.tools.dashboard import promql_metric_names
from tigertunnel.tools.promlint import Problem, lint
from tigertunnel.wire.tbwatch import FROM_TUNNEL, TO_TUNNEL

#: One family per rule, each breaking it (and only it, as far as the rules go).
BAD = """\
# HELP a_tb_total x
# TYPE a_tb_total counter
a_tb_total 1
# HELP b_milliseconds x
# TYPE b_milliseconds gauge
b_milliseconds 1
# TYPE c_thing counter
c_thing 2
# HELP d_total x
# TYPE d_total gauge
d_total 1
# HELP e_gauge x
# TYPE e_gauge gauge
e_gauge{le="1"} 1
# HELP fooBar x
# TYPE fooBar gauge
fooBar{someLabel="1"} 1
# HELP g_count x
# TYPE g_count gauge
g_count 1
# HELP h:rec x
# TYPE h:rec gauge
h:rec 1
# HELP i_latency_ms x
# TYPE i_latency_ms gauge
i_latency_ms{quantile="0.5"} 1
# HELP j_bits_total x
# TYPE j_bits_total counter
j_bits_total 1
# HELP k_seconds x
# TYPE k_seconds histogram
k_seconds_bucket{le="+Inf"} 1
k_seconds_sum 1
k_seconds_count 1
"""

#: What promtool 2.42 says about BAD (its output, one problem per line).
BAD_PROBLEMS = [
    'a_tb_total metric names should not contain abbreviated units',
    'b_milliseconds use base unit "seconds" instead of "milliseconds"',
    'c_thing counter metrics should have "_total" suffix',
    'c_thing no help text',
    'd_total non-counter metrics should not have "_total" suffix',
    "e_gauge metric name should not include type 'gauge'",
    'e_gauge non-histogram metrics should not have "le" label',
    "fooBar label names should be written in 'snake_case' not 'camelCase'",
    "fooBar metric names should be written in 'snake_case' not 'camelCase'",
    'g_count non-histogram and non-summary metrics should not have "_count" suffix',
    "h:rec metric names should not contain ':'",
    'i_latency_ms metric names should not contain abbreviated units',
    'i_latency_ms non-summary metrics should not have "quantile" label',
    'j_bits_total use base unit "bytes" instead of "bits"',
]

RULES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "contrib", "prometheus")
ALERTS = os.path.join(RULES, "alerts.yml")


def exposition(role: str, per_worker: bool = False) -> str:
    """The /metrics text of one end of an in-memory tunnel that carried TB
    traffic, had a key reload, a refused session and a backend record."""
    t = Tunnel()
    t.start()
    mux: Any = t.client if role == "client" else t.server
    recorders = watch_pairs([mux])
    recorders[0].watch.frame(TO_TUNNEL, tbdata.request(1, 1, 140), 0.0)
    recorders[0].watch.frame(FROM_TUNNEL, tbdata.reply(1, 1, 140, view=1), 0.001)
    recorders[0].watch.frame(FROM_TUNNEL, tbdata.eviction(1, 2, replica=0), 0.002)
    reloader = KeyReloader([mux], t.clock, now=lambda: 1.0)
    reloader.reload()
    mux.stats.sessions_refused[Refusal.STOPPING] += 1
    if role == "server":
        t.server.backend.record(True, 5.0)
    reports = {1: {"process": {
        "process_cpu_seconds": [["process_cpu_seconds_total", {}, 1.5]]}}}
    collector = TunnelCollector([mux], reloader, recorders,
                                (lambda: reports) if per_worker else (lambda: {}))
    return generate_latest(make_registry(collector, per_worker=per_worker)).decode()


class RuleTests(SynchronousTestCase):
    """Each of promtool's naming rules is applied."""

    def test_every_rule(self) -> None:
        """A family breaking each rule gets promtool's problem text for it, and only that."""
        self.assertEqual([str(p) for p in lint(BAD)], BAD_PROBLEMS)

    def test_clean_families(self) -> None:
        """Counters with _total, base units, histograms with le: no problem."""
        good = ("# HELP x_bytes_total b\n# TYPE x_bytes_total counter\nx_bytes_total 1\n"
                "# HELP y_seconds s\n# TYPE y_seconds histogram\n"
                'y_seconds_bucket{le="+Inf",op="a"} 1\ny_seconds_sum{op="a"} 1\n'
                'y_seconds_count{op="a"} 1\n'
                "# HELP z_info i\n# TYPE z_info gauge\nz_info{version=\"1\"} 1\n")
        self.assertEqual(lint(good), [])

    def test_old_tb_names_refused(self) -> None:
        """The former tigertunnel_tb_* names break the abbreviated-unit rule ("tb" = terabytes)."""
        text = ("# HELP tigertunnel_tb_view v\n# TYPE tigertunnel_tb_view gauge\n"
                'tigertunnel_tb_view{pair="p"} 3\n')
        self.assertEqual(lint(text), [Problem("tigertunnel_tb_view",
                                              "metric names should not contain abbreviated units")])


class TunnelNamesTests(SynchronousTestCase):
    """Every family a tunnel end serves passes the naming rules."""

    def test_client(self) -> None:
        """A tunnel client's /metrics (with TB families, reloads, process metrics) is clean."""
        text = exposition("client")
        self.assertIn("tigertunnel_tigerbeetle_request_duration_seconds_bucket", text)
        self.assertIn("tigertunnel_key_reload_last_success", text)
        self.assertEqual(lint(text), [])

    def test_server(self) -> None:
        """A tunnel server's /metrics (with backend reachability) is clean."""
        text = exposition("server")
        self.assertIn("tigertunnel_backend_reachable", text)
        self.assertEqual(lint(text), [])

    def test_worker_zero(self) -> None:
        """Worker 0's /metrics, process metrics labelled by worker, is clean."""
        text = exposition("client", per_worker=True)
        self.assertIn('process_cpu_seconds_total{worker="1"} 1.5', text)
        self.assertEqual(lint(text), [])


class PromtoolTests(SynchronousTestCase):
    """promtool itself agrees, where it is installed."""

    def setUp(self) -> None:
        found: Optional[str] = promtool.find()
        if found is None:
            self.skipTest(promtool.MISSING)
        self.promtool: str = found

    def check_metrics(self, text: str) -> "tuple[int, List[str]]":
        code, output = promtool.run(self.promtool, ["check", "metrics"], text.encode())
        return code, sorted(line for line in output.splitlines() if line.strip())

    def test_same_problems(self) -> None:
        """promtool check metrics finds exactly the problems lint() finds in the bad families."""
        code, lines = self.check_metrics(BAD)
        self.assertEqual(code, 3, lines)
        self.assertEqual(lines, BAD_PROBLEMS)

    def test_tunnel_ends_pass(self) -> None:
        """promtool check metrics passes (exit 0) on a client's, a server's and worker 0's /metrics."""
        for text in (exposition("client"), exposition("server"),
                     exposition("client", per_worker=True)):
            self.assertEqual(self.check_metrics(text), (0, []))

    def test_alert_rules(self) -> None:
        """promtool check rules accepts contrib/prometheus/alerts.yml (its 7 alerts)."""
        code, output = promtool.run(self.promtool, ["check", "rules", ALERTS])
        self.assertEqual(code, 0, output)
        self.assertIn("SUCCESS: 7 rules found", output)

    def test_alerts_fire(self) -> None:
        """promtool test rules: each alert fires on its made-up trouble, with its labels and text, and not on healthy series."""
        code, output = promtool.run(self.promtool, ["test", "rules",
                                                    os.path.join(RULES, "alerts_test.yml")])
        self.assertEqual(code, 0, output)
        self.assertIn("SUCCESS", output)


class AlertNamesTests(SynchronousTestCase):
    """The shipped alerts query what a tunnel end exposes (no promtool needed)."""

    def test_alert_metrics_exist(self) -> None:
        """Every metric an alert's expression selects is served by a tunnel end."""
        with open(ALERTS) as f:
            text = f.read()
        alerts = re.findall(r"^\s*- alert: (\w+)$", text, re.M)
        exprs = re.findall(r"^\s*expr: (.+)$", text, re.M)
        self.assertEqual(len(alerts), 7)
        self.assertEqual(len(exprs), len(alerts))
        used = set().union(*(promql_metric_names(e) for e in exprs))
        self.assertEqual(used - tunnel_series(), set())
        self.assertIn("tigertunnel_backend_reachable", used)
