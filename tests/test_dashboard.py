"""Tests for :mod:`tigertunnel.tools.dashboard` and ``contrib/grafana/tigertunnel.json``."""

import json
import os
from typing import Any, List, Set, Tuple

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from twisted.trial.unittest import SynchronousTestCase

from tests import tbdata
from tests.memnet import Tunnel
from tigertunnel.ops.metrics import TunnelCollector, make_registry
from tigertunnel.ops.reload import KeyReloader
from tigertunnel.ops.tbmetrics import TBCollector, TBRecorder
from tigertunnel.tools.dashboard import (dashboard_metric_names, load_dashboard_metric_names,
                                         promql_metric_names, template_metric_names)
from tigertunnel.wire.tbwatch import FROM_TUNNEL

DASHBOARD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "contrib", "grafana", "tigertunnel.json")


def series_names(text: str) -> Set[str]:
    """The series names a Prometheus text exposition defines, by family type."""
    names = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def tunnel_series() -> Set[str]:
    """What a tunnel client's and a tunnel server's /metrics define
    (ops/metrics.py), plus the TB families."""
    t = Tunnel()
    t.start()
    t.server.backend.record(True, 1.0)
    reloader = KeyReloader([t.client], t.clock, now=lambda: 1.0)
    reloader.reload()
    registry = make_registry(TunnelCollector([t.client], reloader))
    server = make_registry(TunnelCollector([t.server], None), process_metrics=False)
    recorder = TBRecorder("pair0")
    recorder.watch.frame(FROM_TUNNEL, tbdata.reply(1, 1, 140, view=1), 0.0)
    tb_registry = CollectorRegistry(auto_describe=False)
    tb_registry.register(TBCollector.of_recorders([recorder]))
    return (series_names(generate_latest(registry).decode())
            | series_names(generate_latest(server).decode())
            | series_names(generate_latest(tb_registry).decode()))


def targets(doc: Any) -> List[Tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard's panels."""
    found = []
    stack = list(doc["panels"])
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels") or ())
        found.extend((panel["title"], t["expr"]) for t in panel.get("targets") or ()
                     if t.get("expr"))
    return found


class PromQLTests(SynchronousTestCase):
    """Metric names are read out of PromQL, and nothing else is."""

    def test_functions_groupings_and_labels(self) -> None:
        """Functions, aggregations, grouping labels, matchers, ranges and numbers are not metric names."""
        expr = ('histogram_quantile(0.99, sum by (le, operation) (rate('
                'tigertunnel_tigerbeetle_request_duration_seconds_bucket{pair=~"$pair",'
                'instance="x"}[$__rate_interval])))')
        self.assertEqual(promql_metric_names(expr),
                         {"tigertunnel_tigerbeetle_request_duration_seconds_bucket"})

    def test_binary_operators_and_keywords(self) -> None:
        """Both sides of binary operators are read; on/group_left/offset/bool/unless are keywords."""
        expr = ("a_total / on (pair) group_left(role) b_info offset 5m > bool 0 "
                "unless c:recorded:rate5m or sum without (x) (d) and e")
        self.assertEqual(promql_metric_names(expr), {"a_total", "b_info", "c:recorded:rate5m",
                                                     "d", "e"})

    def test_strings_variables_subqueries(self) -> None:
        """Strings, Grafana variables and nested subqueries hide no metric and add none."""
        expr = ('max_over_time(rate(x_total{job="y_total", a=~"${pair}"}[1m])[1h:5m]) '
                '* on() group_right count(z{a="{b}"}) + 1e3 + 0x1f')
        self.assertEqual(promql_metric_names(expr), {"x_total", "z"})

    def test_template_queries(self) -> None:
        """label_values and query_result name their expression's metrics; other queries none."""
        self.assertEqual(template_metric_names('label_values(m_info{a=~"$b"}, pair)'), {"m_info"})
        self.assertEqual(template_metric_names("label_values(pair)"), set())
        self.assertEqual(template_metric_names("query_result(topk(3, n_total))"), {"n_total"})
        self.assertEqual(template_metric_names("metrics(tigertunnel_.*)"), set())

    def test_nested_panels(self) -> None:
        """Queries of panels inside collapsed rows and of query variables count."""
        doc = {"panels": [{"type": "row", "panels": [{"targets": [{"expr": "inner"}]}]},
                          {"targets": [{"expr": "outer"}, {"refId": "B"}]}],
               "templating": {"list": [{"type": "query", "query": "label_values(v, l)"},
                                       {"type": "custom", "query": "a,b"}]}}
        self.assertEqual(dashboard_metric_names(doc), {"inner", "outer", "v"})


class DashboardTests(SynchronousTestCase):
    """The shipped dashboard queries what a tunnel end exposes."""

    def test_metrics_exist(self) -> None:
        """Every metric the dashboard queries is defined by ops/metrics.py or ops/tbmetrics.py."""
        used = load_dashboard_metric_names(DASHBOARD)
        self.assertEqual(used - tunnel_series(), set())
        self.assertGreater(len(used), 15)

    def test_every_tb_family_shown(self) -> None:
        """Each TigerBeetle family appears in at least one panel."""
        used = load_dashboard_metric_names(DASHBOARD)
        tb = {n for n in tunnel_series() if n.startswith("tigertunnel_tigerbeetle_")}
        tb.discard("tigertunnel_tigerbeetle_request_duration_seconds_sum")
        self.assertEqual(tb - used, set())

    def test_panels_have_unique_ids_and_refids(self) -> None:
        """Panel ids are unique and each panel's targets have distinct refIds."""
        with open(DASHBOARD) as f:
            doc = json.load(f)
        ids = [p["id"] for p in doc["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in doc["panels"]:
            refs = [t["refId"] for t in panel.get("targets", ())]
            self.assertEqual(len(refs), len(set(refs)), panel["title"])

    def test_role_and_replica_variables(self) -> None:
        """The dashboard picks one role (never "All") and the replicas (pair label) of that role."""
        with open(DASHBOARD) as f:
            doc = json.load(f)
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        role = variables["role"]
        self.assertEqual((role["multi"], role["includeAll"]), (False, False))
        self.assertIn("label_values(tigertunnel_pair_info, role)", role["definition"])
        self.assertIn('role="$role"', variables["replica"]["definition"])
        self.assertTrue(variables["replica"]["definition"].endswith(", pair)"))
        self.assertNotIn("pair", variables)

    def test_every_query_is_one_role(self) -> None:
        """Every panel query keeps to the chosen role, so the two tunnel ends' figures of the same TB frames never add up."""
        with open(DASHBOARD) as f:
            doc = json.load(f)
        found = targets(doc)
        self.assertGreater(len(found), 20)
        for title, expr in found:
            self.assertIn('tigertunnel_pair_info{role="$role"}', expr, title)
            self.assertNotIn("$pair", expr, title)
            # each selector of a tunnel end's metrics is joined with the role
            selectors = expr.count("{instance=~")
            joins = expr.count(' tigertunnel_pair_info{role="$role"}')
            self.assertEqual(selectors, joins, title)
