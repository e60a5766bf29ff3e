"""Tests for :mod:`tigertunnel.ops.systemd` (sd_notify datagrams, watchdog, socket activation)."""

import os
import socket
from typing import List, Sequence

from twisted.application.internet import TimerService
from twisted.internet.endpoints import _SystemdParser
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tigertunnel import tap
from tigertunnel.config.model import parse_proxy
from tigertunnel.ops.reload import ReloadService
from tigertunnel.ops.shutdown import TunnelService
from tigertunnel.errors import ConfigError
from tigertunnel.ops.systemd import (
    InheritedSocket,
    Notifier,
    SystemdService,
    adopted_listen_descriptions,
    inherited_sockets,
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


def passed(fds: Sequence[int], names: Sequence[str] = ()) -> List[InheritedSocket]:
    """Inherited sockets on ``fds``, in order, named ``names`` (none if empty)."""
    return [InheritedSocket(i, fd, names[i] if names else "") for i, fd in enumerate(fds)]


class SocketActivationTests(SynchronousTestCase):
    """--systemd-sockets maps each pair to an inherited socket, checking its address."""

    def listening(self, count: int, host: str = "127.0.0.1") -> List[socket.socket]:
        """``count`` sockets bound to ``host`` (stand-ins for inherited ones)."""
        socks = []
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self.addCleanup(s.close)
            s.bind((host, 0))
            socks.append(s)
        return socks

    def test_descriptions(self) -> None:
        """Without names, each pair gets systemd:domain=INET:index=N for the N-th inherited socket."""
        (local,) = self.listening(1)
        any_iface = socket.socket()
        self.addCleanup(any_iface.close)
        any_iface.bind(("0.0.0.0", 0))
        pairs = [parse_proxy(f"127.0.0.1:{local.getsockname()[1]},:1", 0),
                 parse_proxy(f":{any_iface.getsockname()[1]},:1", 1)]
        fds = [local.fileno(), any_iface.fileno()]
        self.assertEqual(adopted_listen_descriptions(pairs, passed(fds)),
                         {0: "systemd:domain=INET:index=0", 1: "systemd:domain=INET:index=1"})

    def test_by_name_in_any_order(self) -> None:
        """Sockets named after their pair's LISTEN port are taken by name, whatever their order."""
        first, second, metrics = self.listening(3)
        ports = [s.getsockname()[1] for s in (first, second)]
        pairs = [parse_proxy(f"127.0.0.1:{port},:1", i) for i, port in enumerate(ports)]
        inherited = passed([metrics.fileno(), second.fileno(), first.fileno()],
                           ["metrics", str(ports[1]), str(ports[0])])
        self.assertEqual(adopted_listen_descriptions(pairs, inherited),
                         {0: "systemd:domain=INET:index=2", 1: "systemd:domain=INET:index=1"})

    def test_same_name_picked_by_address(self) -> None:
        """Of two sockets with one name (one port, IPv4 and IPv6), each pair takes the one on its address."""
        (v4,) = self.listening(1)
        port = v4.getsockname()[1]
        v6 = socket.socket(socket.AF_INET6)
        self.addCleanup(v6.close)
        try:
            v6.bind(("::1", port))
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback here: {e}") from None
        pairs = [parse_proxy(f"[::1]:{port},:1", 0), parse_proxy(f"127.0.0.1:{port},:1", 1)]
        inherited = passed([v4.fileno(), v6.fileno()], [str(port), str(port)])
        self.assertEqual(adopted_listen_descriptions(pairs, inherited),
                         {0: "systemd:domain=INET6:index=1", 1: "systemd:domain=INET:index=0"})

    def test_missing_name(self) -> None:
        """When sockets are named but one pair's name is absent, one line names the missing name."""
        first, other = self.listening(2)
        port = first.getsockname()[1]
        pairs = [parse_proxy(f"127.0.0.1:{port},:1", 0), parse_proxy("127.0.0.1:4001,:1", 1)]
        with self.assertRaises(ConfigError) as caught:
            adopted_listen_descriptions(pairs, passed([first.fileno(), other.fileno()],
                                                      [str(port), "stray"]))
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"no inherited socket named '4001' for pair1 (127.0.0.1:4001); "
                      f"systemd passed '{port}', 'stray'", message)

    def test_named_socket_on_wrong_address(self) -> None:
        """A socket named after a pair but bound elsewhere is refused, naming both."""
        (sock,) = self.listening(1)
        pair = parse_proxy("127.0.0.1:4000,:2", 0)
        with self.assertRaises(ConfigError) as caught:
            adopted_listen_descriptions([pair], passed([sock.fileno()], ["4000"]))
        self.assertIn("pair0 listens on 127.0.0.1:4000 but inherited socket '4000' is bound to",
                      str(caught.exception))

    def test_unit_names_fall_back_to_order(self) -> None:
        """Names that are no pair's port (a .socket unit without FileDescriptorName=) mean: in order."""
        first, second = self.listening(2)
        pairs = [parse_proxy(f"127.0.0.1:{s.getsockname()[1]},:1", i)
                 for i, s in enumerate((first, second))]
        inherited = passed([first.fileno(), second.fileno()],
                           ["tigertunnel-client.socket"] * 2)
        self.assertEqual(adopted_listen_descriptions(pairs, inherited),
                         {0: "systemd:domain=INET:index=0", 1: "systemd:domain=INET:index=1"})

    def test_wrong_address(self) -> None:
        """An inherited socket on another port than its pair's is refused, naming both."""
        (sock,) = self.listening(1)
        pair = parse_proxy("127.0.0.1:1,:2", 0)
        with self.assertRaises(ConfigError) as caught:
            adopted_listen_descriptions([pair], passed([sock.fileno()]))
        self.assertIn("pair0 listens on 127.0.0.1:1 but inherited socket 0 is bound to", str(caught.exception))

    def test_too_few(self) -> None:
        """Fewer inherited sockets than pairs is refused with the counts."""
        (sock,) = self.listening(1)
        pairs = [parse_proxy(f"127.0.0.1:{sock.getsockname()[1]},:2", 0),
                 parse_proxy("127.0.0.1:5,:2", 1)]
        with self.assertRaises(ConfigError) as caught:
            adopted_listen_descriptions(pairs, passed([sock.fileno()]))
        self.assertIn("systemd passed 1 sockets for 2 proxy pairs", str(caught.exception))

    def test_not_a_socket(self) -> None:
        """An inherited descriptor that is not a socket is refused."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        with self.assertRaises(ConfigError) as caught:
            adopted_listen_descriptions([parse_proxy(":1,:2", 0)], passed([read]))
        self.assertIn(f"inherited descriptor {read} (for pair0) is not a socket", str(caught.exception))

    def test_inherited_sockets_with_names(self) -> None:
        """The descriptors Twisted took from LISTEN_FDS, named from LISTEN_FDNAMES."""
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3, 4], ("a", "b")))
        self.assertEqual(inherited_sockets({"LISTEN_FDNAMES": "4000:4001"}),
                         [InheritedSocket(0, 3, "4000"), InheritedSocket(1, 4, "4001")])
        # Names that do not match the descriptors are ignored (not trusted).
        self.assertEqual(inherited_sockets({"LISTEN_FDNAMES": "4000"}),
                         [InheritedSocket(0, 3, ""), InheritedSocket(1, 4, "")])
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([], ()))
        self.assertEqual(inherited_sockets({"LISTEN_FDNAMES": "4000"}), [])


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
