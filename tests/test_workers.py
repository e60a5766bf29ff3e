"""WorkerSupervisor with a fake process reactor; ReusePortEndpoint; --workers options."""

import os
import socket
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor as real_reactor
from twisted.internet.error import CannotListenError, ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, eventAsJSON
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tigertunnel import tap
from tigertunnel.crypto.keys import keygen
from tigertunnel.workers import (
    KILL_GRACE,
    PRIVATE_ENV,
    SUPERVISOR_ENV,
    ReusePortEndpoint,
    WorkerSupervisor,
    supervisor_alive,
)


class FakeProcess:
    """The transport of a spawned fake process: records signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: List[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ProcessClock(Clock):
    """A Clock that also 'spawns' processes and keeps system event triggers."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: List[Tuple[Any, List[str], Dict[str, str], Dict[int, str]]] = []
        self.triggers: List[Tuple[str, str, Any]] = []
        self._pid = 1000

    def spawnProcess(self, proto: Any, executable: str, args: List[str],
                     env: Dict[str, str], childFDs: Dict[int, str]) -> FakeProcess:
        self._pid += 1
        transport = FakeProcess(self._pid)
        proto.makeConnection(transport)
        self.spawned.append((proto, args, env, childFDs))
        return transport

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> Tuple[str, str, Any]:
        handle = (phase, event, f)
        self.triggers.append(handle)
        return handle

    def removeSystemEventTrigger(self, handle: Tuple[str, str, Any]) -> None:
        self.triggers.remove(handle)


def exited(code: Optional[int] = 0, sig: Optional[int] = None) -> Failure:
    if code == 0 and sig is None:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(exitCode=code, signal=sig))


class SupervisorTests(SynchronousTestCase):
    """Start, restart, reload, relay and stop, on a fake reactor."""

    def setUp(self) -> None:
        self.clock = ProcessClock()
        self.events: List[Dict[str, Any]] = []
        env = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "LISTEN_FDS": "1",
               "WATCHDOG_USEC": "5"}
        self.sup = WorkerSupervisor(self.clock, ["python", "-m", "tigertunnel",
                                                 "client", "--workers", "3"],
                                    3, shutdown_timeout=10.0,
                                    publish=self.events.append, environ=env)

    def worker(self, index: int) -> Any:
        return self.sup.workers[index]

    def test_start_spawns_the_other_workers(self) -> None:
        """Workers 1 and 2 start with the same command plus --worker-index,
        without systemd's variables and with the supervisor's pid."""
        self.sup.startService()
        self.assertEqual([args[-2:] for _, args, _, _ in self.clock.spawned],
                         [["--worker-index", "1"], ["--worker-index", "2"]])
        for _, args, env, fds in self.clock.spawned:
            self.assertEqual(args[:5], ["python", "-m", "tigertunnel", "client",
                                        "--workers"])
            for key in PRIVATE_ENV:
                self.assertNotIn(key, env)
            self.assertEqual(env["PATH"], "/bin")
            self.assertTrue(env[SUPERVISOR_ENV].isdigit())
            self.assertEqual(fds, {0: "w", 1: "r", 2: "r"})
        self.assertEqual(sorted(self.sup.workers), [1, 2])
        self.assertEqual(len(self.clock.triggers), 1)

    def test_restart_backoff_and_reset(self) -> None:
        """A worker that exits comes back after 1, 2, 4 ... 30 s; one that
        ran a minute restarts after 1 s again."""
        self.sup.startService()
        delays = []
        for _ in range(7):
            w = self.worker(1)
            w.processEnded(exited(1))
            self.assertNotIn(1, self.sup.workers)
            call = self.sup._pending[1]
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
            self.assertIn(1, self.sup.workers)
        self.assertEqual(delays, [1, 2, 4, 8, 16, 30, 30])
        self.clock.advance(61)
        self.worker(1).processEnded(exited(sig=9))
        self.assertEqual(self.sup._pending[1].getTime() - self.clock.seconds(), 1)
        self.assertEqual(self.sup.restarts, 8)

    def test_stop_terminates_then_kills(self) -> None:
        """stopService sends SIGTERM to every worker, SIGKILLs the ones left
        after the shutdown timeout plus the grace, and fires when all ended."""
        self.sup.startService()
        w1, w2 = self.worker(1), self.worker(2)
        d = self.sup.stopService()
        self.assertEqual(w1.transport.signals, ["TERM"])
        self.assertEqual(w2.transport.signals, ["TERM"])
        self.assertEqual(self.clock.triggers, [])
        w1.processEnded(exited(0))
        self.assertNoResult(d)
        self.clock.advance(10.0 + KILL_GRACE)
        self.assertEqual(w2.transport.signals, ["TERM", "KILL"])
        w2.processEnded(exited(sig=9))
        self.successResultOf(d)
        # Nothing is restarted during a stop.
        self.assertEqual(self.sup.workers, {})
        self.assertEqual(self.sup._pending, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_terminate_is_idempotent(self) -> None:
        """The shutdown trigger and stopService share one termination."""
        self.sup.startService()
        first = self.sup.terminate()
        self.assertIs(self.sup.stopService(), first)
        self.assertEqual(self.worker(1).transport.signals, ["TERM"])

    def test_stop_cancels_pending_restart(self) -> None:
        self.sup.startService()
        self.worker(1).processEnded(exited(1))
        d = self.sup.stopService()
        self.worker(2).processEnded(exited(0))
        self.successResultOf(d)
        self.clock.advance(60)
        self.assertEqual(len(self.clock.spawned), 2)

    def test_reload_forwards_sighup(self) -> None:
        self.sup.startService()
        self.sup.reloading()
        self.assertEqual(self.worker(1).transport.signals, ["HUP"])
        self.assertEqual(self.worker(2).transport.signals, ["HUP"])

    def test_json_events_relayed_with_worker_system(self) -> None:
        """A worker's JSON log line is re-published with its level and format,
        marked with the worker index; split reads are joined."""
        self.sup.startService()
        event = {"log_level": LogLevel.warn, "log_namespace": "tigertunnel.x",
                 "log_format": "session {stream} closed", "stream": 7,
                 "log_time": 1.0}
        line = eventAsJSON(event).encode() + b"\n"
        w = self.worker(2)
        w.childDataReceived(1, line[:10])
        self.assertEqual(self.events, [])
        w.childDataReceived(1, line[10:])
        self.assertEqual(len(self.events), 1)
        got = self.events[0]
        self.assertEqual(got["log_level"], LogLevel.warn)
        self.assertEqual(got["stream"], 7)
        self.assertEqual(got["log_system"], "worker 2/tigertunnel.x#warn")

    def test_plain_lines_relayed_as_warnings(self) -> None:
        """Text on stderr (or non-JSON stdout) becomes a warning event, and a
        last line without newline is kept until the worker ends."""
        self.sup.startService()
        w = self.worker(1)
        w.childDataReceived(2, b"Traceback (most recent call last):\nboom")
        self.assertEqual([e["line"] for e in self.events],
                         ["Traceback (most recent call last):"])
        w.processEnded(exited(1))
        texts = [e.get("line") for e in self.events]
        self.assertIn("boom", texts)
        self.assertTrue(all(e["log_level"] is LogLevel.warn for e in self.events
                            if "line" in e))
        self.assertEqual(self.events[0]["log_system"],
                         "worker 1/tigertunnel.workers#warn")

    def test_status(self) -> None:
        self.sup.startService()
        status = self.sup.status()
        self.assertEqual(status["running"], [0, 1, 2])
        self.assertEqual(status["restarts"], 0)


class SupervisorAliveTests(SynchronousTestCase):
    def test_supervisor_check(self) -> None:
        """Without the variable a process is not a supervised worker; with
        our parent's pid its supervisor is alive; with another pid it is gone."""
        self.assertTrue(supervisor_alive({}))
        self.assertTrue(supervisor_alive({SUPERVISOR_ENV: str(os.getppid())}))
        self.assertFalse(supervisor_alive({SUPERVISOR_ENV: str(os.getppid() + 1)}))


class ReusePortEndpointTests(TestCase):
    """Real sockets on 127.0.0.1."""

    async def test_two_listeners_share_a_port(self) -> None:
        """Two SO_REUSEPORT listeners bind the same port and both accept."""
        first = await ReusePortEndpoint(real_reactor, 0, "127.0.0.1").listen(
            Factory.forProtocol(Protocol))
        self.addCleanup(first.stopListening)
        port = first.getHost().port
        second = await ReusePortEndpoint(real_reactor, port, "127.0.0.1").listen(
            Factory.forProtocol(Protocol))
        self.addCleanup(second.stopListening)
        self.assertEqual(second.getHost().port, port)

    async def test_port_taken_without_reuseport(self) -> None:
        """A port held by a listener without SO_REUSEPORT is a CannotListenError."""
        plain = socket.socket()
        self.addCleanup(plain.close)
        plain.bind(("127.0.0.1", 0))
        plain.listen(1)
        port = plain.getsockname()[1]
        d = ReusePortEndpoint(real_reactor, port, "127.0.0.1").listen(
            Factory.forProtocol(Protocol))
        failure = self.failureResultOf(d, CannotListenError)
        self.assertIn(str(port), str(failure.value))


class WorkerOptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = self.mktemp()
        keygen(self.key)

    def parse(self, *args: str) -> tap.Options:
        opts = tap.Options()
        opts.parseOptions(["client", "-p", "127.0.0.1:1,127.0.0.1:2", "-k",
                           self.key, *args])
        return opts

    def test_default_one(self) -> None:
        self.assertEqual(self.parse().subOptions.config.workers, 1)

    def test_workers_and_raw_args(self) -> None:
        opts = self.parse("--workers", "4", "--metrics", "tcp:0")
        self.assertEqual(opts.subOptions.config.workers, 4)
        self.assertEqual(opts.subOptions.raw_args[-4:],
                         ["--workers", "4", "--metrics", "tcp:0"])
        self.assertEqual(opts.subOptions.operations.metrics, "tcp:0")

    def test_worker_has_no_metrics(self) -> None:
        opts = self.parse("--workers", "4", "--metrics", "tcp:0",
                          "--worker-index", "3")
        self.assertIsNone(opts.subOptions.operations.metrics)

    def test_bad_values(self) -> None:
        for args, text in ((["--workers", "0"], "invalid workers: '0'"),
                           (["--workers", "65"], "invalid workers: '65'"),
                           (["--workers", "x"], "invalid workers: 'x'"),
                           (["--worker-index", "1"], "--worker-index needs"),
                           (["--workers", "2", "--worker-index", "2"],
                            "invalid worker-index: '2'")):
            with self.assertRaises(usage.UsageError) as ctx:
                self.parse(*args)
            self.assertIn(text, str(ctx.exception))



