"""Finding names private to Twisted in this package's source, with :mod:`ast`
(used by ``tests/test_twisted_private.py``).

What counts as a Twisted private name (checked from the source, with
:mod:`ast`, in every module of the package but ``net/twisted_private.py``):

1. an import of a Twisted module or name whose dotted path has a component
   starting with ``_`` (``from twisted.internet._sslverify import ...``,
   ``from twisted.internet.tcp import _accept``);
2. ``self._name`` in a class with a Twisted class among its ancestors,
   where ``_name`` is an attribute of one of those Twisted ancestors or is
   used as an attribute by one of their methods (``self._started`` in an
   ``EPollReactor`` subclass);
3. ``anything._name`` (or ``getattr``/``hasattr``/``setattr``/``delattr``
   of ``"_name"``) where ``_name`` is a name Twisted's own source (the
   installed ``twisted`` package, its tests left out) defines or uses as an
   attribute, and that this package does not define itself
   (``tcp.Port._logger``, ``getattr(endpoint, "_interface")``), the
   documented namedtuple methods (:data:`NAMEDTUPLE`) excepted (what this
   package defines: its functions, classes, arguments, imports-as, names
   it assigns and attributes it assigns on ``self``/``cls``; not an
   attribute it assigns on another object, such as ``tcp.Port._logger``);
4. the public-looking attributes that are Twisted implementation details
   (:data:`DETAILS`: a transport's write queue, a port's accept count);
5. replacing what the reactor calls on a live object (an assignment or
   ``setattr`` of ``doRead``/``doWrite``), or assigning to an attribute of
   a Twisted module (``tcp.log = ...``).

Rule 3 cannot see a private name that this package also defines for
itself (``_log``, ``_reactor``) used on a Twisted object; rule 2 covers the
usual way that happens, a subclass.
"""

import ast
import importlib.util
import os
import types
from typing import Iterator, List, Optional, Set, Tuple

import twisted

import tigertunnel

PACKAGE = os.path.dirname(os.path.abspath(tigertunnel.__file__))
QUARANTINE = os.path.join(PACKAGE, "net", "twisted_private.py")

#: Public-looking attributes that are Twisted implementation details.
DETAILS = frozenset({"dataBuffer", "numberAccepts"})
#: Methods the reactor calls on a registered descriptor: never replaced on a live object.
REACTOR_CALLS = frozenset({"doRead", "doWrite"})
#: namedtuple's documented methods (an underscore only to avoid field names).
NAMEDTUPLE = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})
ATTRIBUTE_CALLS = frozenset({"getattr", "hasattr", "setattr", "delattr"})


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _bound_and_used(tree: ast.AST) -> Set[str]:
    """The private identifiers ``tree`` defines or uses as attributes."""
    names: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[-1])
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _private(n)}


def _sources(root: str, skip_tests: bool) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        if skip_tests:
            dirs[:] = [d for d in dirs if d not in ("test", "tests")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _parse(path: str) -> ast.AST:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


_twisted_names: Optional[Set[str]] = None


def twisted_names() -> Set[str]:
    """Every private identifier Twisted's source defines or uses as an attribute."""
    global _twisted_names
    if _twisted_names is None:
        found: Set[str] = set()
        for path in _sources(os.path.dirname(twisted.__file__), skip_tests=True):
            try:
                found |= _bound_and_used(_parse(path))
            except SyntaxError:
                continue
        _twisted_names = found
    return _twisted_names


def own_names(skip: str = QUARANTINE) -> Set[str]:
    """The private identifiers this package defines (the quarantine left out)."""
    found: Set[str] = set()
    for path in _sources(PACKAGE, skip_tests=False):
        if path == skip:
            continue
        for node in ast.walk(_parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                found.add(node.id)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.add(node.attr)  # set on another object, it is not ours
            elif isinstance(node, ast.alias) and node.asname:
                found.add(node.asname)
            elif isinstance(node, ast.arg):
                found.add(node.arg)
    return {n for n in found if _private(n)}


def _ancestor_names(cls: type) -> Set[str]:
    """The names Twisted's ancestors of ``cls`` have or use as attributes."""
    names: Set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("twisted."):
            continue
        names |= set(vars(klass))
        for value in vars(klass).values():
            code = getattr(value, "__code__", None)
            if isinstance(code, types.CodeType):
                stack = [code]
                while stack:
                    c = stack.pop()
                    names |= set(c.co_names)
                    stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return names


def _twisted_modules(tree: ast.AST) -> Set[str]:
    """Local names bound to Twisted modules by the imports of ``tree``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("twisted"):
                    found.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                try:
                    is_module = importlib.util.find_spec(full) is not None
                except (ImportError, ValueError):
                    is_module = False
                if is_module:
                    found.add(a.asname or a.name)
    return found


def uses(source: str, module: Optional[types.ModuleType], private: Set[str]) -> List[Tuple[int, str]]:
    """The Twisted private names ``source`` uses, with line numbers (rules 1-5).

    :param module: the imported module (to resolve the classes of rule 2),
        or ``None`` to skip rule 2.
    :param private: the names of rule 3 (Twisted's, minus this package's).
    """
    tree = ast.parse(source)
    found: List[Tuple[int, str]] = []
    twisted_modules = _twisted_modules(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names
                      if a.name.startswith("twisted") and any(map(_private, a.name.split(".")))]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if any(map(_private, f"{node.module}.{a.name}".split(".")))]
        elif isinstance(node, ast.ClassDef) and module is not None:
            cls = getattr(module, node.name, None)
            if not isinstance(cls, type):
                continue
            theirs = {n for n in _ancestor_names(cls) if _private(n)}
            for inner in ast.walk(node):
                if (isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name)
                        and inner.value.id == "self" and inner.attr in theirs):
                    found.append((inner.lineno, f"self.{inner.attr}"))
        elif isinstance(node, ast.Attribute):
            if (node.attr in private and node.attr not in NAMEDTUPLE) or node.attr in DETAILS:
                found.append((node.lineno, node.attr))
            elif isinstance(node.ctx, ast.Store) and (
                    node.attr in REACTOR_CALLS or (isinstance(node.value, ast.Name)
                                                   and node.value.id in twisted_modules)):
                found.append((node.lineno, f"assigns {node.attr}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ATTRIBUTE_CALLS and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
            target = node.args[0]
            if (name in private or name in DETAILS
                    or (node.func.id in ("setattr", "delattr")
                        and (name in REACTOR_CALLS or (isinstance(target, ast.Name)
                                                       and target.id in twisted_modules)))):
                found.append((node.lineno, f"{node.func.id} {name}"))
    return sorted(set(found))


def package_modules() -> Iterator[Tuple[str, str]]:
    """(dotted name, path) of every module of the package but the quarantine."""
    for path in _sources(PACKAGE, skip_tests=False):
        if path == QUARANTINE:
            continue
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path
