"""The metric names a Grafana dashboard's PromQL queries use.

``contrib/grafana/tigertunnel.json`` queries the metrics of ``/metrics``;
:func:`dashboard_metric_names` lists every metric name it references (panel
queries, including panels nested in rows, and the ``label_values(...)``
queries of its template variables), so a test can check each against what a
tunnel end actually exposes.

The PromQL reading is lexical: strings, label matchers ``{...}``, range and
subquery selectors ``[...]``, grouping clauses (``by``, ``without``, ``on``,
``ignoring``, ``group_left``, ``group_right``) and Grafana variables
(``$pair``, ``${pair}``, ``$__rate_interval``) are removed; what remains of
the identifiers, minus function calls and keywords, are metric names.
"""

import json
import re
from typing import Any, Iterator, Set

__all__ = ["promql_metric_names", "template_metric_names", "dashboard_metric_names",
           "load_dashboard_metric_names"]

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(r"(?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?[a-zA-Z]*|0x[0-9a-fA-F]+)"
                    r"|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?")
_KEYWORDS = frozenset((
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
    "bool", "and", "or", "unless", "inf", "nan", "atan2"))
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((?:(?P<expr>.*),)?\s*(?P<label>\w+)\s*\)\s*$",
                           re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((?P<expr>.*)\)\s*$", re.S)


def promql_metric_names(expr: str) -> Set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRING.sub(" ", expr)
    text = _VARIABLE.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    while True:  # nested subqueries: innermost first
        stripped = _RANGE.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        name = match.group("name")
        if name and not match.group("call") and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def template_metric_names(query: str) -> Set[str]:
    """The metric names of a Grafana Prometheus template-variable query.

    ``label_values(EXPR, label)`` and ``query_result(EXPR)`` use EXPR's
    metrics; ``label_values(label)`` and ``metrics(...)`` use none.
    """
    match = _LABEL_VALUES.match(query)
    if match:
        return promql_metric_names(match.group("expr") or "")
    match = _QUERY_RESULT.match(query)
    if match:
        return promql_metric_names(match.group("expr"))
    return set()


def _panels(panels: Any) -> Iterator[Any]:
    for panel in panels or ():
        yield panel
        yield from _panels(panel.get("panels"))


def dashboard_metric_names(dashboard: Any) -> Set[str]:
    """Every metric name the panels and template variables of a dashboard query."""
    names: Set[str] = set()
    for panel in _panels(dashboard.get("panels")):
        for target in panel.get("targets") or ():
            if target.get("expr"):
                names |= promql_metric_names(target["expr"])
    for variable in (dashboard.get("templating") or {}).get("list") or ():
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str):
            names |= template_metric_names(query)
    return names


def load_dashboard_metric_names(path: str) -> Set[str]:
    """:func:`dashboard_metric_names` of the dashboard JSON file at ``path``."""
    with open(path) as f:
        return dashboard_metric_names(json.load(f))
