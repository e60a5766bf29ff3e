"""The dependency sets CI runs the suite on: ``tox -e oldest`` pins every
``install_requires`` dependency of ``setup.cfg`` to its lower bound, ``tox -e
newest`` upgrades them all, both are in tox's ``envlist`` (so README's test
command, which ``.ci/run`` runs, runs them), and Twisted is bounded above."""

import configparser
import os
import re
from typing import Dict, List, Tuple

from twisted.trial.unittest import SynchronousTestCase

import tigertunnel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tigertunnel.__file__)))
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?\s*(.*)$")


def _name(text: str) -> str:
    """A distribution name as pip compares them."""
    return re.sub(r"[-_.]+", "-", text).lower()


def _read(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, path))
    return parser


def _lines(value: str) -> List[str]:
    return [line.strip() for line in value.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def requirements() -> Dict[str, List[Tuple[str, str]]]:
    """setup.cfg's install_requires: name to its (operator, version) clauses."""
    found = {}
    for line in _lines(_read("setup.cfg")["options"]["install_requires"]):
        match = REQUIREMENT.match(line)
        assert match is not None, line
        clauses = re.findall(r"(>=|<=|==|<|>|!=|~=)\s*([\w.]+)", match.group(2))
        found[_name(match.group(1))] = clauses
    return found


def oldest_pins() -> Dict[str, str]:
    """tox.ini's [testenv:oldest] deps pinned with ``==``: name to version."""
    pins = {}
    for line in _lines(_read("tox.ini")["testenv:oldest"]["deps"]):
        match = REQUIREMENT.match(line)
        assert match is not None, line
        pinned = re.fullmatch(r"==\s*([\w.]+)", match.group(2).strip())
        if pinned:
            pins[_name(match.group(1))] = pinned.group(1)
    return pins


def _same_version(a: str, b: str) -> bool:
    """``47`` and ``47.0.0`` are the same version."""
    def parts(v: str) -> List[int]:
        numbers = [int(p) for p in v.split(".")]
        while numbers and numbers[-1] == 0:
            numbers.pop()
        return numbers
    return parts(a) == parts(b)


class DependencySetTests(SynchronousTestCase):
    """setup.cfg's bounds and the tox environments that test them agree."""

    def test_oldest_pins_every_lower_bound(self) -> None:
        """Every dependency has a lower bound and the oldest env pins exactly it."""
        pins = oldest_pins()
        wrong = []
        for name, clauses in requirements().items():
            lower = [v for op, v in clauses if op == ">="]
            if len(lower) != 1 or name not in pins or not _same_version(pins[name], lower[0]):
                wrong.append((name, lower, pins.get(name)))
        self.assertEqual(wrong, [])
        self.assertEqual(sorted(set(pins) - set(requirements())), [])

    def test_twisted_bounded_above(self) -> None:
        """Twisted has an upper bound (a release that renames what
        net/twisted_private.py checks is not installed unseen)."""
        self.assertIn("<", [op for op, _ in requirements()["twisted"]])

    def test_both_sets_run_by_default(self) -> None:
        """oldest and newest are in envlist; newest upgrades every dependency."""
        tox = _read("tox.ini")
        envs = [e.strip() for e in tox["tox"]["envlist"].split(",")]
        self.assertTrue({"oldest", "newest"} <= set(envs), envs)
        command = tox["testenv:newest"]["install_command"]
        self.assertIn("--upgrade", command.split())
        self.assertIn("--upgrade-strategy eager", command)
