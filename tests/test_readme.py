"""README.rst's module map: one line for every module of the package, and none for a module that is gone."""

import ast
import re
from pathlib import Path
from typing import Set

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tigertunnel"

#: A folder line of the map: ``wire/``: ... or ``tigertunnel/`` (top level).
FOLDER = re.compile(r"^``([a-z_]+/)``")
#: A module line of the map: - ``frames.py``: ...
MODULE = re.compile(r"^- ``([\w/]+\.py)``: \S")


def module_map(readme: str) -> Set[str]:
    """The module paths (relative to ``tigertunnel/``) listed in the "Module map" of ``readme``.

    :raises ValueError: the README has no "Module map" section.
    """
    lines = readme.splitlines()
    try:
        start = lines.index("Module map")
    except ValueError:
        raise ValueError("README.rst has no 'Module map' section") from None
    listed: Set[str] = set()
    folder = ""
    for index, line in enumerate(lines[start + 2:], start + 2):
        next_line = lines[index + 1] if index + 1 < len(lines) else ""
        if next_line and set(next_line) <= set("-~=^") and len(next_line) == len(line):
            break  # the next section's title
        found = FOLDER.match(line)
        if found:
            folder = "" if found.group(1) == "tigertunnel/" else found.group(1)
            continue
        found = MODULE.match(line)
        if found:
            listed.add(folder + found.group(1))
    return listed


def package_modules() -> Set[str]:
    """Every module of the package (relative to ``tigertunnel/``), but package
    ``__init__.py`` files that hold nothing but a docstring."""
    found: Set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent != PACKAGE:
            body = ast.parse(path.read_text(encoding="utf-8")).body
            if all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                   for node in body):
                continue
        found.add(path.relative_to(PACKAGE).as_posix())
    return found


class ModuleMapTests(SynchronousTestCase):
    """README.rst's development section maps the package as it is."""

    def test_every_module_listed(self) -> None:
        """Every module of the package has a line in README.rst's module map."""
        listed = module_map((ROOT / "README.rst").read_text(encoding="utf-8"))
        self.assertEqual(sorted(package_modules() - listed), [])

    def test_no_module_listed_that_is_gone(self) -> None:
        """Every module line of README.rst's module map names a module that exists."""
        listed = module_map((ROOT / "README.rst").read_text(encoding="utf-8"))
        self.assertEqual(sorted(listed - package_modules()), [])

    def test_map_parsed_by_folder(self) -> None:
        """A module line belongs to the folder line above it; the top level has no prefix."""
        readme = ("Module map\n~~~~~~~~~~\n\n``tigertunnel/`` (top level)\n\n"
                  "- ``tap.py``: options.\n\n``wire/``: sans-IO\n\n- ``frames.py``: frames.\n"
                  "- ``workers/bootstrap.py``: start.\n\nTypes\n~~~~~\n\n- ``gone.py``: no.\n")
        self.assertEqual(module_map(readme),
                         {"tap.py", "wire/frames.py", "wire/workers/bootstrap.py"})

    def test_missing_section_named(self) -> None:
        """A README without the section is an error naming the section."""
        error = self.assertRaises(ValueError, module_map, "Development\n-----------\n")
        self.assertIn("'Module map'", str(error))
