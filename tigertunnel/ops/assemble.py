"""Assemble a tunnel end from its start-up plan: a few named builders.

:func:`assemble` is what ``makeService`` calls with a
:class:`~tigertunnel.ops.plan.Plan`. The multiplexers are the children of a
:class:`~tigertunnel.ops.shutdown.TunnelService` (graceful shutdown); each
builder below adds one concern as its operations services: the replay
cache (:func:`build_replay`), process-wide tuning (:func:`tune_process`),
worker processes (:func:`build_workers`), key reload on SIGHUP, metrics
(:func:`build_metrics`) and the systemd notifications.
"""

from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

from twisted.internet.interfaces import IReactorCore, IReactorProcess, IReactorTime

from tigertunnel import logs
from tigertunnel.config.model import Role
from tigertunnel.net.multiplexer import build_service
from tigertunnel.ops.plan import Plan
from tigertunnel.ops.reload import KeyReloader, ReloadService
from tigertunnel.ops.replay import ReplayCacheService
from tigertunnel.ops.shutdown import ProcessReactor, TunnelService
from tigertunnel.ops.systemd import Notifier, SystemdService, watchdog_interval
from tigertunnel.ops.tbmetrics import TBRecorder, watch_pairs
from tigertunnel.ops.workers import AcceptBalancer, AcceptBoard, WorkerSupervisor


def assemble(plan: Plan, reactor: ProcessReactor) -> TunnelService:
    """The tunnel end ``plan`` describes, not started."""
    logs.set_level(plan.log_level)
    warn_incomplete_hardening()
    top = TunnelService(reactor, plan.operations.shutdown_timeout, handle_sigterm=True)
    replay, shared_replay = build_replay(plan)
    build_service(plan.config, reactor, top=top, replay_cache=replay)
    if replay is not None:
        top.add_operation(replay, stop_last=True)
    tune_process(top, reactor)
    # What each pair sees of TigerBeetle: logged (evictions, view changes)
    # and, with --metrics, served.
    recorders = watch_pairs(top.multiplexers, reactor.seconds)
    reloader = KeyReloader(top.multiplexers, reactor)
    notifier = Notifier.from_environment()
    systemd = (SystemdService(notifier, IReactorCore(reactor), watchdog_interval())
               if notifier.enabled else None)
    supervisor = build_workers(plan, top, reactor, recorders, shared_replay)
    # SIGHUP goes to systemd's notifications and to the workers too.
    listeners: List[Union[SystemdService, WorkerSupervisor]] = [
        listener for listener in (systemd, supervisor) if listener is not None]
    top.add_operation(ReloadService(reloader, reactor, listeners))
    build_metrics(plan, top, reactor, reloader, recorders, supervisor)
    if systemd is not None:
        top.add_operation(systemd)
    return top


def warn_incomplete_hardening() -> None:
    """Log what process hardening could not do (it ran before parsing)."""
    from tigertunnel.ops import hardening

    hardened = hardening.applied()
    if hardened is not None:
        for problem in hardened.problems:
            logs.logger("tigertunnel.ops.hardening").warn(
                "process hardening incomplete: {problem}", problem=problem)


def build_replay(plan: Plan) -> Tuple[Optional[ReplayCacheService], Optional[int]]:
    """A server's replay cache (one per tunnel end).

    :returns: the cache service (``None``: a client) and the shared-memory
        descriptor its workers inherit (``None``: a replay file, or none).
    """
    if plan.config.role is not Role.SERVER:
        return None, None
    shared: Optional[int] = None
    if plan.replay_path is None and plan.supervises:
        # Without a file, worker 0 makes shared memory for its workers
        # (they inherit it, as the accept board).
        from tigertunnel.ops.replay import create_shared_memory

        shared = create_shared_memory()
    elif plan.replay_path is None:
        shared = plan.replay_descriptor
    return ReplayCacheService(plan.replay_path, shared), shared


def tune_process(top: TunnelService, reactor: ProcessReactor) -> None:
    """Process-wide, once: malloc settings for 1 MiB frames, a periodic
    heap trim and the start-up heap frozen once running (accept errors are
    rate-limited by the log writer, :mod:`tigertunnel.logs`)."""
    from tigertunnel.ops.memory import freeze_startup_heap, memory_trimmer, tune_malloc

    tune_malloc()
    top.add_operation(memory_trimmer(IReactorTime(reactor)))
    reactor.callWhenRunning(freeze_startup_heap)


def build_workers(plan: Plan, top: TunnelService, reactor: ProcessReactor,
                  recorders: Sequence[TBRecorder],
                  shared_replay: Optional[int]) -> Optional[WorkerSupervisor]:
    """``--workers``: every process balances accepts over one board; a
    worker reports its figures to worker 0; worker 0 starts the workers.

    :returns: worker 0's supervisor (``None``: one process, or a worker).
    """
    from tigertunnel.ops.figures import figures_reporter
    from tigertunnel.ops.metrics import process_collectors
    from tigertunnel.ops.workers import create_board, worker_command

    if plan.config.workers < 2:
        return None
    clock = IReactorTime(reactor)
    # New connections go to the worker that serves fewest (one board per
    # tunnel end: worker 0 makes it, the others inherit it).
    board = create_board(len(top.multiplexers), plan.config.workers) if plan.supervises else None
    accept_board = board[1] if board is not None else plan.board
    assert accept_board is not None  # a worker's plan inherited it
    top.add_operation(balance_accepts(top, accept_board, plan.worker_index or 0, clock))
    if plan.is_worker:
        # Its figures go to worker 0, which serves the sum.
        top.add_operation(figures_reporter(top.multiplexers, recorders, clock,
                                           process_collectors()))
        return None
    supervisor = WorkerSupervisor(
        IReactorProcess(reactor), worker_command(list(plan.worker_args)),
        plan.config.workers, partial(listening_descriptors, top), plan.cwd,
        plan.operations.shutdown_timeout, board=board, replay=shared_replay)
    top.add_operation(supervisor, stop_last=True)
    return supervisor


def build_metrics(plan: Plan, top: TunnelService, reactor: ProcessReactor,
                  reloader: KeyReloader, recorders: Sequence[TBRecorder],
                  supervisor: Optional[WorkerSupervisor]) -> None:
    """``--metrics``: /metrics and /status (with the workers' figures); a
    server's also probe whether its replica is up."""
    from tigertunnel.ops.backend import backend_probes
    from tigertunnel.ops.metrics import MetricsService

    ops = plan.operations
    if ops.metrics is None:
        return
    others = (lambda: supervisor.figures) if supervisor is not None else None
    top.add_operation(MetricsService(ops.metrics, top.multiplexers, reloader, reactor,
                                     list(recorders), others, tls=ops.metrics_tls),
                      stop_last=True)
    for probe in backend_probes(top.multiplexers, reactor):
        top.add_operation(probe)


def balance_accepts(top: TunnelService, board: AcceptBoard, worker: int,
                    clock: IReactorTime) -> AcceptBalancer:
    """Put a gate on each pair's listener; the balancer that keeps the
    board written."""
    from tigertunnel.ops.workers import PairGate

    gates = []
    for pair, mux in enumerate(top.multiplexers):
        gate = PairGate(board, pair, worker, mux)
        mux.listener.gate = gate
        gates.append((gate, mux.listener))
    return AcceptBalancer(board, worker, clock, gates)


def listening_descriptors(top: TunnelService) -> List[int]:
    """The listening socket of each proxy pair, in order (handed to workers).

    :raises ValueError: a pair is not listening (yet).
    """
    fds = []
    for mux in top.multiplexers:
        listener = mux.listener
        if listener.port is None:
            raise ValueError(f"{mux.pair.name} is not listening")
        fds.append(int(listener.port.fileno()))
    return fds
