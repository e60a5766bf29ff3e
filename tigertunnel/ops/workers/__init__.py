"""Worker processes: one tunnel end served by several processes (``--workers N``).

A tunnel end is one Python process, so it uses one core. With ``--workers N``
the process the operator started (under ``twistd`` or the console script)
is worker 0 *and* the supervisor of N-1 more workers, which run the same
command with ``--worker-index I``. Worker 0 binds the listeners (as twistd
binds them, before it drops privileges, or as systemd hands them over) and
every worker inherits those very sockets and accepts on them (TB clients on
a tunnel client, pool connections on a tunnel server). An accept board in
shared memory (:mod:`.balance`) gives a new connection to the live worker
that serves fewest on that pair, so sessions spread over the workers even
when one of them is always first to wake. A session lives in one worker
from start to end; each client worker keeps its own pool (``-n`` connections per pair) and
each worker its own ``-m`` limit.

Why inherited sockets rather than a SO_REUSEPORT socket per worker: with
SO_REUSEPORT the kernel hashes a new connection to one socket of the group,
so while a worker restarts, the connections hashed to its socket wait
unanswered; a second instance started by mistake would silently join the
group and take a share of the traffic; and a worker started after twistd
dropped privileges could not bind a privileged port. A shared socket has
none of these problems, and TB's connections are long-lived, so the wake-ups
of the idle workers on a new connection, and the board's look at each
accept, cost nothing that matters.

The package has four parts:

* :mod:`.bootstrap`, what a worker does first: check the sockets it
  inherited, ask the kernel for SIGTERM when its supervisor dies
  (``PR_SET_PDEATHSIG``, so a SIGKILLed supervisor leaves no workers
  behind), and the command line a worker is started with;
* :mod:`.logpipe`, the worker's log: JSON lines on its standard output,
  written without ever blocking, and the supervisor's reading of them;
* :mod:`.balance`, the accept board and each worker's
  :class:`~.balance.AcceptBalancer`;
* :mod:`.supervisor`, :class:`~tigertunnel.ops.workers.supervisor.WorkerSupervisor` (a service
  of worker 0):
  starts the workers, re-publishes their log lines, restarts a worker that
  exits (after 1 s doubling to 30 s), forwards SIGHUP (key reload) to the
  workers that are up, and on shutdown sends SIGTERM to all of them at once,
  then SIGKILL to those still alive after the shutdown timeout plus a grace.

None of these modules imports the reactor; the supervisor is handed one.
"""

from tigertunnel.ops.workers.balance import (
    AcceptBalancer,
    AcceptBoard,
    PairGate,
    create_board,
)
from tigertunnel.ops.workers.bootstrap import (
    BOARD_FD_ENV,
    LISTEN_FDS_ENV,
    MAX_WORKERS,
    PRIVATE_ENV,
    REPLAY_FD_ENV,
    SUPERVISOR_ENV,
    die_with_supervisor,
    inherited_board,
    inherited_listen_fds,
    inherited_replay_descriptor,
    supervisor_alive,
    worker_command,
)
from tigertunnel.ops.workers.logpipe import (
    LOG_BUFFER_LIMIT,
    announce_ready,
    report_figures,
    worker_log_observer,
)
from tigertunnel.ops.workers.supervisor import KILL_GRACE, WorkerSupervisor

__all__ = [
    "AcceptBalancer", "AcceptBoard", "BOARD_FD_ENV", "PairGate",
    "create_board", "inherited_board", "KILL_GRACE", "LISTEN_FDS_ENV", "LOG_BUFFER_LIMIT", "MAX_WORKERS",
    "PRIVATE_ENV", "REPLAY_FD_ENV", "SUPERVISOR_ENV", "WorkerSupervisor", "announce_ready",
    "report_figures",
    "die_with_supervisor", "inherited_listen_fds", "inherited_replay_descriptor",
    "supervisor_alive",
    "worker_command", "worker_log_observer",
]
