"""Worker processes: one tunnel end served by several processes (``--workers N``).

A tunnel end is one Python process, so it uses one core. With ``--workers N``
the process the operator started (under ``twistd`` or the console script)
is worker 0 *and* the supervisor of N-1 more workers, which run the same
command with ``--worker-index I``. Worker 0 binds the listeners (as twistd
binds them, before it drops privileges, or as systemd hands them over) and
every worker inherits those very sockets (:data:`LISTEN_FDS_ENV`) and
accepts on them: whichever worker is free takes a new connection (TB clients
on a tunnel client, pool connections on a tunnel server). A session lives in
one worker from start to end; each client worker keeps its own pool (``-n``
connections per pair) and each worker its own ``-m`` limit.

Why inherited sockets rather than a SO_REUSEPORT socket per worker: with
SO_REUSEPORT the kernel hashes a new connection to one socket of the group,
so while a worker restarts, the connections hashed to its socket wait
unanswered; a second instance started by mistake would silently join the
group and take a share of the traffic; and a worker started after twistd
dropped privileges could not bind a privileged port. A shared socket has
none of these problems, and TB's connections are long-lived, so the wake-ups
of the idle workers on a new connection cost nothing that matters.

:class:`WorkerSupervisor` (a service of worker 0):

* starts the workers, with their standard output and error piped back: a
  worker logs JSON events (:func:`worker_log_observer`) that the supervisor
  re-publishes in its own log with a ``worker I/namespace#level`` system, so
  ``--logfile``, levels and journald work as for one process;
* restarts a worker that exits, after 1 s doubling to 30 s;
* forwards SIGHUP (key reload) to the workers that are up;
* on shutdown sends SIGTERM to the workers at once, so they drain in
  parallel with worker 0, and SIGKILLs those still alive after the shutdown
  timeout plus a grace period.

A worker asks the kernel for SIGTERM when its supervisor dies
(``PR_SET_PDEATHSIG``), so a SIGKILLed supervisor leaves no workers behind.
This module never imports the reactor; it is handed one.
"""

import errno
import ctypes
import os
import signal
import socket
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessDone
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

from tigertunnel.config.model import ProxyPair
from tigertunnel.errors import ConfigError
from tigertunnel.logs import logger
from tigertunnel.net.sockets import socket_family

#: Most worker processes per tunnel end.
MAX_WORKERS = 64
#: Environment variable naming the supervisor's pid, for the workers.
SUPERVISOR_ENV = "TIGERTUNNEL_SUPERVISOR_PID"
#: Environment variable listing a worker's inherited listening sockets, one
#: descriptor per proxy pair in ``-p`` order (``"3,4"``).
LISTEN_FDS_ENV = "TIGERTUNNEL_LISTEN_FDS"
#: The first descriptor number the listening sockets get in a worker.
FIRST_FD = 3
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
#: The field of the event a worker publishes once it serves.
READY_FIELD = "tigertunnel_worker_ready"
#: Longest line kept from a worker's output.
MAX_LINE = 64 * 1024
#: Log bytes a worker holds while its supervisor does not read; past that,
#: lines are dropped (and counted) rather than stalling the worker.
LOG_BUFFER_LIMIT = 1 << 20

log = logger("tigertunnel.workers")

_LEVELS = tuple(LogLevel.iterconstants())


def _is_level(value: Any) -> bool:
    return any(value is level for level in _LEVELS)


_PR_SET_PDEATHSIG = 1


def inherited_listen_fds(pairs: "Sequence[ProxyPair]",
                         environ: "Optional[Dict[str, str]]" = None) -> Dict[int, int]:
    """In a worker: the inherited listening socket of each proxy pair.

    :returns: ``{pair index: descriptor}``.
    :raises ConfigError: the variable is missing, malformed, lists another
        number of sockets, or a descriptor is not a listening TCP socket
        bound to its pair's listen address.
    """
    from tigertunnel.ops.systemd import bound_to_pair

    env = os.environ if environ is None else environ
    text = env.get(LISTEN_FDS_ENV, "")
    parts = text.split(",") if text else []
    if len(parts) != len(pairs) or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--worker-index: {LISTEN_FDS_ENV}={text!r} does not "
                          f"list {len(pairs)} listening sockets (workers are "
                          f"started by --workers, not by hand)")
    fds = {}
    for pair, part in zip(pairs, parts):
        fd = int(part)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError as e:
            raise ConfigError(f"--worker-index: inherited descriptor {fd}: "
                              f"{e.strerror or e}") from None
        try:
            listening = (sock.family in (socket.AF_INET, socket.AF_INET6)
                         and sock.type == socket.SOCK_STREAM
                         and sock.getsockopt(socket.SOL_SOCKET,
                                             socket.SO_ACCEPTCONN))
            if not listening:
                raise ConfigError(f"--worker-index: inherited descriptor {fd} "
                                  f"is not a listening TCP socket")
            if not bound_to_pair(pair, sock.getsockname()):
                raise ConfigError(f"--worker-index: inherited descriptor {fd} "
                                  f"is bound to {sock.getsockname()[:2]}, not "
                                  f"to {pair.name}'s {pair.listen}")
        finally:
            sock.close()
        fds[pair.index] = fd
    return fds


def supervisor_alive(environ: "Optional[Dict[str, str]]" = None) -> bool:
    """Whether this process's parent is still the supervisor that started it.

    ``True`` when no supervisor is named (the process was not started by one).
    """
    env = os.environ if environ is None else environ
    text = env.get(SUPERVISOR_ENV, "")
    return not text.isdigit() or os.getppid() == int(text)


def die_with_supervisor() -> bool:
    """In a worker: get SIGTERM when the supervisor dies (Linux).

    Also ignore SIGHUP until the key-reload handler is installed, so that a
    reload forwarded while this worker starts does not end it.

    :returns: ``False`` if the supervisor is already gone (the caller exits).
    :raises OSError: the death signal cannot be set (not Linux): a worker
        that could outlive its supervisor must not run.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
    # Checked after prctl: a supervisor that died before it is caught here.
    return supervisor_alive()


@implementer(ILogObserver)
class _JSONLines:
    """Write each event as one JSON line to a worker's standard output.

    Writes never block: the descriptor is non-blocking, what the supervisor
    has not read yet is held up to :data:`LOG_BUFFER_LIMIT` bytes, and lines
    beyond that are dropped and counted in the next line that gets through.
    A failure's traceback is turned into text first (JSON cannot carry it).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self._pending = bytearray()
        self.dropped = 0

    def __call__(self, event: Dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            event = dict(event)
            del event["log_failure"]
            event["log_format"] = (str(event.get("log_format") or "")
                                   + "\n{log_traceback}")
            event["log_traceback"] = failure.getTraceback()
        try:
            line = eventAsJSON(event).encode("utf-8") + b"\n"
        except (TypeError, ValueError, RecursionError):
            return
        self.flush()
        if self.dropped and len(self._pending) < LOG_BUFFER_LIMIT // 2:
            note = {"log_level": LogLevel.warn, "log_namespace":
                    "tigertunnel.ops.workers", "log_format": "{count} log lines "
                    "dropped: the supervisor was not reading",
                    "count": self.dropped, "log_time": event.get("log_time", 0)}
            self._pending += eventAsJSON(note).encode("utf-8") + b"\n"
            self.dropped = 0
        if len(self._pending) + len(line) > LOG_BUFFER_LIMIT:
            self.dropped += 1
        else:
            self._pending += line
        self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now."""
        while self._pending:
            try:
                n = os.write(self._fd, self._pending)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self._pending.clear()  # supervisor gone: nobody to tell
                return
            del self._pending[:n]


def announce_ready(publish: Callable[[Dict[str, Any]], None] = globalLogPublisher) -> None:
    """In a worker: tell the supervisor this worker serves (whatever the
    log level; the supervisor does not log it)."""
    publish({READY_FIELD: True, "log_level": LogLevel.info,
             "log_namespace": "tigertunnel.workers", "log_format": "ready",
             "log_time": 0.0})


def worker_log_observer(fd: Optional[int] = None) -> ILogObserver:
    """The log observer of a worker: JSON lines on its standard output."""
    return _JSONLines(sys.stdout.fileno() if fd is None else fd)


class _WorkerProtocol(ProcessProtocol):
    """One worker process: relays its log, reports its end."""

    def __init__(self, supervisor: "WorkerSupervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = supervisor.reactor.seconds()
        #: Set by its ready event: it serves and its SIGHUP handler is set.
        self.up = False
        #: Key reloads forwarded before it started (see WorkerSupervisor.reload).
        self.reloads_seen = supervisor.reloads
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
                self.supervisor.relay(self, fd, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest.strip():
                self.supervisor.relay(self, fd, rest)
        self._partial = {}
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """Start, watch and stop workers 1 .. N-1 of a tunnel end.

    :param command: the worker command without ``--worker-index``.
    :param count: N, the number of workers including this process.
    :param listen_fds: returns worker 0's listening descriptors, one per
        pair in order, once the listeners are bound.
    :param cwd: the directory the command was given in (relative key and
        config paths are relative to it; twistd may have changed directory).
    :param shutdown_timeout: seconds the workers may take to drain.
    """

    name = "workers"

    def __init__(self, reactor: Any, command: Sequence[str], count: int,
                 listen_fds: Callable[[], List[int]], cwd: str,
                 shutdown_timeout: float,
                 publish: Callable[[Dict[str, Any]], None] = globalLogPublisher,
                 environ: "Optional[Dict[str, str]]" = None) -> None:
        self.reactor = reactor
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
        self.workers: Dict[int, _WorkerProtocol] = {}
        self.restarts = 0
        #: SIGHUP reloads so far (a worker that was starting gets one more).
        self.reloads = 0
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
        """Forward a key reload (SIGHUP) to every worker that is up; one
        still starting gets it once it is ready (SIGHUP could end it before)."""
        self.reloads += 1
        for worker in list(self.workers.values()):
            if worker.up:
                worker.reloads_seen = self.reloads
                self._signal(worker, "HUP")

    def _ready(self, worker: _WorkerProtocol) -> None:
        worker.up = True
        if worker.reloads_seen != self.reloads:
            worker.reloads_seen = self.reloads
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
        try:
            fds = self.listen_fds()
        except (AttributeError, OSError, ValueError) as e:  # no listener now
            log.error("cannot start worker {index}: no listening socket to "
                      "hand over ({reason})", index=index, reason=str(e))
            return
        child_fds: Dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for i, fd in enumerate(fds):
            child_fds[FIRST_FD + i] = fd
        # Read now, not when built: twistd daemonizes (forks) in between.
        env = dict(self.env, **{
            SUPERVISOR_ENV: str(os.getpid()),
            LISTEN_FDS_ENV: ",".join(str(FIRST_FD + i) for i in range(len(fds)))})
        try:
            self.reactor.spawnProcess(worker, argv[0], argv, env=env,
                                      path=self.cwd, childFDs=child_fds)
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
        if worker.up:
            log.warn("worker {index} exited ({status}); restarting it in "
                     "{delay:.0f} s", index=worker.index, status=status,
                     delay=delay)
        else:
            log.error("worker {index} failed to start ({status}; see its "
                      "lines above); trying again in {delay:.0f} s",
                      index=worker.index, status=status, delay=delay)

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

    def relay(self, worker: _WorkerProtocol, fd: int, line: bytes) -> None:
        """Publish one line of a worker's output in this process's log.

        Never raises: a line that is not one of our JSON events is published
        as text, at error level when it is a start-up error.
        """
        text = line.decode("utf-8", "replace")
        event: Any = None
        if fd == 1:
            try:
                event = eventFromJSON(text)
            except Exception:
                event = None
        if isinstance(event, dict) and event.get(READY_FIELD) is True:
            self._ready(worker)
            return
        if not (isinstance(event, dict) and _is_level(event.get("log_level"))):
            level = (LogLevel.error if text.startswith("tigertunnel: error:")
                     else LogLevel.warn)
            event = {"log_level": level, "log_namespace": "tigertunnel.workers",
                     "log_format": "{line}", "line": text,
                     "log_time": self.reactor.seconds()}
        event["log_system"] = (f"worker {worker.index}/"
                               f"{event.get('log_namespace', '-')}"
                               f"#{event['log_level'].name}")
        try:
            self.publish(event)
        except Exception:
            pass

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


__all__ = ["MAX_WORKERS", "WorkerSupervisor", "announce_ready", "die_with_supervisor",
           "inherited_listen_fds", "supervisor_alive",
           "worker_command", "worker_log_observer"]
