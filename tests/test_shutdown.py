"""Tests for :mod:`tigertunnel.ops.shutdown` (graceful stop of a tunnel end), on the in-memory network."""

from typing import List, Tuple

from twisted.application.service import Service
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.memnet import BackendFactory, TBPeer, Tunnel
from tests.strategies import make_tb_frame
from tigertunnel.stats import Refusal
from tigertunnel.ops.shutdown import ABORT_GRACE, TunnelService


def frame(tag: int) -> bytes:
    """A small TB frame recognisable by its tag."""
    return make_tb_frame(bytes([tag]) * 30, bytes([tag]) * 64)


class Recording(Service):
    """An operations service that records when it starts and stops."""

    def __init__(self, name: str, events: List[str]) -> None:
        self.name = name
        self.events = events

    def startService(self) -> None:
        super().startService()
        self.events.append(f"start {self.name}")

    def stopService(self) -> None:
        super().stopService()
        self.events.append(f"stop {self.name}")


class DrainCase(SynchronousTestCase):
    """A tunnel whose ends sit under TunnelServices; the backend records frames."""

    timeout_seconds = 10.0

    def setUp(self) -> None:
        self.t = Tunnel(backend=BackendFactory(), pool_size=2)
        self.server_top = TunnelService(self.t.clock, self.timeout_seconds)
        self.client_top = TunnelService(self.t.clock, self.timeout_seconds)
        self.t.server.setServiceParent(self.server_top)
        self.t.client.setServiceParent(self.client_top)
        self.server_top.startService()
        self.client_top.startService()
        self.t.net.flush()

    def session(self) -> Tuple[TBPeer, TBPeer]:
        """A TB client and the backend connection of its session."""
        peer, _ = self.t.tb_client()
        peer.send(frame(0))
        self.t.net.flush()
        return peer, self.t.backend.peers[-1]

    def pump_once(self) -> None:
        """Move bytes one step on every connection (no clock, no settling)."""
        for pump in list(self.t.net.pumps):
            pump.pump(advanceClock=False)


class ClientStopTests(DrainCase):
    """Stopping a tunnel client."""

    def test_frames_read_before_stop_reach_the_backend(self) -> None:
        """A frame the client had read is delivered, and the session ends before its pool connection."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        peer, backend = self.session()
        peer.send(frame(1))
        self.pump_once()  # the tunnel client reads it and writes it to its pool connection
        d = self.client_top.stopService()
        self.t.net.advance(0.5)
        self.successResultOf(d)
        self.assertEqual(backend.received, [frame(0), frame(1)])
        self.assertTrue(backend.lost)
        self.assertTrue(peer.lost)
        self.assertEqual(self.t.client.pool_connections, [])
        self.assertEqual(self.t.client.sessions, set())
        # The server saw the stream close before the pool connections went.
        lost = [e for e in events if e.get("role") == "server" and "count" in e]
        self.assertEqual([e["count"] for e in lost], [0, 0])

    def test_no_new_sessions_while_stopping(self) -> None:
        """A TB connection that arrives during the drain is refused."""
        self.t.client.stopping = True
        peer, _ = self.t.tb_client()
        self.assertTrue(peer.lost)
        self.assertEqual(self.t.client.stats.sessions_refused[Refusal.STOPPING], 1)

    def test_idle_stop_is_immediate(self) -> None:
        """A client without sessions stops as soon as its pool connections are closed."""
        d = self.client_top.stopService()
        self.t.net.flush()
        self.successResultOf(d)
        self.assertFalse(self.client_top.running)


class ServerStopTests(DrainCase):
    """Stopping a tunnel server."""

    def test_backend_frames_reach_the_tb_client(self) -> None:
        """A backend frame the server had read reaches the TB client, which is then closed."""
        peer, backend = self.session()
        backend.send(frame(2))
        self.pump_once()
        d = self.server_top.stopService()
        del self.t.net.listeners[self.t.server_addr]  # its port is closed now
        self.t.net.advance(0.5)
        self.successResultOf(d)
        self.assertEqual(peer.received, [frame(2)])
        self.assertTrue(peer.lost)
        self.assertTrue(backend.lost)
        self.assertEqual(self.t.server.pool_connections, [])

    def test_no_new_streams_while_stopping(self) -> None:
        """A stream opened during the drain is refused."""
        self.t.server.stopping = True
        peer, _ = self.t.tb_client()
        self.t.net.flush()
        self.assertTrue(peer.lost)
        self.assertEqual(self.t.server.stats.sessions_refused[Refusal.STOPPING], 1)


class TimeoutTests(DrainCase):
    """Whatever is still open at the shutdown timeout is aborted."""

    timeout_seconds = 3.0

    def test_aborts_after_timeout(self) -> None:
        """With the network stalled, the stop completes shortly after the timeout and says so."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.session()
        d = self.client_top.stopService()
        self.t.clock.advance(self.timeout_seconds - 0.1)
        self.assertNoResult(d)
        self.t.clock.advance(0.1)
        self.assertNoResult(d)  # aborted connections get a moment to go
        self.t.clock.advance(ABORT_GRACE)
        self.t.clock.advance(0.1)  # the next look after giving up
        self.successResultOf(d)
        self.assertTrue(any("shutdown timeout" in e.get("log_format", "") for e in events))


class OperationsOrderTests(SynchronousTestCase):
    """Operations services start after the tunnel and stop around the drain."""

    def test_operations_stop_around_the_drain(self) -> None:
        """Early operations stop before the drain, late ones after; both start after the multiplexers."""
        t = Tunnel()
        events: List[str] = []
        top = TunnelService(t.clock)
        t.client.setServiceParent(top)
        top.add_operation(Recording("reload", events))
        top.add_operation(Recording("metrics", events), stop_last=True)
        top.add_operation(Recording("systemd", events))
        top.startService()
        self.assertTrue(t.client.running)
        self.assertEqual(events, ["start metrics", "start reload", "start systemd"])
        self.assertEqual(list(top), [t.client])
        d = top.stopService()
        t.net.flush()
        self.successResultOf(d)
        self.assertEqual(events[3:], ["stop systemd", "stop reload", "stop metrics"])
        self.assertTrue(t.client.stopping)


class Binding(Service):
    """A service that counts its bindings (``privilegedStartService``)."""

    def __init__(self) -> None:
        self.bindings = 0

    def privilegedStartService(self) -> None:
        self.bindings += 1


class BindOnceTests(SynchronousTestCase):
    """The ports are bound once, however often privilegedStartService is called."""

    def test_second_call_binds_nothing(self) -> None:
        """Bound before twistd daemonized, twistd's own call later binds nothing again; after a stop it binds anew."""
        t = Tunnel()
        top = TunnelService(t.clock)
        child, operation = Binding(), Binding()
        child.setServiceParent(top)
        top.add_operation(operation, stop_last=True)
        top.privilegedStartService()
        top.privilegedStartService()
        top.startService()
        self.assertEqual((child.bindings, operation.bindings), (1, 1))
        self.successResultOf(top.stopService())
        top.privilegedStartService()
        self.assertEqual((child.bindings, operation.bindings), (2, 2))
