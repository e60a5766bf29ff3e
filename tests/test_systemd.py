"""Tests for :mod:`tigertunnel.ops.systemd` (sd_notify datagrams, watchdog, socket activation)."""

import os
import socket
from typing import List

from twisted.application.internet import TimerService
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel import tap
from tigertunnel.config.model import parse_proxy
from tigertunnel.ops.reload import ReloadService
from tigertunnel.ops.shutdown import TunnelService
from tigertunnel.errors import ConfigError
from tigertunnel.ops.systemd import (
    Notifier,
    SystemdService,
    adopted_listen_descriptions,
    watchdog_interval,
)


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, case: SynchronousTestCase) -> None:
        directory = case.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        case.addCleanup(self.sock.close)

    def messages(self) -> List[List[str]]:
        """Every datagram received so far, split into lines."""
        found = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return found
            found.append(data.decode().split("\n"))


class NotifierTests(SynchronousTestCase):
    """Notifier sends KEY=VALUE lines as one datagram."""

    def test_sends_datagram(self) -> None:
        """All assignments of one call arrive together, newline-separated."""
        target = NotifySocket(self)
        notifier = Notifier(target.path)
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.notify("READY=1", "STATUS=up"))
        self.assertEqual(target.messages(), [["READY=1", "STATUS=up"]])

    def test_disabled_without_socket(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
        notifier = Notifier.from_environment({})
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.notify("READY=1"))

    def test_missing_socket_logged_once(self) -> None:
        """A NOTIFY_SOCKET that does not exist is reported once, never raised."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        notifier = Notifier(os.path.join(self.mktemp(), "absent"))
        self.addCleanup(notifier.close)
        self.assertFalse(notifier.notify("READY=1"))
        self.assertFalse(notifier.notify("READY=1"))
        warned = [e for e in events if e.get("log_namespace") == "tigertunnel.systemd"]
        self.assertEqual(len(warned), 1)
        self.assertIn("No such file", warned[0]["reason"])

    def test_abstract_namespace(self) -> None:
        """An address starting with @ is an abstract-namespace socket."""
        name = f"tigertunnel-test-{os.getpid()}-{id(self)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind("\0" + name)
        notifier = Notifier("@" + name)
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.notify("WATCHDOG=1"))
        self.assertEqual(sock.recv(100), b"WATCHDOG=1")


class ServiceTests(SynchronousTestCase):
    """SystemdService tells systemd about the life of the process."""

    def setUp(self) -> None:
        self.target = NotifySocket(self)
        self.notifier = Notifier(self.target.path)
        self.addCleanup(self.notifier.close)
        self.reactor = MemoryReactorClock()

    def kinds(self) -> List[str]:
        """The first line of every message received."""
        return [m[0] for m in self.target.messages()]

    def test_ready_when_reactor_runs(self) -> None:
        """READY=1 is sent once the reactor runs, with MAINPID and a status line."""
        service = SystemdService(self.notifier, self.reactor)
        service.startService()
        self.assertEqual(self.target.messages(), [])
        self.reactor.run()
        (message,) = self.target.messages()
        self.assertEqual(message[0], "READY=1")
        self.assertIn(f"MAINPID={os.getpid()}", message)
        self.assertTrue(any(line.startswith("STATUS=") for line in message))

    def test_reload_and_stop(self) -> None:
        """A reload is bracketed by RELOADING=1 (with MONOTONIC_USEC) and READY=1; stop sends STOPPING=1."""
        service = SystemdService(self.notifier, self.reactor, monotonic=lambda: 12.5)
        service.startService()
        self.reactor.run()
        self.target.messages()
        service.reloading()
        service.reloaded(False)
        service.stopService()
        messages = self.target.messages()
        self.assertEqual(messages[0][:2], ["RELOADING=1", "MONOTONIC_USEC=12500000"])
        self.assertEqual(messages[1][0], "READY=1")
        self.assertIn("old keys kept", messages[1][1])
        self.assertEqual(messages[2][0], "STOPPING=1")

    def test_watchdog_notified_every_interval(self) -> None:
        """With a watchdog interval WATCHDOG=1 goes out at once and then every interval, until stopped."""
        service = SystemdService(self.notifier, self.reactor, watchdog=0.5)
        service.startService()
        self.reactor.run()
        self.assertEqual(self.kinds(), ["READY=1", "WATCHDOG=1"])
        self.reactor.advance(0.5)
        self.reactor.advance(0.5)
        self.assertEqual(self.kinds(), ["WATCHDOG=1", "WATCHDOG=1"])
        service.stopService()
        self.reactor.advance(5)
        self.assertEqual(self.kinds(), ["STOPPING=1"])

    def test_stopped_before_running(self) -> None:
        """A service stopped before the reactor ran never says READY=1."""
        service = SystemdService(self.notifier, self.reactor)
        service.startService()
        service.stopService()
        self.reactor.run()
        self.assertEqual(self.kinds(), ["STOPPING=1"])


class WatchdogIntervalTests(SynchronousTestCase):
    """WATCHDOG_USEC / WATCHDOG_PID parsing."""

    def test_half_the_timeout(self) -> None:
        """The interval is half of WATCHDOG_USEC, in seconds."""
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "3000000"}), 1.5)

    def test_other_pid(self) -> None:
        """A WATCHDOG_PID naming another process means no watchdog for us."""
        env = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
        self.assertIsNone(watchdog_interval(env, pid=2))
        self.assertEqual(watchdog_interval(env, pid=1), 1.5)

    def test_unset_or_invalid(self) -> None:
        """No, zero or non-numeric WATCHDOG_USEC means no watchdog."""
        for env in ({}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"}):
            self.assertIsNone(watchdog_interval(env))


class SocketActivationTests(SynchronousTestCase):
    """--systemd-sockets maps each pair to an inherited socket, checking its address."""

    def listening(self, count: int) -> List[socket.socket]:
        """``count`` sockets bound to 127.0.0.1 (stand-ins for inherited ones)."""
        socks = []
        for _ in range(count):
            s = socket.socket()
            self.addCleanup(s.close)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return socks

    def test_descriptions(self) -> None:
        """Each pair gets systemd:domain=INET:index=N for the N-th inherited socket."""
        (local,) = self.listening(1)
        any_iface = socket.socket()
        self.addCleanup(any_iface.close)
        any_iface.bind(("0.0.0.0", 0))
        pairs = [parse_proxy(f"127.0.0.1:{local.getsockname()[1]},:1", 0),
                 parse_proxy(f":{any_iface.getsockname()[1]},:1", 1)]
        fds = [local.fileno(), any_iface.fileno()]
        self.assertEqual(adopted_listen_descriptions(pairs, fds.__getitem__),
                         {0: "systemd:domain=INET:index=0", 1: "systemd:domain=INET:index=1"})

    def test_wrong_address(self) -> None:
        """An inherited socket on another port than its pair's is refused, naming both."""
        (sock,) = self.listening(1)
        pair = parse_proxy("127.0.0.1:1,:2", 0)
        with self.assertRaises(ConfigError) as caught:
            adopted_listen_descriptions([pair], [sock.fileno()].__getitem__)
        self.assertIn("pair0 listens on 127.0.0.1:1 but inherited socket 0 is bound to", str(caught.exception))

    def test_too_few(self) -> None:
        """Fewer inherited sockets than pairs is refused with the counts."""
        (sock,) = self.listening(1)
        pairs = [parse_proxy(f"127.0.0.1:{sock.getsockname()[1]},:2", 0),
                 parse_proxy("127.0.0.1:5,:2", 1)]
        with self.assertRaises(ConfigError) as caught:
            adopted_listen_descriptions(pairs, [sock.fileno()].__getitem__)
        self.assertIn("systemd passed 1 sockets for 2 proxy pairs", str(caught.exception))

    def test_not_a_socket(self) -> None:
        """An inherited descriptor that is not a socket is refused."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        with self.assertRaises(ConfigError) as caught:
            adopted_listen_descriptions([parse_proxy(":1,:2", 0)], [read].__getitem__)
        self.assertIn("is not a socket", str(caught.exception))


class MakeServiceTests(SynchronousTestCase):
    """makeService adds the systemd notifications only under systemd."""

    def build(self, env: dict) -> TunnelService:
        """makeService for a plaintext client with ``env`` added to the environment."""
        for key, value in env.items():
            os.environ[key] = value
            self.addCleanup(os.environ.pop, key, None)
        options = tap.Options()
        options.parseOptions(["client", "--plaintext", "-p", "127.0.0.1:4000,:3000"])
        service = tap.makeService(options, reactor=MemoryReactorClock())
        assert isinstance(service, TunnelService)
        return service

    def test_not_under_systemd(self) -> None:
        """Without NOTIFY_SOCKET there is no systemd service (only the heap trimmer and the SIGHUP reload)."""
        service = self.build({})
        self.assertEqual([type(s) for s in service.early], [TimerService, ReloadService])
        self.assertEqual(service.late, [])

    def test_under_systemd(self) -> None:
        """With NOTIFY_SOCKET and WATCHDOG_USEC the systemd service is last, with the watchdog interval."""
        service = self.build({"NOTIFY_SOCKET": "/run/absent", "WATCHDOG_USEC": "4000000"})
        self.assertEqual([type(s) for s in service.early],
                         [TimerService, ReloadService, SystemdService])
        systemd = service.early[2]
        self.assertEqual(systemd.watchdog, 2.0)
        self.assertEqual(service.early[1].listeners, [systemd])
