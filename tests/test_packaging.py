"""The packaging metadata says the truth: Python versions, dependencies, licence, typing.

Read from ``setup.cfg`` and the installed dependencies' own metadata; what
setuptools makes of it is checked on a real build in
``tests/integration/test_packaging.py``.
"""

import configparser
import importlib.metadata
import os
import re
import sys
from typing import List, Optional, Tuple

from twisted.trial.unittest import SynchronousTestCase

import tigertunnel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(tigertunnel.__file__))


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        config.read_file(f)
    return config


def listed(value: str) -> List[str]:
    """The lines of a multi-line setup.cfg value, without comments."""
    return [line.strip() for line in value.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def minimum_python(spec: Optional[str]) -> Tuple[int, ...]:
    """The lowest Python a ``Requires-Python`` spec allows (``>=3.11`` -> (3, 11))."""
    found = re.search(r">=\s*([0-9]+(?:\.[0-9]+)*)", spec or "")
    return tuple(int(part) for part in found.group(1).split(".")) if found else (0,)


def version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"[0-9]+", text)[:3])


class MetadataTests(SynchronousTestCase):
    """setup.cfg against what installs and what the suite runs on."""

    def setUp(self) -> None:
        self.config = setup_cfg()

    def requirements(self) -> List[Tuple[str, str]]:
        out = []
        for line in listed(self.config["options"]["install_requires"]):
            name = re.match(r"[A-Za-z0-9_.-]+", line)
            assert name is not None, line
            out.append((name.group(0), line[name.end():].strip()))
        return out

    def test_python_requires_covers_every_dependency(self) -> None:
        """python_requires is no lower than the Requires-Python of any dependency (pyaegis needs 3.11)."""
        ours = minimum_python(self.config["options"]["python_requires"])
        self.assertGreaterEqual(ours, (3, 11))
        for name, _ in self.requirements():
            theirs = minimum_python(importlib.metadata.metadata(name).get("Requires-Python"))
            self.assertGreaterEqual(ours, theirs, f"{name} needs Python {theirs}")
        self.assertGreaterEqual(sys.version_info[:2], ours)

    def test_pyaegis_pinned_to_the_tested_series(self) -> None:
        """pyaegis has an upper bound, and the installed version (the one tested) is inside the range."""
        (spec,) = [spec for name, spec in self.requirements() if name == "pyaegis"]
        bounds = dict((op, version_tuple(v)) for op, v in re.findall(r"(>=|<)\s*([0-9.]+)", spec))
        self.assertEqual(sorted(bounds), ["<", ">="], spec)
        installed = version_tuple(importlib.metadata.version("pyaegis"))
        self.assertTrue(bounds[">="] <= installed < bounds["<"], (spec, installed))

    def test_classifiers(self) -> None:
        """The classifiers name the licence, typing and Python versions, none below python_requires, the tested one included."""
        classifiers = listed(self.config["metadata"]["classifiers"])
        self.assertIn("License :: OSI Approved :: ISC License (ISCL)", classifiers)
        self.assertIn("Typing :: Typed", classifiers)
        versions = [version_tuple(c.rsplit("::", 1)[1]) for c in classifiers
                    if re.fullmatch(r"Programming Language :: Python :: 3\.[0-9]+", c)]
        self.assertIn(sys.version_info[:2], versions)
        lowest = minimum_python(self.config["options"]["python_requires"])
        self.assertTrue(all(v >= lowest for v in versions), versions)

    def test_license_file(self) -> None:
        """LICENSE is the ISC licence of 'the tigertunnel authors', and setup.cfg ships it."""
        self.assertEqual(self.config["metadata"]["license"], "ISC")
        self.assertEqual(listed(self.config["metadata"]["license_files"]), ["LICENSE"])
        with open(os.path.join(ROOT, "LICENSE")) as f:
            text = f.read()
        self.assertTrue(text.startswith("ISC License\n"))
        self.assertIn("Copyright (c) 2026 the tigertunnel authors", text)
        self.assertIn("Permission to use, copy, modify, and/or distribute this software", text)

    def test_py_typed(self) -> None:
        """The package carries the py.typed marker, and package_data ships it."""
        self.assertTrue(os.path.isfile(os.path.join(PACKAGE, "py.typed")))
        data = [part.strip() for part in
                self.config["options.package_data"]["tigertunnel"].split(",")]
        self.assertIn("py.typed", data)
