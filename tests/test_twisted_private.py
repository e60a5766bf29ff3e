"""Names private to Twisted appear in :mod:`tigertunnel.net.twisted_private`
only (the rule is :mod:`tests.twistednames`), that module checks them at
import, and its callers fall back to Twisted's stock behaviour when a check
fails."""

import importlib
import importlib.util
import types
from typing import Dict, List, Tuple

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.twistednames import QUARANTINE, own_names, package_modules, twisted_names, uses
from tigertunnel.net import listeners, reactor as lean, sockets, twisted_private


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
