"""The package's layers: imports point one way, and the sans-IO layer never
imports the reactor.

Layers, lowest first (a module may import its own layer and lower ones):

0. ``errors``, ``logs`` (shared by everything)
1. ``crypto``, ``keys``, ``config`` (sans-IO: primitives, key files, settings)
2. ``wire`` (sans-IO: TB frames, mux frames, the codec, the handshake; it
   uses the AEAD and KDF of ``crypto``, never the other way)
3. ``stats`` (a proxy pair's counters) and ``interfaces`` (the typed seams
   between net's objects): below ``net``, which implements both sides of
   each seam
4. ``net`` (Twisted glue: protocols, multiplexer, pool, listeners;
   ``tests/test_seams.py`` orders its own modules)
5. ``ops`` (reload, shutdown, metrics, systemd, workers)
6. ``tools`` (bench, demo, echo backend, traces, status)
7. ``tap``, ``cli``, ``__main__`` (entry points)

There is no exception list: a module imports its own layer and lower ones
only, ``TYPE_CHECKING`` imports included.
"""

import ast
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Tuple

from twisted.trial.unittest import SynchronousTestCase

import tigertunnel

PACKAGE = os.path.dirname(os.path.abspath(tigertunnel.__file__))

RANK: Dict[str, int] = {
    "errors": 0, "logs": 0, "__init__": 0,
    "crypto": 1, "keys": 1, "config": 1,
    "wire": 2,
    "stats": 3, "interfaces": 3,
    "net": 4,
    "ops": 5,
    "tools": 6,
    "tap": 7, "cli": 7, "__main__": 7,
}

#: The packages that must never import twisted.internet (or any reactor).
SANS_IO = ("wire", "crypto", "keys", "config")


def _modules() -> Iterator[Tuple[str, str]]:
    """Yield (dotted module name, path) of every module of the package."""
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3]
            module = rel.replace(os.sep, ".")
            if module.endswith(".__init__"):
                module = module[: -len(".__init__")]
            yield module, path


def layer_of(module: str) -> str:
    """The layer name of ``tigertunnel.X...``: its first component."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(name: str) -> bool:
    """Whether ``tigertunnel.<name>`` is a module or package (not a name in ``__init__``)."""
    return (os.path.exists(os.path.join(PACKAGE, name + ".py"))
            or os.path.isdir(os.path.join(PACKAGE, name)))


def imported(path: str, module: str) -> List[Tuple[int, str]]:
    """The tigertunnel modules ``path`` imports (at any depth), with line numbers."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                if not path.endswith("__init__.py"):
                    package = package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            if base == "tigertunnel":
                # ``from tigertunnel import x``: a module, or a name of the
                # package itself (``__version__``: layer 0).
                found += [(node.lineno, f"tigertunnel.{a.name}"
                           if _is_module(a.name) else "tigertunnel")
                          for a in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found
            if name == "tigertunnel" or name.startswith("tigertunnel.")]


def imported_anything(path: str) -> List[Tuple[int, str]]:
    """Every absolute module name ``path`` imports (at any depth), with line numbers.

    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a module).
    """
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found: List[Tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


class ImportDirectionTests(SynchronousTestCase):
    """Imports between tigertunnel's layers point downwards only."""

    def test_every_module_has_a_layer(self) -> None:
        """Every module of the package belongs to a known layer."""
        unknown = sorted({layer_of(m) for m, _ in _modules()} - set(RANK))
        self.assertEqual(unknown, [])

    def test_imports_point_down(self) -> None:
        """No module imports a module of a higher layer (TYPE_CHECKING imports included)."""
        wrong = []
        for module, path in _modules():
            mine = RANK[layer_of(module)]
            for line, name in imported(path, module):
                theirs = RANK.get(layer_of(name), 99)
                if theirs > mine:
                    wrong.append(f"{module}:{line} imports {name}")
        self.assertEqual(wrong, [])

    def test_checker_sees_an_upward_import(self) -> None:
        """The check itself flags an import from a higher layer."""
        source = os.path.join(PACKAGE, "wire", "frames.py")
        found = imported(source, "tigertunnel.wire.frames")
        self.assertTrue(all(RANK[layer_of(n)] <= 1 for _, n in found))
        tree_text = "from tigertunnel.net.multiplexer import ClientMultiplexer\n"
        tmp = self.mktemp()
        with open(tmp, "w") as f:
            f.write(tree_text)
        (line, name), = imported(tmp, "tigertunnel.wire.fake")
        self.assertGreater(RANK[layer_of(name)], RANK["wire"])


class SansIOTests(SynchronousTestCase):
    """The sans-IO packages run without the reactor."""

    def test_no_twisted_internet(self) -> None:
        """No module of wire/, crypto/, keys/ or config/ imports twisted.internet, at import time or inside a function."""
        sources = sorted((m, p) for m, p in _modules() if layer_of(m) in SANS_IO)
        modules = [m for m, _ in sources]
        self.assertGreater(len(modules), 8)
        named = [f"{module}:{line} imports {name}" for module, path in sources
                 for line, name in imported_anything(path)
                 if name == "twisted.internet" or name.startswith("twisted.internet.")]
        self.assertEqual(named, [])
        code = ("import importlib, sys\n"
                f"for m in {modules!r}: importlib.import_module(m)\n"
                "bad = sorted(n for n in sys.modules if n.startswith('twisted.internet'))\n"
                "print(','.join(bad))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                             text=True, check=True).stdout.strip()
        self.assertEqual(out, "")

    def test_checker_sees_a_function_level_reactor_import(self) -> None:
        """The static part of the check flags ``from twisted.internet import reactor`` inside a function."""
        tmp = self.mktemp()
        with open(tmp, "w") as f:
            f.write("def later():\n    from twisted.internet import reactor\n    return reactor\n")
        self.assertEqual(imported_anything(tmp), [(2, "twisted.internet"),
                                                  (2, "twisted.internet.reactor")])
