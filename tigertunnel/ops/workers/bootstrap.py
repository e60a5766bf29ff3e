"""A worker's start: its command line, its inherited sockets, its supervisor.

Worker 0 starts worker ``I`` as ``python -P -m tigertunnel ROLE ARGS
--worker-index I`` (:func:`worker_command`), with worker 0's listening
sockets as descriptors 3, 4, ... (one per proxy pair, named by
:data:`LISTEN_FDS_ENV`), the accept board next (:data:`BOARD_FD_ENV`) and
its own pid in :data:`SUPERVISOR_ENV`. The worker checks each socket against
its pair (:func:`inherited_listen_fds`), maps the board
(:func:`inherited_board`), finds a tunnel server's shared replay cache when
there is one (:data:`REPLAY_FD_ENV`, :func:`inherited_replay_descriptor`)
and arranges to end with its supervisor
(:func:`die_with_supervisor`).
"""

import ctypes
import os
import signal
import socket
import sys
from typing import Dict, List, Mapping, Optional, Sequence

from tigertunnel.config.model import ProxyPair
from tigertunnel.errors import ConfigError
from tigertunnel.ops.workers.balance import AcceptBoard, open_board

#: Most worker processes per tunnel end.
MAX_WORKERS = 64
#: Environment variable naming the supervisor's pid, for the workers.
SUPERVISOR_ENV = "TIGERTUNNEL_SUPERVISOR_PID"
#: Environment variable listing a worker's inherited listening sockets, one
#: descriptor per proxy pair in ``-p`` order (``"3,4"``).
LISTEN_FDS_ENV = "TIGERTUNNEL_LISTEN_FDS"
#: The first descriptor number the listening sockets get in a worker.
FIRST_FD = 3
#: Environment variable naming a worker's inherited accept board (the
#: descriptor after the listening sockets; see :mod:`.balance`).
BOARD_FD_ENV = "TIGERTUNNEL_BOARD_FD"
#: Environment variable naming a worker's inherited replay cache (the
#: shared memory worker 0 makes when the server has no replay file; see
#: :mod:`tigertunnel.ops.replay`).
REPLAY_FD_ENV = "TIGERTUNNEL_REPLAY_FD"
#: Environment variables a worker must not inherit: systemd's notification
#: socket, watchdog and socket-activation variables belong to worker 0.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
               "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

# linux/prctl.h
_PR_SET_PDEATHSIG = 1


def safe_path_flag(version: "tuple[int, ...]" = tuple(sys.version_info[:3])) -> str:
    """The interpreter flag that keeps the working directory off ``sys.path``.

    ``python -m`` puts the working directory first on ``sys.path``, so a
    ``tigertunnel.py`` (or ``twisted.py``, ``hmac.py`` ...) lying in the
    directory the operator started from would be imported into a process
    that holds keys. ``-P`` (Python 3.11+) leaves it out; older versions
    get ``-I`` (isolated mode, which also ignores ``PYTHON*`` environment
    variables and the user's site directory).
    """
    return "-P" if version >= (3, 11) else "-I"


def worker_command(role_args: Sequence[str]) -> List[str]:
    """The command line of a worker: the console script with the same
    arguments, and nothing from the working directory on its import path
    (:func:`~tigertunnel.ops.workers.bootstrap.safe_path_flag`)."""
    return [sys.executable, safe_path_flag(), "-m", "tigertunnel"] + list(role_args)


def inherited_listen_fds(pairs: Sequence[ProxyPair],
                         environ: Optional[Mapping[str, str]] = None) -> Dict[int, int]:
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


def inherited_board(pairs: int, workers: int,
                    environ: Optional[Mapping[str, str]] = None) -> AcceptBoard:
    """In a worker: the accept board worker 0 handed over.

    :raises ConfigError: the variable is missing or malformed, or the
        descriptor is not a board of this size.
    """
    env = os.environ if environ is None else environ
    text = env.get(BOARD_FD_ENV, "")
    if not text.isdigit():
        raise ConfigError(f"--worker-index: {BOARD_FD_ENV}={text!r} does not "
                          f"name the accept board (workers are started by "
                          f"--workers, not by hand)")
    return open_board(int(text), pairs, workers)


def inherited_replay_descriptor(environ: Optional[Mapping[str, str]] = None
                                ) -> Optional[int]:
    """In a worker: the replay cache worker 0 handed over, if any (a tunnel
    server without a replay file).

    :raises ConfigError: the variable is malformed.
    """
    env = os.environ if environ is None else environ
    text = env.get(REPLAY_FD_ENV)
    if text is None:
        return None
    if not text.isdigit():
        raise ConfigError(f"--worker-index: {REPLAY_FD_ENV}={text!r} does not "
                          f"name the replay cache (workers are started by "
                          f"--workers, not by hand)")
    return int(text)


def supervisor_alive(environ: Optional[Mapping[str, str]] = None) -> bool:
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
