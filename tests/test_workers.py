"""WorkerSupervisor with a fake process reactor: start, restart, reload, relay, stop."""

import os
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorCore, IReactorProcess
from twisted.internet.task import Clock
from twisted.logger import LogLevel, eventAsJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tigertunnel.ops.workers import (
    BOARD_FD_ENV,
    KILL_GRACE,
    LISTEN_FDS_ENV,
    PRIVATE_ENV,
    REPLAY_FD_ENV,
    SUPERVISOR_ENV,
    WorkerSupervisor,
    announce_ready,
)


class FakeProcess:
    """The transport of a spawned fake process: records signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: List[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


@implementer(IReactorProcess, IReactorCore)
class ProcessClock(Clock):
    """A Clock that also 'spawns' processes and keeps system event triggers.

    It provides only the parts of ``IReactorProcess`` and ``IReactorCore``
    the supervisor uses.
    """

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
    """The reason a process ended: exit status ``code`` or signal ``sig``."""
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
        """The process protocol of running worker ``index``."""
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

    def test_board_and_replay_cache_handed_over(self) -> None:
        """With an accept board and a shared replay cache, each worker gets
        both after its listening sockets (fds 5 and 6), named in its
        environment."""
        sup = WorkerSupervisor(self.clock, ["python", "-m", "tigertunnel", "server"],
                               2, lambda: [7, 9], "/srv/tt", shutdown_timeout=10.0,
                               publish=self.events.append, environ={},
                               board=(11, None), replay=12)  # type: ignore[arg-type]
        sup.startService()
        (_, _, env, fds), = self.clock.spawned
        self.assertEqual(fds, {0: "w", 1: "r", 2: "r", 3: 7, 4: 9, 5: 11, 6: 12})
        self.assertEqual((env[BOARD_FD_ENV], env[REPLAY_FD_ENV]), ("5", "6"))

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
        """A restart that is waiting for its delay is cancelled by a stop."""
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
        """SIGHUP goes to ready workers at once and to a starting one (which SIGHUP would end) only once it is ready, without logging the ready event."""
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
                if e.get("log_namespace") == "tigertunnel.ops.workers.supervisor"
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

    def test_report_parts_kept_not_logged(self) -> None:
        """A worker's report arrives in parts (one log line each): each kind is kept,
        the latest replacing the one before, nothing is logged; an ended worker's report is dropped."""
        from tigertunnel.ops.workers.logpipe import report_figures

        self.sup.startService()
        w = self.worker(1)
        for part in ({"pair a": {"status": {"n": 1}}}, {"pair b": {"status": {"n": 2}}},
                     {"process": {"x": []}}, {"pair a": {"status": {"n": 3}}}):
            sent: List[Dict[str, Any]] = []
            report_figures(part, sent.append)
            w.childDataReceived(1, eventAsJSON(sent[0]).encode() + b"\n")
        self.assertEqual(self.events, [])
        self.assertEqual(self.sup.figures, {1: {"pair a": {"status": {"n": 3}},
                                                "pair b": {"status": {"n": 2}},
                                                "process": {"x": []}}})
        w.processEnded(exited(1))
        self.assertEqual(self.sup.figures, {})

    def test_relayed_event_keeps_level_and_fields(self) -> None:
        """A worker's warning, written by its JSON-lines observer and relayed, keeps its level, namespace and fields and names the worker in JSON."""
        import json

        from tigertunnel.logs import format_json, format_line
        from tigertunnel.ops.workers import worker_log_observer

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        worker_log_observer(w)({
            "log_level": LogLevel.warn, "log_namespace": "tigertunnel.net.multiplexer",
            "log_format": "client {pair}: lost its last pool connection "
                          "({pool_connection})", "pair": "pair0",
            "pool_connection": "pair0/1#3", "log_time": 1.0, "source": object()})
        self.sup.startService()
        self.worker(2).childDataReceived(1, os.read(r, 1 << 16))
        self.assertEqual(len(self.events), 1)
        record = json.loads(format_json(self.events[0]))
        self.assertEqual({k: record[k] for k in ("level", "namespace", "pair",
                                                 "pool_connection", "worker")},
                         {"level": "warn", "namespace": "tigertunnel.net.multiplexer",
                          "pair": "pair0", "pool_connection": "pair0/1#3", "worker": 2})
        self.assertEqual(record["message"], "client pair0: lost its last pool "
                                            "connection (pair0/1#3)")
        self.assertTrue(format_line(self.events[0], journal=True).startswith(  # type: ignore[union-attr]
            "<4>[worker 2/tigertunnel.net.multiplexer#warn] client pair0"))

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
                         "worker 1/tigertunnel.ops.workers#warn")

    def test_status_lists_workers_and_restarts(self) -> None:
        """status() lists worker 0 and the running workers, and counts restarts."""
        self.sup.startService()
        status = self.sup.status()
        self.assertEqual(status["running"], [0, 1, 2])
        self.assertEqual(status["restarts"], 0)
