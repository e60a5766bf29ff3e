"""WorkerSupervisor with a fake process reactor; inherited sockets; worker logs; options."""

import os
import socket
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, eventAsJSON, eventFromJSON, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel import tap
from tigertunnel.keys.keyfile import keygen
from tigertunnel.config.model import ProxyPair, parse_proxy
from tigertunnel.errors import ConfigError
from tigertunnel.net.sockets import socket_family
from tigertunnel.ops.workers import (
    KILL_GRACE,
    LISTEN_FDS_ENV,
    LOG_BUFFER_LIMIT,
    PRIVATE_ENV,
    SUPERVISOR_ENV,
    WorkerSupervisor,
    announce_ready,
    inherited_listen_fds,
    supervisor_alive,
    worker_log_observer,
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
        self.paths: List[str] = []
        self._pid = 1000

    def spawnProcess(self, proto: Any, executable: str, args: List[str],
                     env: Dict[str, str], path: str,
                     childFDs: Dict[int, Any]) -> FakeProcess:
        self._pid += 1
        transport = FakeProcess(self._pid)
        proto.makeConnection(transport)
        self.spawned.append((proto, args, env, childFDs))
        self.paths.append(path)
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
                                    3, lambda: [7, 9], "/srv/tt",
                                    shutdown_timeout=10.0,
                                    publish=self.events.append, environ=env)

    def worker(self, index: int) -> Any:
        return self.sup.workers[index]

    def test_start_spawns_the_other_workers(self) -> None:
        """Workers 1 and 2 start with the same command plus --worker-index,
        in the original directory, without systemd's variables, with the
        supervisor's pid and worker 0's listening sockets as fds 3 and 4."""
        self.sup.startService()
        self.assertEqual([args[-2:] for _, args, _, _ in self.clock.spawned],
                         [["--worker-index", "1"], ["--worker-index", "2"]])
        self.assertEqual(self.clock.paths, ["/srv/tt", "/srv/tt"])
        for _, args, env, fds in self.clock.spawned:
            self.assertEqual(args[:5], ["python", "-m", "tigertunnel", "client",
                                        "--workers"])
            for key in PRIVATE_ENV:
                self.assertNotIn(key, env)
            self.assertEqual(env["PATH"], "/bin")
            self.assertEqual(env[SUPERVISOR_ENV], str(os.getpid()))
            self.assertEqual(env[LISTEN_FDS_ENV], "3,4")
            self.assertEqual(fds, {0: "w", 1: "r", 2: "r", 3: 7, 4: 9})
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

    def log_line(self, index: int) -> None:
        """Worker ``index`` announces it is ready (as cli._run_end does)."""
        lines: List[bytes] = []
        announce_ready(lambda e: lines.append(eventAsJSON(e).encode() + b"\n"))
        self.worker(index).childDataReceived(1, b"".join(lines))

    def test_reload_forwards_sighup_to_workers_that_are_up(self) -> None:
        """SIGHUP goes to workers that are ready (their handlers are set up),
        not to one still starting (SIGHUP would end it); that one gets it
        once ready. The ready event itself is not logged."""
        self.sup.startService()
        self.log_line(1)
        self.sup.reloading()
        self.assertEqual(self.worker(1).transport.signals, ["HUP"])
        self.assertEqual(self.worker(2).transport.signals, [])
        self.log_line(2)
        self.assertEqual(self.worker(2).transport.signals, ["HUP"])
        self.log_line(1)  # a repeated ready: nothing missed, nothing sent
        self.assertEqual(self.worker(1).transport.signals, ["HUP"])
        self.assertEqual(self.events, [])

    def test_plain_json_line_does_not_mean_ready(self) -> None:
        """Only the ready event marks a worker up, not its first log line."""
        self.sup.startService()
        event = {"log_level": LogLevel.info, "log_namespace": "tigertunnel.x",
                 "log_format": "listening", "log_time": 1.0}
        self.worker(1).childDataReceived(1, eventAsJSON(event).encode() + b"\n")
        self.assertFalse(self.worker(1).up)
        self.assertEqual(len(self.events), 1)

    def test_start_failure_logged_as_error(self) -> None:
        """A worker that exits before it logged anything failed to start:
        an error; one that was up and exits: a warning."""
        logged: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.sup.startService()
        self.worker(1).childDataReceived(
            2, b"tigertunnel: error: cannot use key file: x: No such file\n")
        self.worker(1).processEnded(exited(1))
        self.log_line(2)
        self.worker(2).processEnded(exited(1))
        ours = [(e["log_level"], e.get("index")) for e in logged
                if e.get("log_namespace") == "tigertunnel.workers"
                and "status" in e]
        self.assertEqual(ours, [(LogLevel.error, 1), (LogLevel.warn, 2)])
        relayed = [e for e in self.events if e.get("line", "").startswith(
            "tigertunnel: error:")]
        self.assertEqual(relayed[0]["log_level"], LogLevel.error)

    def test_relay_never_raises(self) -> None:
        """Odd lines (deeply nested JSON, bad levels, binary) become text events."""
        self.sup.startService()
        w = self.worker(1)
        for line in (b"[" * 100_000 + b"]" * 100_000, b'{"log_level": 5}',
                     b"\xff\xfe", b'{"log_level": {"name": "nope"}}'):
            w.childDataReceived(1, line + b"\n")
        self.assertEqual(len(self.events), 4)
        self.assertTrue(all(e["log_level"] is LogLevel.warn for e in self.events))
        self.assertFalse(w.up)

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


def listening(family: int, host: str) -> socket.socket:
    sock = socket.socket(family)
    sock.bind((host, 0))
    sock.listen(1)
    return sock


def pair_for(sock: socket.socket, index: int = 0) -> ProxyPair:
    host, port = sock.getsockname()[:2]
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return parse_proxy(f"{text},127.0.0.1:9", index)


class InheritedSocketTests(SynchronousTestCase):
    """What a worker checks about the sockets it inherited."""

    def test_listening_sockets_accepted(self) -> None:
        socks = []
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            try:
                sock = listening(family, host)
            except OSError:
                continue
            self.addCleanup(sock.close)
            socks.append(sock)
        fds = ",".join(str(s.fileno()) for s in socks)
        pairs = [pair_for(s, i) for i, s in enumerate(socks)]
        got = inherited_listen_fds(pairs, {LISTEN_FDS_ENV: fds})
        self.assertEqual(got, {i: s.fileno() for i, s in enumerate(socks)})
        self.assertEqual([socket_family(fd) for fd in got.values()],
                         [s.family for s in socks])

    def test_refused(self) -> None:
        """Missing, malformed, wrong count, closed, not listening, not TCP,
        or bound to another address than the pair's."""
        unbound = socket.socket()
        self.addCleanup(unbound.close)
        sock = listening(socket.AF_INET, "127.0.0.1")
        self.addCleanup(sock.close)
        other = listening(socket.AF_INET, "127.0.0.1")
        self.addCleanup(other.close)
        unix = socket.socket(socket.AF_UNIX)
        self.addCleanup(unix.close)
        unix.bind(os.path.abspath(self.mktemp()))
        unix.listen(1)
        closed = socket.socket()
        dead = closed.fileno()
        closed.close()
        one = [pair_for(sock)]
        for env, pairs, text in (
                ({}, one, "does not list 1 listening sockets"),
                ({LISTEN_FDS_ENV: "x"}, one, "does not list"),
                ({LISTEN_FDS_ENV: f"{sock.fileno()}"}, one * 2, "does not list 2"),
                ({LISTEN_FDS_ENV: f"{dead}"}, one, f"inherited descriptor {dead}"),
                ({LISTEN_FDS_ENV: f"{unbound.fileno()}"}, one,
                 "is not a listening TCP socket"),
                ({LISTEN_FDS_ENV: f"{unix.fileno()}"}, one,
                 "is not a listening TCP socket"),
                ({LISTEN_FDS_ENV: f"{other.fileno()}"}, one,
                 f"is bound to ('127.0.0.1', {other.getsockname()[1]}), not to "
                 f"pair0's 127.0.0.1:{sock.getsockname()[1]}")):
            with self.assertRaises(ConfigError) as ctx:
                inherited_listen_fds(pairs, env)
            self.assertIn(text, str(ctx.exception))


class WorkerLogTests(SynchronousTestCase):
    """The worker's JSON log observer on a real pipe."""

    def pipe(self) -> Tuple[int, int]:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        return r, w

    def read_all(self, fd: int) -> bytes:
        os.set_blocking(fd, False)
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def test_failure_becomes_text(self) -> None:
        r, w = self.pipe()
        observer = worker_log_observer(w)
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        observer({"log_level": LogLevel.critical, "log_namespace": "x",
                  "log_format": "while doing it", "log_failure": failure,
                  "log_time": 1.0})
        event = eventFromJSON(self.read_all(r).decode().strip())
        self.assertIn("ZeroDivisionError: division by zero", event["log_traceback"])
        self.assertEqual(event["log_format"], "while doing it\n{log_traceback}")

    def test_full_pipe_never_blocks_and_counts_drops(self) -> None:
        """With nobody reading, lines are held up to the limit, then dropped;
        once the pipe drains, a line tells how many were dropped."""
        r, w = self.pipe()
        observer = worker_log_observer(w)
        event = {"log_level": LogLevel.info, "log_namespace": "x",
                 "log_format": "x" * 1000, "log_time": 1.0}
        for _ in range(5000):  # ~5 MB: more than pipe + LOG_BUFFER_LIMIT
            observer(event)
        self.assertGreater(observer.dropped, 0)
        self.assertLessEqual(len(observer._pending), LOG_BUFFER_LIMIT)
        dropped = observer.dropped
        data, logged = b"", 5000
        for _ in range(1000):  # the supervisor reads again
            data += self.read_all(r)
            if observer.dropped == 0 and not observer._pending:
                break
            observer(event)
            logged += 1
        lines = data.decode().splitlines()
        notes = [eventFromJSON(line) for line in lines if "dropped" in line]
        self.assertEqual([n["count"] for n in notes], [dropped])
        self.assertEqual(len(lines), logged - dropped + 1)


class WorkerOptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = self.mktemp()
        keygen(self.key)

    pair = "127.0.0.1:1,127.0.0.1:2"

    def parse(self, *args: str) -> tap.Options:
        opts = tap.Options()
        opts.parseOptions(["client", "-p", self.pair, "-k", self.key, *args])
        return opts

    def test_without_options(self) -> None:
        """Workers get the config file's values, not --config/--replica."""
        args = ["-k", "k", "--config", "c.ini", "--replica=1", "--conf=x",
                "--repl", "2", "--co", "y", "--cluster", "5", "--", "--config"]
        self.assertEqual(tap.without_options(args, ("config", "replica")),
                         ["-k", "k", "--co", "y", "--cluster", "5", "--",
                          "--config"])

    def test_default_one(self) -> None:
        self.assertEqual(self.parse().subOptions.config.workers, 1)

    def test_workers_and_raw_args(self) -> None:
        opts = self.parse("--workers", "4", "--metrics", "tcp:0")
        self.assertEqual(opts.subOptions.config.workers, 4)
        self.assertEqual(opts.subOptions.raw_args[-4:],
                         ["--workers", "4", "--metrics", "tcp:0"])
        self.assertEqual(opts.subOptions.operations.metrics, "tcp:0")

    def test_worker_has_no_metrics(self) -> None:
        """A worker serves on the inherited socket; metrics are worker 0's."""
        sock = listening(socket.AF_INET, "127.0.0.1")
        self.addCleanup(sock.close)
        self.patch(os, "environ", dict(os.environ, **{
            LISTEN_FDS_ENV: str(sock.fileno())}))
        self.pair = f"127.0.0.1:{sock.getsockname()[1]},127.0.0.1:2"
        opts = self.parse("--workers", "4", "--metrics", "tcp:0",
                          "--worker-index", "3")
        self.assertIsNone(opts.subOptions.operations.metrics)
        self.assertEqual(opts.subOptions.config.inherited_fds,
                         {0: sock.fileno()})

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



