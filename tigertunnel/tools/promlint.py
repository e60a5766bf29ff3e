"""The naming rules of ``promtool check metrics``, over a Prometheus text exposition.

``promtool check metrics`` (Prometheus 2.x, its ``promlint`` rules) reads a
scrape and reports each metric family that breaks a naming convention;
:func:`lint` applies the same rules without promtool, so a test can check
every family a tunnel end serves on any machine. The rules, per family:

* a help text is present;
* a counter's name ends in ``_total``, and no other type's name does;
* units are base units (``seconds``, ``bytes``, ``meters``, ...): no SI
  prefix (``milliseconds``, ``kilobytes``) and no non-base unit
  (``minutes``, ``bits``, ...);
* no abbreviated unit as a word of the name (``s``, ``ms``, ``us``, ``ns``,
  ``sec``, ``b``, ``kb``, ``mb``, ``gb``, ``tb``, ``pb``, ``m``, ``h``,
  ``d``): ``tb`` reads as terabytes;
* the name does not spell its type (``_counter``, ``_gauge``,
  ``_histogram``, ``_summary``, ``_gaugehistogram``);
* no ``:`` (reserved for recording rules) and no camelCase, in metric or
  label names;
* only a histogram has the ``le`` label, only a summary ``quantile``, and
  only they end in ``_count``, ``_sum`` or ``_bucket``.

The exposition is read line by line (``# HELP``, ``# TYPE`` and sample
lines); a sample without a ``# TYPE`` line makes an untyped family, as in
promtool.
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Set

__all__ = ["Problem", "lint", "ABBREVIATIONS", "BASE_UNITS"]

#: Unit words and the base unit each should be given in.
BASE_UNITS: Dict[str, str] = {
    "amperes": "amperes", "bytes": "bytes", "celsius": "celsius", "grams": "grams",
    "joules": "joules", "kelvin": "kelvin", "meters": "meters", "metres": "metres",
    "seconds": "seconds", "volts": "volts",
    "minutes": "seconds", "hours": "seconds", "days": "seconds", "weeks": "seconds",
    "kelvins": "kelvin", "fahrenheit": "celsius", "rankine": "celsius",
    "inches": "meters", "yards": "meters", "miles": "meters", "bits": "bytes",
    "calories": "joules", "pounds": "grams", "ounces": "grams",
}
#: Prefixes that make a unit word a non-base unit (``milliseconds``).
UNIT_PREFIXES = ("pico", "nano", "micro", "milli", "centi", "deci", "deca", "hecto",
                 "kilo", "kibi", "mega", "mibi", "giga", "gibi", "tera", "tebi",
                 "peta", "pebi")
#: Abbreviated units a name must not contain as a word.
ABBREVIATIONS = ("s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb",
                 "m", "h", "d")
_TYPES = ("counter", "gauge", "summary", "histogram", "gaugehistogram")
_CAMEL = re.compile(r"[a-z][A-Z]")
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s")
_LABEL_NAME = re.compile(r'(?:^|,)\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"')
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"),
             "counter": ("_created",),
             "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


@dataclass(frozen=True, order=True)
class Problem:
    """One broken rule: the family's name and promtool's text for the rule."""

    metric: str
    text: str

    def __str__(self) -> str:
        return f"{self.metric} {self.text}"


@dataclass
class _Family:
    name: str
    type: str = "untyped"
    help: str = ""
    labels: "Set[str] | None" = None


def _families(text: str) -> Dict[str, _Family]:
    families: Dict[str, _Family] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                family = families.setdefault(parts[2], _Family(parts[2]))
                rest = parts[3].strip() if len(parts) > 3 else ""
                if parts[1] == "HELP":
                    family.help = rest
                else:
                    family.type = rest
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name = match.group("name")
        owner = families.get(name)
        if owner is None:
            owner = next((families[name[:-len(s)]] for f_type, ss in _SUFFIXES.items()
                          for s in ss if name.endswith(s) and name[:-len(s)] in families
                          and families[name[:-len(s)]].type == f_type), None)
        if owner is None:
            owner = families.setdefault(name, _Family(name))
        owner.labels = (owner.labels or set()) | set(
            _LABEL_NAME.findall(match.group("labels") or ""))
    return families


def _unit(name: str) -> "tuple[str, str] | None":
    for word in name.split("_"):
        if word in BASE_UNITS:
            return word, BASE_UNITS[word]
        for prefix in UNIT_PREFIXES:
            if word.startswith(prefix) and word[len(prefix):] in BASE_UNITS:
                return word, BASE_UNITS[word[len(prefix):]]
    return None


def _problems(family: _Family) -> List[str]:
    name, kind = family.name, family.type
    found: List[str] = []
    if not family.help:
        found.append("no help text")
    unit = _unit(name)
    if unit is not None and unit[0] != unit[1]:
        found.append(f'use base unit "{unit[1]}" instead of "{unit[0]}"')
    total = name.endswith("_total")
    if kind == "counter" and not total:
        found.append('counter metrics should have "_total" suffix')
    elif kind not in ("counter", "untyped") and total:
        found.append('non-counter metrics should not have "_total" suffix')
    labels = family.labels or set()
    if kind != "histogram" and "le" in labels:
        found.append('non-histogram metrics should not have "le" label')
    if kind != "summary" and "quantile" in labels:
        found.append('non-summary metrics should not have "quantile" label')
    if kind not in ("histogram", "summary"):
        for suffix in ("_count", "_sum", "_bucket"):
            if name.endswith(suffix):
                found.append(f'non-histogram and non-summary metrics should not '
                             f'have "{suffix}" suffix')
    lower = name.lower()
    for t in _TYPES:
        if f"_{t}_" in lower or lower.endswith(f"_{t}"):
            found.append(f"metric name should not include type '{t}'")
    if ":" in name:
        found.append("metric names should not contain ':'")
    if _CAMEL.search(name):
        found.append("metric names should be written in 'snake_case' not 'camelCase'")
    if any(_CAMEL.search(label) for label in labels):
        found.append("label names should be written in 'snake_case' not 'camelCase'")
    for abbreviation in ABBREVIATIONS:
        if f"_{abbreviation}_" in lower or lower.endswith(f"_{abbreviation}"):
            found.append("metric names should not contain abbreviated units")
            break
    return found


def lint(text: str) -> List[Problem]:
    """Every naming problem of a Prometheus text exposition, sorted.

    :returns: an empty list when every family follows the rules.
    """
    problems: Set[Problem] = set()
    for family in _families(text).values():
        problems.update(Problem(family.name, text) for text in _problems(family))
    return sorted(problems)
