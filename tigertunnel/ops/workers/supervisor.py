"""WorkerSupervisor: start, watch and stop workers 1 .. N-1 of a tunnel end.

A service of worker 0 (see :mod:`tigertunnel.ops.workers` for the layout):

* starts the workers, with their standard output and error piped back; their
  lines are re-published in worker 0's log with a ``worker I/namespace#level``
  system, so ``--logfile``, levels and journald work as for one process;
* restarts a worker that exits, after 1 s doubling to 30 s; a worker that
  ran :data:`STABLE_AFTER` seconds starts again from 1 s;
* forwards SIGHUP (key reload) to the workers that are up; one still
  starting gets it once it is ready (SIGHUP could end it before);
* on shutdown sends SIGTERM to the workers at once, so they drain in
  parallel with worker 0, and SIGKILLs those still alive after the shutdown
  timeout plus :data:`~tigertunnel.ops.workers.supervisor.KILL_GRACE`.
"""

import os
import signal
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorCore,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from tigertunnel.logs import logger
from tigertunnel.net.backoff import exponential_delay
from tigertunnel.ops.workers.balance import AcceptBoard
from tigertunnel.ops.workers.bootstrap import (
    BOARD_FD_ENV,
    FIRST_FD,
    LISTEN_FDS_ENV,
    PRIVATE_ENV,
    REPLAY_FD_ENV,
    SUPERVISOR_ENV,
)
from tigertunnel.ops.workers.logpipe import (
    LineBuffer,
    decode_line,
    figures_of,
    is_ready,
    worker_system,
)

#: Restart delay of a worker that exited: the first, doubling up to the last.
RESTART_DELAY_FIRST = 1.0
RESTART_DELAY_MAX = 30.0
#: A worker that ran this long before exiting restarts after the first delay.
STABLE_AFTER = 60.0
#: Seconds past the shutdown timeout before remaining workers are SIGKILLed.
KILL_GRACE = 3.0

log = logger(__name__)


class _WorkerProtocol(ProcessProtocol):
    """One worker process: relays its log, reports its end."""

    def __init__(self, supervisor: "WorkerSupervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = supervisor.clock.seconds()
        #: Set by its ready event: it serves and its SIGHUP handler is set.
        self.up = False
        #: Key reloads forwarded before it started (see WorkerSupervisor.reload).
        self.reloads_seen = supervisor.reloads
        self.ended: "defer.Deferred[None]" = defer.Deferred()
        self._lines = LineBuffer()

    @property
    def pid(self) -> Optional[int]:
        """The worker's process id (``None`` before it is spawned)."""
        return None if self.transport is None else self.transport.pid

    def signal(self, name: str) -> None:
        """Send signal ``name`` (``"TERM"``, ``"HUP"``, ``"KILL"``); a worker
        that already exited is left be."""
        try:
            if self.transport is not None:
                self.transport.signalProcess(name)
        except Exception:  # ProcessExitedAlready, or the worker is gone
            pass

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        for line in self._lines.feed(childFD, data):
            self.supervisor.relay(self, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, line in self._lines.close():
            self.supervisor.relay(self, fd, line)
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """Start, watch and stop workers 1 .. N-1 of a tunnel end.

    :param reactor: spawns the workers; it must also provide
        ``IReactorTime`` (restart delays) and ``IReactorCore`` (the shutdown
        trigger).
    :param command: the worker command without ``--worker-index``.
    :param count: N, the number of workers including this process.
    :param listen_fds: returns worker 0's listening descriptors, one per
        pair in order, once the listeners are bound.
    :param cwd: the directory the command was given in (relative key and
        config paths are relative to it; twistd may have changed directory).
    :param shutdown_timeout: seconds the workers may take to drain.
    :param publish: where relayed worker events go.
    :param environ: the environment the workers start from (less
        :data:`~tigertunnel.ops.workers.bootstrap.PRIVATE_ENV`).
    :param board: the accept board and its memfd, handed to each worker
        (a worker that exits is withdrawn from it at once).
    :param replay: a tunnel server's replay cache in shared memory (when
        it has no replay file), handed to each worker.
    """

    name = "workers"

    def __init__(self, reactor: IReactorProcess, command: Sequence[str], count: int,
                 listen_fds: Callable[[], List[int]], cwd: str,
                 shutdown_timeout: float,
                 publish: Callable[[LogEvent], None] = globalLogPublisher,
                 environ: Optional[Mapping[str, str]] = None,
                 board: Optional[Tuple[int, AcceptBoard]] = None,
                 replay: Optional[int] = None) -> None:
        self.processes = reactor
        self.clock = IReactorTime(reactor)
        self.core = IReactorCore(reactor)
        self.command = list(command)
        self.count = count
        self.listen_fds = listen_fds
        self.cwd = cwd
        self.shutdown_timeout = shutdown_timeout
        self.publish = publish
        env = dict(os.environ if environ is None else environ)
        for key in PRIVATE_ENV:
            env.pop(key, None)
        self.env = env
        self.board = board
        self.replay = replay
        self.workers: Dict[int, _WorkerProtocol] = {}
        #: The last report of each running worker, by worker index: the
        #: parts it sent (:func:`tigertunnel.ops.figures.report_parts`), the
        #: latest of each kind.
        self.figures: Dict[int, Dict[str, Any]] = {}
        self.restarts = 0
        #: SIGHUP reloads so far (a worker that was starting gets one more).
        self.reloads = 0
        #: Restarts in a row of each worker index (reset once it ran stably).
        self._attempts: Dict[int, int] = {}
        self._pending: Dict[int, IDelayedCall] = {}
        self._stopping: "Optional[defer.Deferred[None]]" = None
        self._trigger: Any = None

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = None
        for index in range(1, self.count):
            self._spawn(index)
        # Stop the workers as soon as the reactor begins to shut down, so
        # they drain while this process drains (stopService waits later).
        self._trigger = self.core.addSystemEventTrigger(
            "before", "shutdown", self.terminate)

    def stopService(self) -> "defer.Deferred[None]":
        super().stopService()
        if self._trigger is not None:
            try:
                self.core.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError, TypeError):
                pass
            self._trigger = None
        return self.terminate()

    def terminate(self) -> "defer.Deferred[None]":
        """SIGTERM every worker; fires when all have exited (SIGKILL after
        the shutdown timeout plus :data:`~tigertunnel.ops.workers.supervisor.KILL_GRACE`)."""
        if self._stopping is not None:
            return self._stopping
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        workers = list(self.workers.values())
        for worker in workers:
            worker.signal("TERM")
        kill = self.clock.callLater(self.shutdown_timeout + KILL_GRACE,
                                    self._kill_all)

        def finished(result: object) -> None:
            if kill.active():
                kill.cancel()

        done = defer.gatherResults([w.ended for w in workers], consumeErrors=True)
        stopping = done.addBoth(finished)
        self._stopping = stopping
        return stopping

    def reload(self) -> None:
        """Forward a key reload (SIGHUP) to every worker that is up; one
        still starting gets it once it is ready (SIGHUP could end it before)."""
        self.reloads += 1
        for worker in list(self.workers.values()):
            if worker.up:
                worker.reloads_seen = self.reloads
                worker.signal("HUP")

    def _ready(self, worker: _WorkerProtocol) -> None:
        worker.up = True
        if worker.reloads_seen != self.reloads:
            worker.reloads_seen = self.reloads
            worker.signal("HUP")

    # ReloadService listener interface.
    def reloading(self) -> None:
        """A key reload starts: forward it (see :meth:`reload`)."""
        self.reload()

    def reloaded(self, ok: bool) -> None:
        """A key reload ended (each worker reports its own)."""

    # -- workers ------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        argv = self.command + ["--worker-index", str(index)]
        worker = _WorkerProtocol(self, index)
        try:
            fds = self.listen_fds()
        except (AttributeError, OSError, ValueError) as e:  # no listener now
            log.error("cannot start worker {index}: no listening socket to "
                      "hand over ({reason})", index=index, reason=str(e))
            return
        child_fds: Dict[int, Union[int, str]] = {0: "w", 1: "r", 2: "r"}
        for i, fd in enumerate(fds):
            child_fds[FIRST_FD + i] = fd
        # Read now, not when built: twistd daemonizes (forks) in between.
        env = dict(self.env, **{
            SUPERVISOR_ENV: str(os.getpid()),
            LISTEN_FDS_ENV: ",".join(str(FIRST_FD + i) for i in range(len(fds)))})
        handed = FIRST_FD + len(fds)
        if self.board is not None:
            child_fds[handed] = self.board[0]
            env[BOARD_FD_ENV] = str(handed)
            handed += 1
        if self.replay is not None:
            child_fds[handed] = self.replay
            env[REPLAY_FD_ENV] = str(handed)
        try:
            self.processes.spawnProcess(worker, argv[0], argv, env=env,
                                        path=self.cwd, childFDs=child_fds)
        except OSError as e:
            log.error("cannot start worker {index}: {reason}", index=index,
                      reason=str(e))
            self._restart_later(index)
            return
        self.workers[index] = worker
        log.info("started worker {index} (pid {pid})", index=index,
                 pid=worker.pid)

    def worker_ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        """Forget an ended worker and, unless stopping, start it again later."""
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
            self.figures.pop(worker.index, None)
            if self.board is not None:
                self.board[1].withdraw(worker.index)
        status = _exit_text(reason)
        if self._stopping is not None or not self.running:
            log.info("worker {index} exited ({status})", index=worker.index,
                     status=status)
            return
        if self.clock.seconds() - worker.started >= STABLE_AFTER:
            self._attempts.pop(worker.index, None)
        delay = self._restart_later(worker.index)
        if worker.up:
            log.warn("worker {index} exited ({status}); restarting it in "
                     "{delay:.0f} s", index=worker.index, status=status,
                     delay=delay)
        else:
            log.error("worker {index} failed to start ({status}; see its "
                      "lines above); trying again in {delay:.0f} s",
                      index=worker.index, status=status, delay=delay)

    def _restart_later(self, index: int) -> float:
        attempt = self._attempts.get(index, 0) + 1
        self._attempts[index] = attempt
        delay = exponential_delay(attempt, RESTART_DELAY_FIRST, RESTART_DELAY_MAX)
        self.restarts += 1
        self._pending[index] = self.clock.callLater(delay, self._spawn, index)
        return delay

    def _kill_all(self) -> None:
        for worker in list(self.workers.values()):
            log.warn("worker {index} still running after the shutdown "
                     "timeout; killing it", index=worker.index)
            worker.signal("KILL")

    # -- logs -----------------------------------------------------------------

    def relay(self, worker: _WorkerProtocol, fd: int, line: bytes) -> None:
        """Publish one line of a worker's output in this process's log.

        Never raises: a line that is not one of our JSON events is published
        as text, at error level when it is a start-up error. A worker's event
        keeps its level and fields and gains ``worker`` (the index).
        """
        event = decode_line(fd, line, self.clock.seconds())
        if is_ready(event):
            self._ready(worker)
            return
        figures = figures_of(event)
        if figures is not None:  # a part of the worker's report
            self.figures.setdefault(worker.index, {}).update(figures)
            return
        event["log_system"] = worker_system(worker.index, event)
        event.setdefault("worker", worker.index)  # for --log-format json
        try:
            self.publish(event)
        except Exception:  # an observer's failure must not end the relay
            pass

    def status(self) -> Dict[str, Any]:
        """Workers running, their pids and the restarts so far."""
        return {"count": self.count,
                "running": sorted([0] + list(self.workers)),
                "pids": {i: w.pid for i, w in self.workers.items()},
                "restarts": self.restarts}


def _exit_text(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessDone):
        return "status 0"
    signal_number = getattr(value, "signal", None)
    if signal_number:
        try:
            return f"signal {signal.Signals(signal_number).name}"
        except ValueError:
            return f"signal {signal_number}"
    return f"status {getattr(value, 'exitCode', '?')}"
