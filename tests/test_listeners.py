"""Tests for :mod:`tigertunnel.net.listeners` (listen descriptions, held listeners, listen errors)."""

from typing import Any, List

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tigertunnel.config.model import TunnelConfig, parse_proxy
from tigertunnel.errors import ListenError
from tigertunnel.net.listeners import (
    ListenerService,
    listen_error,
    pair_listen_description,
    pair_listener,
    start_listening,
)

PAIR = parse_proxy("127.0.0.1:4000,127.0.0.1:3000", 0)


class RecordingPort:
    """A listening port that records whether it accepts."""

    def __init__(self) -> None:
        self.calls: List[str] = []

    def startReading(self) -> None:
        self.calls.append("start")

    def stopReading(self) -> None:
        self.calls.append("stop")

    def fileno(self) -> int:
        return 7


@implementer(IStreamServerEndpoint)
class PortEndpoint:
    """An endpoint whose listen succeeds with a RecordingPort."""

    def __init__(self) -> None:
        self.port = RecordingPort()

    def listen(self, factory: Any) -> "defer.Deferred[Any]":
        return defer.succeed(self.port)


class DescriptionTests(SynchronousTestCase):
    """Where a pair listens."""

    def test_own_address(self) -> None:
        """Without an override a pair listens on its -p address, with the tunnel's backlog."""
        config = TunnelConfig("client", [PAIR])
        self.assertEqual(pair_listen_description(config, PAIR),
                         "tcp:4000:interface=127.0.0.1:backlog=1024")

    def test_override(self) -> None:
        """A listen override (a systemd socket) replaces the pair's address."""
        config = TunnelConfig("client", [PAIR],
                              listen_overrides={0: "systemd:domain=INET:index=0"})
        self.assertEqual(pair_listen_description(config, PAIR), "systemd:domain=INET:index=0")
        other = parse_proxy(":5000,:3000", 1)
        self.assertEqual(pair_listen_description(config, other), "tcp:5000:backlog=1024")

    def test_listener_uses_description(self) -> None:
        """pair_listener listens on the pair's description through the given reactor."""
        reactor = MemoryReactorClock()
        service = pair_listener(TunnelConfig("server", [PAIR]), PAIR, Factory(), reactor)
        service.privilegedStartService()
        self.assertEqual([(port, interface, backlog) for port, _, backlog, interface
                          in reactor.tcpServers], [(4000, "127.0.0.1", 1024)])


class HeldListenerTests(SynchronousTestCase):
    """A held listener accepts nothing until released."""

    def test_held_until_released(self) -> None:
        """A held listener stops reading as soon as it is bound and starts once released, once."""
        endpoint = PortEndpoint()
        service = ListenerService(endpoint, Factory())
        service.held = True
        service.privilegedStartService()
        self.assertEqual(endpoint.port.calls, ["stop"])
        service.release()
        service.release()
        self.assertEqual(endpoint.port.calls, ["stop", "start"])
        self.assertIs(service.port, endpoint.port)

    def test_not_held(self) -> None:
        """A listener that is not held is left accepting."""
        endpoint = PortEndpoint()
        service = ListenerService(endpoint, Factory())
        service.privilegedStartService()
        service.release()
        self.assertEqual(endpoint.port.calls, [])


class ListenErrorTests(SynchronousTestCase):
    """A port that cannot be bound is one line naming where and why."""

    def test_message(self) -> None:
        """listen_error names the place and the system's reason."""
        error = CannotListenError("127.0.0.1", 4000, OSError(98, "Address already in use"))
        self.assertEqual(str(listen_error("127.0.0.1:4000", error)),
                         "cannot listen on 127.0.0.1:4000: Address already in use")

    def test_reason_without_strerror(self) -> None:
        """A reason that is not an OSError is given as its text."""
        error = CannotListenError("", 1, ValueError("bad port"))
        self.assertEqual(str(listen_error("x", error)), "cannot listen on x: bad port")

    def test_start_listening(self) -> None:
        """start_listening turns CannotListenError into ListenError and lets a clean start through."""
        def busy() -> None:
            raise CannotListenError("", 9101, OSError(13, "Permission denied"))

        with self.assertRaises(ListenError) as caught:
            start_listening(busy, "metrics endpoint tcp:9101")
        self.assertEqual(str(caught.exception),
                         "cannot listen on metrics endpoint tcp:9101: Permission denied")
        started: List[bool] = []
        start_listening(lambda: started.append(True), "anything")
        self.assertEqual(started, [True])

    def test_multiplexer_listen_error(self) -> None:
        """A pair whose port is taken fails to start with a ListenError naming its listen address."""
        from tigertunnel.net.multiplexer import ServerMultiplexer

        class Busy(MemoryReactorClock):
            def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                          interface: str = "") -> Any:
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))

        config = TunnelConfig("server", [PAIR])
        mux = ServerMultiplexer(config, PAIR, Busy())
        with self.assertRaises(ListenError) as caught:
            mux.privilegedStartService()
        self.assertEqual(str(caught.exception),
                         "cannot listen on 127.0.0.1:4000: Address already in use")


class GatedPort(RecordingPort):
    """A RecordingPort whose accept loop records how many it may take."""

    numberAccepts = 50

    def doRead(self) -> None:
        self.calls.append(f"accept {self.numberAccepts}")

    def stopListening(self) -> None:
        self.calls.append("closed")


class Gate:
    """An accept gate answering from a list, recording what it is told."""

    def __init__(self, answers: List[bool]) -> None:
        self.answers = answers
        self.told: List[str] = []

    def may_accept(self) -> bool:
        return self.answers.pop(0)

    def accepted(self) -> None:
        self.told.append("accepted")

    def paused(self) -> None:
        self.told.append("paused")


class GatedListenerTests(SynchronousTestCase):
    """A gated listener (``--workers``) asks before each accept and takes one."""

    def start(self, gate: Gate, held: bool = False) -> "tuple[ListenerService, GatedPort]":
        port = GatedPort()
        endpoint = PortEndpoint()
        endpoint.port = port
        service = ListenerService(endpoint, Factory())
        service.gate = gate
        service.held = held
        service.privilegedStartService()
        service.startService()
        return service, port

    def test_one_accept_per_turn_then_pause_and_resume(self) -> None:
        """Given the turn, the port accepts one connection; refused, it stops reading until resumed."""
        gate = Gate([True, False])
        service, port = self.start(gate)
        port.doRead()
        self.assertEqual(port.calls, ["accept 1"])
        port.doRead()
        self.assertEqual(port.calls, ["accept 1", "stop"])
        self.assertEqual(gate.told, ["accepted", "paused"])
        self.assertTrue(service.paused)
        service.resume()
        service.resume()
        self.assertEqual(port.calls, ["accept 1", "stop", "start"])
        self.assertFalse(service.paused)

    def test_resume_neither_while_held_nor_after_stop(self) -> None:
        """A paused listener that is held starts reading only once released; a stopped one never again."""
        service, port = self.start(Gate([False, False]), held=True)
        port.doRead()
        service.resume()
        self.assertEqual(port.calls, ["stop", "stop"])
        service.release()
        self.assertEqual(port.calls, ["stop", "stop", "start"])
        service.paused = True
        service.stopService()
        service.resume()
        self.assertEqual(port.calls, ["stop", "stop", "start", "closed"])
