"""The front page and the docs: README.rst stays a front page with its two
set-up commands; docs/development.rst maps every module of the package (and
none that is gone); the package's citations of the wire format point at
sections of docs/protocol.rst that exist."""

import ast
import re
from pathlib import Path
from typing import Dict, Set

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tigertunnel"
README = ROOT / "README.rst"
DEVELOPMENT = ROOT / "docs" / "development.rst"
PROTOCOL = ROOT / "docs" / "protocol.rst"
API = ROOT / "docs" / "api.rst"
CI_RUN = ROOT / ".ci" / "run"

#: The longest the front page may grow; the rest belongs in docs/.
README_MAX_LINES = 300
#: README.rst's two set-up commands, exactly (CI runs the second).
DEMO_COMMAND = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/tigertunnel demo"
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install tox && .venv/bin/tox"
#: A citation of the wire format in the package: ``docs/protocol.rst §6.2``,
#: ``§§1, 6 and 7``, ``§§3-7``.
CITATION = re.compile(r"docs/protocol\.rst\s+(?:#\s*|\*\s*)?§§?(\d+(?:\.\d+)?(?:(?:, |,| and |-)\d+(?:\.\d+)?)*)")
#: A numbered section title of docs/protocol.rst: ``6.2 Encrypted frame layout``.
SECTION = re.compile(r"^(\d+(?:\.\d+)?)\.? \S")

#: A folder line of the map: ``wire/``: ... or ``tigertunnel/`` (top level).
FOLDER = re.compile(r"^``([a-z_]+/)``")
#: A module line of the map: - ``frames.py``: ...
MODULE = re.compile(r"^- ``([\w/]+\.py)``: \S")


def module_map(readme: str) -> Set[str]:
    """The module paths (relative to ``tigertunnel/``) listed in the "Module map" of ``readme``.

    :raises ValueError: the page has no "Module map" section.
    """
    lines = readme.splitlines()
    try:
        start = lines.index("Module map")
    except ValueError:
        raise ValueError("no 'Module map' section") from None
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


def protocol_sections(page: str) -> Set[str]:
    """The numbers of the sections of ``page`` (docs/protocol.rst): ``"6"``, ``"6.2"``."""
    lines = page.splitlines()
    found: Set[str] = set()
    for line, underline in zip(lines, lines[1:]):
        title = SECTION.match(line)
        if title and underline and set(underline) <= set("-~^") and len(underline) == len(line):
            found.add(title.group(1))
    return found


def cited_sections(source: str) -> Set[str]:
    """The section numbers ``source`` cites as ``docs/protocol.rst §N.N`` (a
    range ``§§3-7`` gives its two ends)."""
    cited: Set[str] = set()
    for found in CITATION.finditer(source):
        cited.update(re.split(r", |,| and |-", found.group(1)))
    return cited


def package_sources() -> Dict[str, str]:
    """The text of every source file of the package (Python, C, stubs), by path."""
    return {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
            for path in sorted(PACKAGE.rglob("*"))
            if path.suffix in (".py", ".c", ".pyi")}


class ModuleMapTests(SynchronousTestCase):
    """docs/development.rst maps the package as it is."""

    def test_every_module_listed(self) -> None:
        """Every module of the package has a line in docs/development.rst's module map."""
        listed = module_map(DEVELOPMENT.read_text(encoding="utf-8"))
        self.assertEqual(sorted(package_modules() - listed), [])

    def test_no_module_listed_that_is_gone(self) -> None:
        """Every module line of docs/development.rst's module map names a module that exists."""
        listed = module_map(DEVELOPMENT.read_text(encoding="utf-8"))
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


def module_name(path: str) -> str:
    """The dotted name of a module path relative to ``tigertunnel/``: ``wire/frames.py``
    is ``tigertunnel.wire.frames``, ``ops/workers/__init__.py`` ``tigertunnel.ops.workers``."""
    parts = ["tigertunnel"] + path[:-len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class APIReferenceTests(SynchronousTestCase):
    """docs/api.rst documents every Python module of the package, and nothing else."""

    def test_every_module_documented(self) -> None:
        """Each module (but ``__main__``) has an ``automodule`` in docs/api.rst;
        each ``automodule`` there is a module or package of the package."""
        documented = set(re.findall(r"^\.\. automodule:: (\S+)$",
                                    API.read_text(encoding="utf-8"), re.M))
        modules = {module_name(path) for path in package_modules()
                   if path.endswith(".py") and path != "__main__.py"}
        packages = {module_name(init.relative_to(PACKAGE).as_posix())
                    for init in PACKAGE.rglob("__init__.py")}
        self.assertEqual(sorted(modules - documented), [])
        self.assertEqual(sorted(documented - modules - packages), [])

    def test_module_name(self) -> None:
        """Paths map to dotted names; a package's ``__init__.py`` is the package."""
        self.assertEqual([module_name(p) for p in ("tap.py", "wire/frames.py",
                                                   "ops/workers/__init__.py")],
                         ["tigertunnel.tap", "tigertunnel.wire.frames", "tigertunnel.ops.workers"])


class FrontPageTests(SynchronousTestCase):
    """README.rst is a front page: short, with the two set-up commands CI relies on."""

    def test_short(self) -> None:
        """README.rst has at most 300 lines; the manual is in docs/."""
        lines = README.read_text(encoding="utf-8").count("\n")
        self.assertLessEqual(lines, README_MAX_LINES)

    def test_setup_commands(self) -> None:
        """Both set-up commands are in README.rst, each on a literal line of its own."""
        lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
        self.assertIn(DEMO_COMMAND, lines)
        self.assertIn(TEST_COMMAND, lines)

    def test_ci_runs_readme_test_command(self) -> None:
        """.ci/run runs README.rst's test command, character for character."""
        if not CI_RUN.exists():
            raise self.skipTest("not run from a checkout (no .ci/run)")
        self.assertIn(f"({TEST_COMMAND})", CI_RUN.read_text(encoding="utf-8"))

    def test_links_resolve(self) -> None:
        """Every ``docs/...`` page README.rst links to exists."""
        links = re.findall(r"<(docs/[\w.-]+)>`_", README.read_text(encoding="utf-8"))
        self.assertGreaterEqual(len(links), 6)
        self.assertEqual([link for link in links if not (ROOT / link).is_file()], [])


class ProtocolCitationTests(SynchronousTestCase):
    """The package cites the wire format in docs/protocol.rst, by sections that exist."""

    def test_no_protocol_md(self) -> None:
        """No source file of the package cites PROTOCOL.md, which is not in the repository."""
        self.assertEqual([path for path, text in package_sources().items()
                          if "PROTOCOL.md" in text], [])

    def test_cited_sections_exist(self) -> None:
        """Every ``docs/protocol.rst §N.N`` of the package is a section of that page."""
        sections = protocol_sections(PROTOCOL.read_text(encoding="utf-8"))
        cited = {path: cited_sections(text) for path, text in package_sources().items()}
        self.assertGreaterEqual(sum(len(numbers) for numbers in cited.values()), 30)
        self.assertEqual({path: sorted(numbers - sections)
                          for path, numbers in cited.items() if numbers - sections}, {})

    def test_sections_parsed(self) -> None:
        """Numbered titles are sections; other lines that start with a number are not."""
        page = ("Wire protocol\n=============\n\n6. Frames\n---------\n\n"
                "6.2 Layout\n~~~~~~~~~~\n\n1. a list item\n\n12 bytes\n--\n")
        self.assertEqual(protocol_sections(page), {"6", "6.2"})

    def test_citations_parsed(self) -> None:
        """One section, a list, a range, and a citation cut by a line break are all read."""
        source = ("(docs/protocol.rst §6.2) docs/protocol.rst §§1, 6 and 7.1 "
                  "docs/protocol.rst §§3-7 docs/protocol.rst\n  # §11 item 9")
        self.assertEqual(cited_sections(source), {"6.2", "1", "6", "7.1", "3", "7", "11"})
