"""Names private to Twisted appear in :mod:`tigertunnel.net.twisted_private`
only, that module checks them at import, and its callers fall back to
Twisted's stock behaviour when a check fails.

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
import importlib
import importlib.util
import os
import types
from typing import Dict, Iterator, List, Optional, Set, Tuple

import twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import tigertunnel
from tigertunnel.net import listeners, reactor as lean, sockets, twisted_private

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


class QuarantineTests(SynchronousTestCase):
    """No module but net/twisted_private.py names anything private to Twisted."""

    def test_only_the_quarantine(self) -> None:
        """Rules 1-5 find nothing in the other modules of the package."""
        private = twisted_names() - own_names()
        found: Dict[str, List[Tuple[int, str]]] = {}
        for name, path in package_modules():
            with open(path, encoding="utf-8") as f:
                source = f.read()
            module = importlib.import_module(name) if "class " in source else None
            hits = uses(source, module, private)
            if hits:
                found[name] = hits
        self.assertEqual(found, {})

    def test_rules_see_each_kind(self) -> None:
        """The rules find each kind of use (so the check above can fail)."""
        private = twisted_names() - own_names()
        source = (
            "from twisted.internet import tcp\n"                        # 1
            "from twisted.internet._sslverify import OpenSSLCertificateOptions\n"
            "from twisted.internet.tcp import _accept\n"
            "tcp.Port._logger = None\n"                                  # 4
            "x = getattr(e, '_interface', None)\n"
            "ok = t.offset == len(t.dataBuffer)\n"                      # 6
            "setattr(port, 'doRead', f)\n"
            "port.doRead = f\n"                                          # 8
            "tcp.log = None\n"
            "class R(EPollReactor):\n"                                   # 10
            "    def f(self):\n"
            "        return self._pendingTimedCalls, self._own\n"       # 12
            "parts = parts._replace(path='/')\n"
        )
        module = types.ModuleType("probe")
        module.R = type("R", (EPollReactor,), {})  # type: ignore[attr-defined]
        self.assertEqual(uses(source, module, private), [
            (2, "twisted.internet._sslverify.OpenSSLCertificateOptions"),
            (3, "twisted.internet.tcp._accept"),
            (4, "_logger"), (5, "getattr _interface"), (6, "dataBuffer"),
            (7, "setattr doRead"), (8, "assigns doRead"), (9, "assigns log"),
            (12, "_pendingTimedCalls"), (12, "self._pendingTimedCalls"),
        ])

    def test_quarantine_uses_what_it_checks(self) -> None:
        """The quarantine itself does use Twisted private names (rule 3 finds them there),
        and each one it uses through a Twisted object is in the checks of MISSING's features."""
        with open(QUARANTINE, encoding="utf-8") as f:
            hits = {name for _, name in uses(f.read(), None, twisted_names() - own_names())}
        self.assertTrue({"_tempDataLen", "_writeDisconnected", "_raiseSynchronously",
                         "dataBuffer", "numberAccepts"} <= hits, hits)


def fresh_quarantine(case: SynchronousTestCase) -> Tuple[types.ModuleType, List[str]]:
    """Execute net/twisted_private.py again as a new module object (the
    package's own is left alone); return it and the warnings it logged."""
    logged: List[str] = []

    def observe(event: Dict[str, object]) -> None:
        if event.get("log_namespace") == "tigertunnel.net.twisted_private":
            from twisted.logger import formatEvent
            logged.append(f"{event['log_level'].name}: {formatEvent(event)}")  # type: ignore[union-attr]

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    spec = importlib.util.spec_from_file_location("tigertunnel.net.twisted_private", QUARANTINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, logged


class CheckTests(SynchronousTestCase):
    """The checks at import, on this Twisted and on one lacking a name."""

    def test_this_twisted_has_everything(self) -> None:
        """The supported Twisted versions have every name: every feature is on, nothing is logged."""
        module, logged = fresh_quarantine(self)
        self.assertEqual(module.MISSING, {feature: [] for feature in module.MISSING})
        self.assertEqual((module.LEAN_REACTOR, module.DIRECT_SEND, module.GATED_ACCEPT,
                          module.SYNC_LISTEN_ERRORS), (True,) * 4)
        self.assertEqual(logged, [])

    def test_check_finds_missing_and_changed(self) -> None:
        """check() names a missing attribute, accepts one an __init__ stores, and names a changed signature."""
        class Base:
            present = 1

            def __init__(self) -> None:
                self._stored = 0

            def _call(self, a: int) -> None:
                pass

        self.assertEqual(twisted_private.check(Base, ["present", "_stored", "_gone"],
                                               signatures={"_call": ["self", "a"]}),
                         ["Base._gone"])
        self.assertEqual(twisted_private.check(Base, [], signatures={"_call": ["self", "a", "b"]}),
                         ["Base._call(a, b)"])

    def test_missing_reactor_name(self) -> None:
        """Without EPollReactor._insertNewDelayedCalls the lean reactor is off, one warning
        says so, and install() installs Twisted's stock EPollReactor."""
        self.patch_out(EPollReactor, "_insertNewDelayedCalls")
        module, logged = fresh_quarantine(self)
        self.assertFalse(module.LEAN_REACTOR)
        self.assertTrue(module.DIRECT_SEND)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("EPollReactor._insertNewDelayedCalls()", logged[0])
        self.assertIn("using the stock epoll reactor", logged[0])
        self.assertTrue(logged[0].startswith("warn: Twisted "), logged[0])
        installed: List[object] = []
        self.patch(lean, "twisted_private", module)
        self.patch(lean, "installReactor", installed.append)
        reactor = lean.install()
        self.addCleanup(close, reactor)
        self.assertEqual(installed, [reactor])
        self.assertIs(type(reactor), EPollReactor)

    def test_missing_write_queue_name(self) -> None:
        """When a transport's __init__ no longer stores _tempDataLen, direct_sender
        writes through the transport."""
        from twisted.internet import abstract

        self.patch(abstract.FileDescriptor, "__init__", stock_init)
        module, logged = fresh_quarantine(self)
        self.assertFalse(module.DIRECT_SEND)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("transport.write for every send", logged[0])
        self.patch(sockets, "twisted_private", module)
        transport = QueueingConnection()
        send = sockets.direct_sender(transport)
        send(b"abc")
        self.assertEqual(transport.written, [b"abc"])
        self.assertEqual(transport.socket.sent, [])

    def test_missing_service_name(self) -> None:
        """Without StreamServerEndpointService._raiseSynchronously, pair_listener leaves
        the service's stock error handling (listen errors logged, not raised)."""
        self.patch_out(StreamServerEndpointService, "_raiseSynchronously")
        module, logged = fresh_quarantine(self)
        self.assertFalse(module.SYNC_LISTEN_ERRORS)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("listen errors logged, not fatal", logged[0])
        self.patch(listeners, "twisted_private", module)
        from twisted.internet.testing import MemoryReactorClock
        from tigertunnel.config.model import TunnelConfig, parse_proxy

        pair = parse_proxy("127.0.0.1:4000,127.0.0.1:3000", 0)
        service = listeners.pair_listener(TunnelConfig("server", [pair]), pair, Factory(),
                                          MemoryReactorClock())
        self.assertNotIn("_raiseSynchronously", vars(service))

    def test_missing_accept_count(self) -> None:
        """When tcp.Port's accept loop no longer uses numberAccepts, a gated listener
        leaves the port's doRead alone (every worker accepts as Twisted does)."""
        self.patch(tcp.Port, "doRead", lambda self: None)
        self.patch(tcp.Port, "startListening", lambda self: None)
        module, logged = fresh_quarantine(self)
        self.assertFalse(module.GATED_ACCEPT)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("Port.numberAccepts", logged[0])
        self.assertIn("Twisted's accept loop in every worker", logged[0])
        self.patch(listeners, "twisted_private", module)
        port = AcceptingPort()
        original = port.doRead
        service = listeners.ListenerService(PortEndpoint(port), Factory())
        service.gate = RefusingGate()
        service.privilegedStartService()
        self.assertEqual(port.doRead, original)
        port.doRead()
        self.assertEqual(port.accepts, 1)

    def patch_out(self, cls: type, name: str) -> None:
        """Remove ``name`` from the class (of ``cls``'s MRO) that defines it, for this test."""
        owner = next(k for k in cls.__mro__ if name in vars(k))
        value = vars(owner)[name]
        delattr(owner, name)
        self.addCleanup(setattr, owner, name, value)
        self.assertFalse(hasattr(cls, name))


def close(reactor: EPollReactor) -> None:
    """Release the descriptors of a reactor that was built but never run."""
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        reactor.removeReader(waker)
        waker.connectionLost(None)
    reactor._poller.close()


class AcceptingPort:
    """A listening port that counts its accept loops."""

    numberAccepts = 50

    def __init__(self) -> None:
        self.accepts = 0

    def doRead(self) -> None:
        self.accepts += 1

    def startReading(self) -> None:
        pass

    def stopReading(self) -> None:
        pass

    def fileno(self) -> int:
        return 7


class PortEndpoint:
    """An endpoint whose listen succeeds at once with ``port``."""

    def __init__(self, port: AcceptingPort) -> None:
        self.port = port

    def listen(self, factory: object) -> object:
        from twisted.internet import defer
        return defer.succeed(self.port)


class RefusingGate:
    """An accept gate that never gives this worker the turn."""

    def may_accept(self) -> bool:
        return False

    def accepted(self) -> None:
        pass

    def paused(self) -> None:
        pass


class FakeSocket:
    def __init__(self) -> None:
        self.sent: List[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)


def stock_init(self: object, reactor: object = None) -> None:
    """A FileDescriptor.__init__ that keeps its write queue under other names."""
    vars(self)["queue"] = []


class QueueingConnection(tcp.Connection):
    """A tcp.Connection on a fake socket (never connected to a real one): records writes."""

    def __init__(self) -> None:
        from twisted.internet import abstract
        from twisted.internet.testing import MemoryReactor

        abstract.FileDescriptor.__init__(self, MemoryReactor())
        self.socket = FakeSocket()  # type: ignore[assignment]
        self.written: List[bytes] = []
        self.connected = 1

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(data)


class CallersTests(SynchronousTestCase):
    """With every check passing, the callers use the quarantine."""

    def test_direct_sender_sends_when_queue_empty(self) -> None:
        """A tcp.Connection with nothing queued gets the direct sender; other transports get write."""
        transport = QueueingConnection()
        send = sockets.direct_sender(transport)
        send(b"abc")
        self.assertEqual((transport.socket.sent, transport.written), ([b"abc"], []))
        other = StringTransport()
        sockets.direct_sender(other)(bytearray(b"x"))
        self.assertEqual(other.value(), b"x")

    def test_lean_reactor_installed(self) -> None:
        """install() builds the lean reactor when its check passes."""
        installed: List[object] = []
        self.patch(lean, "installReactor", installed.append)
        reactor = lean.install()
        self.addCleanup(close, reactor)
        self.assertIsInstance(reactor, lean.LeanEPollReactor)

    def test_listener_sets_the_flag(self) -> None:
        """pair_listener makes listen errors fatal at start-up."""
        from twisted.internet.testing import MemoryReactorClock
        from tigertunnel.config.model import TunnelConfig, parse_proxy

        pair = parse_proxy("127.0.0.1:4000,127.0.0.1:3000", 0)
        service = listeners.pair_listener(TunnelConfig("server", [pair]), pair, Factory(),
                                          MemoryReactorClock())
        self.assertTrue(vars(service).get("_raiseSynchronously"))
