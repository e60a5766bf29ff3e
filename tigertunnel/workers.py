"""Worker processes: one tunnel end served by several processes (``--workers N``).

A tunnel end is one Python process, so it uses one core. With ``--workers N``
the process the operator started (under ``twistd`` or the console script)
is worker 0 *and* the supervisor of N-1 more workers, which run the same
command with ``--worker-index I``. Every worker binds every listener with
``SO_REUSEPORT`` (:class:`ReusePortEndpoint`), so the kernel spreads new
connections over them: TB clients over the client's workers, pool
connections over the server's. A session lives in one worker from start to
end, and each client worker keeps its own pool (``-n`` connections per pair).

:class:`WorkerSupervisor` (a service of worker 0):

* starts the workers, with their standard output and error piped back: a
  worker logs JSON events (:func:`worker_log_observer`) that the supervisor
  re-publishes in its own log with a ``worker I/namespace#level`` system, so ``--logfile``,
  levels and journald work as for one process;
* restarts a worker that exits, after 1 s doubling to 30 s;
* forwards SIGHUP (key reload) to the workers;
* on shutdown sends SIGTERM to the workers at once, so they drain in
  parallel with worker 0, and SIGKILLs those still alive after the shutdown
  timeout plus a grace period.

A worker asks the kernel for SIGTERM when its supervisor dies
(``PR_SET_PDEATHSIG``), so a SIGKILLed supervisor leaves no workers behind.
This module never imports the reactor; it is handed one.
"""

import ctypes
import ctypes.util
import os
import signal
import socket
import sys
from typing import Any, Callable, Dict, List, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError, ProcessDone
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    ILogObserver,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from tigertunnel.logs import logger

#: Most worker processes per tunnel end.
MAX_WORKERS = 64
#: Environment variable naming the supervisor's pid, for the workers.
SUPERVISOR_ENV = "TIGERTUNNEL_SUPERVISOR_PID"
#: Environment variables a worker must not inherit: systemd's notification
#: socket, watchdog and socket-activation variables belong to worker 0.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
               "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
#: Restart delays of a worker that exited: first, factor, cap (seconds).
RESTART_DELAY = (1.0, 2.0, 30.0)
#: A worker that ran this long before exiting restarts after the first delay.
STABLE_AFTER = 60.0
#: Seconds past the shutdown timeout before remaining workers are SIGKILLed.
KILL_GRACE = 3.0
#: Listen backlog of the SO_REUSEPORT listeners (Twisted's default).
BACKLOG = 50
#: Longest line kept from a worker's output.
MAX_LINE = 64 * 1024

log = logger("tigertunnel.workers")

_PR_SET_PDEATHSIG = 1


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose socket has ``SO_REUSEPORT`` set.

    :param host: the IP address to bind, ``""`` for all IPv4 addresses.
    """

    def __init__(self, reactor: Any, port: int, host: str = "",
                 backlog: int = BACKLOG) -> None:
        self.reactor = reactor
        self.port = port
        self.host = host
        self.backlog = backlog

    def listen(self, factory: Any) -> "defer.Deferred[Any]":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((self.host, self.port))
                sock.listen(self.backlog)
                sock.setblocking(False)
                # adoptStreamPort duplicates the descriptor.
                port = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
            finally:
                sock.close()
        except OSError as e:
            return defer.fail(CannotListenError(self.host, self.port, e))
        return defer.succeed(port)


def supervisor_alive(environ: "Optional[Dict[str, str]]" = None) -> bool:
    """Whether this process's parent is still the supervisor that started it.

    ``True`` when no supervisor is named (the process was not started by one).
    """
    env = os.environ if environ is None else environ
    text = env.get(SUPERVISOR_ENV, "")
    return not text.isdigit() or os.getppid() == int(text)


def die_with_supervisor() -> bool:
    """In a worker: get SIGTERM when the supervisor dies (Linux).

    :returns: ``False`` if the supervisor is already gone (the caller exits).
    """
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name, use_errno=True).prctl(
                _PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    # Checked after prctl: a supervisor that died before it is caught here.
    return supervisor_alive()


@implementer(ILogObserver)
class _JSONLines:
    """Write each event as one JSON line to a binary stream (a worker's stdout)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __call__(self, event: Dict[str, Any]) -> None:
        try:
            self._stream.write(eventAsJSON(event).encode("utf-8") + b"\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass


def worker_log_observer(stream: Any = None) -> ILogObserver:
    """The log observer of a worker: JSON lines on its standard output."""
    return _JSONLines(stream if stream is not None else sys.stdout.buffer)


class _WorkerProtocol(ProcessProtocol):
    """One worker process: relays its log, reports its end."""

    def __init__(self, supervisor: "WorkerSupervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = supervisor.reactor.seconds()
        self.ended: "defer.Deferred[None]" = defer.Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buf = self._partial.get(fd, b"") + data
        *lines, rest = buf.split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        for line in lines:
            if line.strip():
                self.supervisor.relay(self.index, fd, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest.strip():
                self.supervisor.relay(self.index, fd, rest)
        self._partial = {}
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """Start, watch and stop workers 1 .. N-1 of a tunnel end.

    :param command: the worker command without ``--worker-index``.
    :param count: N, the number of workers including this process.
    :param shutdown_timeout: seconds the workers may take to drain.
    """

    name = "workers"

    def __init__(self, reactor: Any, command: List[str], count: int,
                 shutdown_timeout: float,
                 publish: Callable[[Dict[str, Any]], None] = globalLogPublisher,
                 environ: "Optional[Dict[str, str]]" = None) -> None:
        self.reactor = reactor
        self.command = list(command)
        self.count = count
        self.shutdown_timeout = shutdown_timeout
        self.publish = publish
        env = dict(os.environ if environ is None else environ)
        for key in PRIVATE_ENV:
            env.pop(key, None)
        self.env = env
        self.workers: Dict[int, _WorkerProtocol] = {}
        self.restarts = 0
        self._delay: Dict[int, float] = {}
        self._pending: Dict[int, Any] = {}
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
        self._trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self.terminate)

    def stopService(self) -> "defer.Deferred[None]":
        super().stopService()
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError, TypeError):
                pass
            self._trigger = None
        return self.terminate()

    def terminate(self) -> "defer.Deferred[None]":
        """SIGTERM every worker; fires when all have exited (SIGKILL after
        the shutdown timeout plus :data:`KILL_GRACE`)."""
        if self._stopping is not None:
            return self._stopping
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        workers = list(self.workers.values())
        for worker in workers:
            self._signal(worker, "TERM")
        kill = self.reactor.callLater(self.shutdown_timeout + KILL_GRACE,
                                      self._kill_all)
        done = defer.gatherResults([w.ended for w in workers], consumeErrors=True)

        def finished(result: Any) -> None:
            if kill.active():
                kill.cancel()

        done.addBoth(finished)
        self._stopping = done
        return done

    def reload(self) -> None:
        """Forward a key reload (SIGHUP) to every worker."""
        for worker in list(self.workers.values()):
            self._signal(worker, "HUP")

    # ReloadService listener interface.
    def reloading(self) -> None:
        self.reload()

    def reloaded(self, ok: bool) -> None:
        pass

    # -- workers ------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        argv = self.command + ["--worker-index", str(index)]
        worker = _WorkerProtocol(self, index)
        # Read now, not when built: twistd daemonizes (forks) in between.
        env = dict(self.env, **{SUPERVISOR_ENV: str(os.getpid())})
        try:
            self.reactor.spawnProcess(worker, argv[0], argv, env=env,
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            log.error("cannot start worker {index}: {reason}", index=index,
                      reason=str(e))
            self._restart_later(index)
            return
        self.workers[index] = worker
        log.info("started worker {index} (pid {pid})", index=index,
                 pid=worker.transport.pid)

    def worker_ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        status = _exit_text(reason)
        if self._stopping is not None or not self.running:
            log.info("worker {index} exited ({status})", index=worker.index,
                     status=status)
            return
        if self.reactor.seconds() - worker.started >= STABLE_AFTER:
            self._delay.pop(worker.index, None)
        delay = self._restart_later(worker.index)
        log.warn("worker {index} exited ({status}); restarting it in "
                 "{delay:.0f} s", index=worker.index, status=status, delay=delay)

    def _restart_later(self, index: int) -> float:
        first, factor, cap = RESTART_DELAY
        delay = self._delay.get(index)
        delay = first if delay is None else min(cap, delay * factor)
        self._delay[index] = delay
        self.restarts += 1
        self._pending[index] = self.reactor.callLater(delay, self._spawn, index)
        return delay

    def _signal(self, worker: _WorkerProtocol, name: str) -> None:
        try:
            worker.transport.signalProcess(name)
        except Exception:  # ProcessExitedAlready, or the worker is gone
            pass

    def _kill_all(self) -> None:
        for worker in list(self.workers.values()):
            log.warn("worker {index} still running after the shutdown "
                     "timeout; killing it", index=worker.index)
            self._signal(worker, "KILL")

    # -- logs -----------------------------------------------------------------

    def relay(self, index: int, fd: int, line: bytes) -> None:
        """Publish one line of a worker's output in this process's log."""
        text = line.decode("utf-8", "replace")
        event: Optional[Dict[str, Any]] = None
        if fd == 1:
            try:
                event = eventFromJSON(text)
            except (ValueError, TypeError, KeyError):
                event = None
        if not isinstance(event, dict) or "log_level" not in event:
            event = {"log_level": LogLevel.warn, "log_namespace":
                     "tigertunnel.workers", "log_format": "{line}",
                     "line": text, "log_time": self.reactor.seconds()}
        level = event.get("log_level")
        level_name = getattr(level, "name", "info")
        event["log_system"] = (f"worker {index}/"
                               f"{event.get('log_namespace', '-')}#{level_name}")
        self.publish(event)

    def status(self) -> Dict[str, Any]:
        """Workers running, their pids and the restarts so far."""
        return {"count": self.count,
                "running": sorted([0] + list(self.workers)),
                "pids": {i: w.transport.pid for i, w in self.workers.items()},
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


def worker_command(role_args: List[str]) -> List[str]:
    """The command line of a worker: the console script with the same arguments."""
    return [sys.executable, "-m", "tigertunnel"] + list(role_args)


__all__ = ["MAX_WORKERS", "ReusePortEndpoint", "WorkerSupervisor",
           "die_with_supervisor", "supervisor_alive", "worker_command", "worker_log_observer"]
