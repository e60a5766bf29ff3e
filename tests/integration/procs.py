"""Process, port and waiting helpers for the integration tests.

Everything here is bounded: a child that does not finish in time is killed
and reported, a wait that does not see its event by the deadline fails the
test with :class:`WaitTimeout`. Waits poll with ``deferLater`` on the real
reactor, so the reactor keeps running while a test waits.

What ``/proc`` says about a process (CPU time, descriptors, sockets, memory)
comes from :mod:`tigertunnel.tools.procs`, the benchmark's probes, and is
re-exported here.

Processes are started with ``reactor.spawnProcess`` from the ``bin``
directory of the running interpreter (the tox or development venv) and with
the environment unchanged (``PYTHONPATH`` included). Daemons started by
``twistd`` are found again by their pidfile, or by a marker string in their
command line (each test's unique temporary directory) when a test failed
before it could read the pidfile.
"""

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.internet import defer, task
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

# Free ports (below the ephemeral range, so no outgoing connection takes them
# before a daemon binds them), used by the tests as procs.free_ports(n).
from tigertunnel.tools.ports import free_ports  # noqa: F401

# The /proc probes, used by the tests as procs.fd_count(pid) and so on.
from tigertunnel.tools.procs import (  # noqa: F401
    TcpSocket,
    cpu_seconds,
    fd_count,
    pid_running,
    rss_kib,
    socket_inodes,
    tcp_sockets,
    with_children,
)

#: Seconds between two looks at a polled condition.
POLL_INTERVAL = 0.02


class WaitTimeout(AssertionError):
    """A bounded wait reached its deadline (reported as a test failure)."""


def _reactor() -> Any:
    from twisted.internet import reactor
    return reactor


def executable(name: str) -> str:
    """Return the path of console script ``name`` next to ``sys.executable``.

    :raises AssertionError: the script is not installed there.
    """
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.access(path, os.X_OK):
        raise AssertionError(f"{name} is not installed next to "
                             f"{sys.executable} (expected {path})")
    return path


def child_env() -> Dict[str, str]:
    """The environment for children: ours, unchanged (PYTHONPATH included)."""
    return dict(os.environ)


def fresh_dir(path: str) -> str:
    """Create directory ``path`` (a ``TestCase.mktemp()`` name); return it absolute."""
    path = os.path.abspath(path)
    os.makedirs(path)
    return path


@dataclass(frozen=True)
class Result:
    """What a finished child process left behind.

    :ivar status: the exit status, or minus the signal number that killed it.
    """

    args: Sequence[str]
    status: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        """A short description for assertion messages (output tails only)."""
        return (f"{' '.join(self.args[:6])} ... exited {self.status}; "
                f"stdout tail {self.stdout[-600:]!r}; "
                f"stderr tail {self.stderr[-600:]!r}")


class _Collector(ProcessProtocol):
    def __init__(self) -> None:
        self.out: List[bytes] = []
        self.err: List[bytes] = []
        self.ended: "defer.Deferred[int]" = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            status = 0
        elif getattr(value, "exitCode", None) is not None:
            status = int(value.exitCode)
        else:
            status = -int(getattr(value, "signal", 0) or 0)
        self.ended.callback(status)


async def run(args: Sequence[str], timeout: float = 30.0,
              umask: Optional[int] = None, env: Optional[Dict[str, str]] = None,
              stdout_fd: Optional[int] = None, cwd: Optional[str] = None) -> Result:
    """Run a child to completion, collecting its output.

    The child runs in our working directory (give it absolute paths): with
    no ``path`` Twisted starts it with ``posix_spawn`` instead of forking
    this (possibly large, threaded) test process.

    :param umask: the child's umask (ours is restored right after spawning).
    :param env: the child's environment (default :func:`child_env`).
    :param stdout_fd: a descriptor of ours to give the child as its stdout
        (default: a pipe whose output the result holds).
    :param cwd: the child's working directory (default: ours; giving one
        makes Twisted fork instead of ``posix_spawn``).
    :returns: the child's :class:`Result`.
    :raises WaitTimeout: the child did not finish within ``timeout`` seconds
        (it has been killed with SIGKILL).
    """
    reactor = _reactor()
    proto = _Collector()
    old = os.umask(umask) if umask is not None else None
    try:
        fds: Dict[int, Any] = {0: "w", 1: "r" if stdout_fd is None else stdout_fd, 2: "r"}
        transport = reactor.spawnProcess(proto, args[0], list(args),
                                         env=child_env() if env is None else env,
                                         path=cwd, childFDs=fds)
    finally:
        if old is not None:
            os.umask(old)
    transport.closeStdin()
    try:
        status = await proto.ended.addTimeout(timeout, reactor)
    except defer.TimeoutError:
        where = _describe_pid(transport.pid)
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        # A killed child ends (and is reaped) promptly; bound it anyway.
        await task.deferLater(reactor, 0.5, lambda: None)
        raise WaitTimeout(
            f"{' '.join(args[:6])} ... still running after {timeout} s "
            f"({where}); killed. stderr tail: "
            f"{b''.join(proto.err)[-600:].decode(errors='replace')!r}"
        ) from None
    return Result(list(args), status,
                  b"".join(proto.out).decode(errors="replace"),
                  b"".join(proto.err).decode(errors="replace"))


def _describe_pid(pid: Optional[int]) -> str:
    """The state, kernel wait channel and command line of ``pid``, for failures."""
    if pid is None:
        return "no pid"
    parts = [f"pid {pid}"]
    for name in ("stat", "wchan", "cmdline"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                parts.append(f"{name}={f.read()[:200].replace(bytes(1), b' ')!r}")
        except OSError:
            pass
    return ", ".join(parts)


async def wait_until(predicate: Callable[[], bool], timeout: float,
                     what: str) -> None:
    """Poll ``predicate`` until it is true.

    :param what: describes the awaited condition, for the failure message.
    :raises WaitTimeout: still false after ``timeout`` seconds.
    """
    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            raise WaitTimeout(f"gave up after {timeout} s waiting for {what}")
        await task.deferLater(reactor, POLL_INTERVAL, lambda: None)


def read_text(path: str) -> str:
    """Return the content of ``path``, or ``""`` when it does not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


async def wait_for_text(path: str, text: str, timeout: float,
                        count: int = 1) -> str:
    """Wait until file ``path`` contains ``text`` at least ``count`` times.

    :returns: the file's content at that moment.
    :raises WaitTimeout: naming the file and showing its tail.
    """
    try:
        await wait_until(lambda: read_text(path).count(text) >= count,
                         timeout, f"{count} x {text!r} in {path}")
    except WaitTimeout as e:
        raise WaitTimeout(f"{e}; its tail: {read_text(path)[-1500:]!r}") from None
    return read_text(path)


def read_pidfile(path: str) -> Optional[int]:
    """Return the pid written in ``path``, or ``None`` without a usable file."""
    text = read_text(path).strip()
    return int(text) if text.isdigit() else None


def pids_mentioning(marker: str) -> List[int]:
    """Return the running processes (not us) whose command line contains ``marker``."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    encoded = marker.encode()
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if encoded in cmdline and pid_running(int(entry)):
            found.append(int(entry))
    return found


async def stop_pid(pid: int, timeout: float = 5.0) -> bool:
    """Stop process ``pid``: SIGTERM, wait, then SIGKILL.

    :returns: ``True`` when it ended after SIGTERM (or was already gone),
        ``False`` when it needed SIGKILL.
    :raises WaitTimeout: it survived SIGKILL too.
    """
    if not pid_running(pid):
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    try:
        await wait_until(lambda: not pid_running(pid), timeout,
                         f"pid {pid} to exit after SIGTERM")
        return True
    except WaitTimeout:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    await wait_until(lambda: not pid_running(pid), 5.0,
                     f"pid {pid} to exit after SIGKILL")
    return False


async def stop_strays(marker: str) -> List[int]:
    """Stop every process whose command line contains ``marker``.

    Used in cleanups with the test's own temporary directory as the marker,
    so it only ever touches processes this test started.

    :returns: the pids that were still running.
    """
    strays = pids_mentioning(marker)
    for pid in strays:
        await stop_pid(pid)
    return strays


class Child:
    """A long-running child process started by :func:`spawn`.

    :ivar ended: fires with the exit status (minus the signal number when
        killed by a signal).
    """

    def __init__(self, args: Sequence[str], transport: Any,
                 collector: "_Collector") -> None:
        self.args = list(args)
        self.transport = transport
        self.pid: int = transport.pid
        self._collector = collector
        self.ended = collector.ended

    @property
    def output(self) -> str:
        """Everything the child wrote to stdout and stderr so far."""
        return (b"".join(self._collector.out) + b"".join(self._collector.err)
                ).decode(errors="replace")

    @property
    def running(self) -> bool:
        """Whether the child has not ended yet."""
        return not self.ended.called

    async def kill(self, sig: int = signal.SIGKILL, timeout: float = 5.0) -> int:
        """Send ``sig`` and wait (bounded) for the child to end; return its status."""
        if self.running:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        result: int = await _wait_deferred(self.ended, timeout,
                                           f"pid {self.pid} to end after signal {sig}")
        return result


async def _wait_deferred(d: "defer.Deferred[Any]", timeout: float, what: str) -> Any:
    """Wait for ``d`` without consuming its result (other waiters still see it)."""
    done: "defer.Deferred[Any]" = defer.Deferred()

    def fire(result: Any) -> Any:
        if not done.called:
            done.callback(result)
        return result

    d.addBoth(fire)
    try:
        return await done.addTimeout(timeout, _reactor())
    except defer.TimeoutError:
        raise WaitTimeout(f"gave up after {timeout} s waiting for {what}") from None


def spawn(args: Sequence[str]) -> Child:
    """Start a long-running child (in our working directory, our environment).

    The caller stops it with :meth:`Child.kill` (in a cleanup).
    """
    proto = _Collector()
    transport = _reactor().spawnProcess(proto, args[0], list(args), env=child_env())
    transport.closeStdin()
    return Child(args, transport, proto)


def spawn_to_file(args: Sequence[str], path: str,
                  env: Optional[Dict[str, str]] = None) -> Child:
    """Start a long-running child whose standard output and error go to the
    file ``path`` (made empty first), as a service manager would connect them.

    :param env: the child's environment (ours by default).
    """
    with open(path, "wb") as out:
        proto = _Collector()
        transport = _reactor().spawnProcess(
            proto, args[0], list(args), env=child_env() if env is None else env,
            childFDs={0: "w", 1: out.fileno(), 2: out.fileno()})
    transport.closeStdin()
    return Child(args, transport, proto)


async def wait_for_output(child: Child, text: str, timeout: float) -> None:
    """Wait until ``child`` has written ``text`` (stdout or stderr)."""
    try:
        await wait_until(lambda: text in child.output or not child.running,
                         timeout, f"{text!r} from pid {child.pid}")
    except WaitTimeout as e:
        raise WaitTimeout(f"{e}; output tail {child.output[-800:]!r}") from None
    if text not in child.output:
        raise AssertionError(f"pid {child.pid} ended before writing {text!r}: "
                             f"{child.output[-800:]!r}")


# -- descriptor limits --

#: Run by :func:`with_fd_limit`: set RLIMIT_NOFILE, then become the command.
_FD_LIMIT_EXEC = ("import os, resource, sys; n = int(sys.argv[1]); "
                  "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
                  "os.execv(sys.argv[2], sys.argv[2:])")


def with_fd_limit(args: Sequence[str], limit: int) -> List[str]:
    """A command line that runs ``args`` with at most ``limit`` open descriptors.

    The soft and hard ``RLIMIT_NOFILE`` are both set to ``limit`` by a tiny
    Python wrapper that then ``execv``\\ s ``args[0]`` (an absolute path), so
    the pid :func:`spawn` reports is the pid of the limited program. (Our
    ``spawn`` uses ``posix_spawn``, which has no ``preexec_fn``; this also
    works where ``prlimit`` is not installed.)
    """
    return [sys.executable, "-c", _FD_LIMIT_EXEC, str(limit), *args]
