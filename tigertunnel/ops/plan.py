"""The start-up plan of a tunnel end: the I/O between parsing and building.

The options (:class:`tigertunnel.tap.Options`) only parse and check values,
into frozen settings (:class:`~tigertunnel.config.model.TunnelConfig` and
:class:`Operations`). Before any service is built, :func:`make_plan` does,
once, what needs the network and the process around it:

* every listen host name is resolved, and the listeners use that answer;
* under ``--systemd-sockets`` the sockets systemd passed are adopted;
* a ``--workers`` worker takes worker 0's listening sockets, its accept
  board and (a server without a replay file) its replay cache from the
  environment worker 0 started it with;
* a server's replay-cache file is named (``--replay-file``, else next to
  twistd's ``--pidfile``), and its workers are told that file.

The result is a frozen :class:`Plan`; the builders
(:mod:`tigertunnel.ops.assemble`) read nothing else. Every problem is a
:class:`~tigertunnel.errors.ConfigError` naming the value.
"""

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

from tigertunnel.config.model import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    Role,
    TunnelConfig,
    listen_description,
)

if TYPE_CHECKING:
    from tigertunnel.ops.tls import ServerTLS
    from tigertunnel.ops.workers import AcceptBoard


@dataclass(frozen=True)
class Operations:
    """Settings of the operations features (metrics, shutdown, systemd)."""

    metrics: Optional[str] = None
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    systemd_sockets: bool = False
    #: The ``--replay-file`` value as given (``None``: not given).
    replay_file: Optional[str] = None
    #: ``--metrics`` over HTTPS (``--metrics-tls-cert`` and ``-key``).
    metrics_tls: "Optional[ServerTLS]" = None


@dataclass(frozen=True)
class Plan:
    """Everything the builders need to assemble a tunnel end.

    :ivar config: the settings, with the listen descriptions and inherited
        sockets the plan settled.
    :ivar worker_index: this process's ``--worker-index`` (``None``: the
        only process, or worker 0 of ``--workers``).
    :ivar worker_args: the ``server``/``client`` arguments worker 0 starts
        its workers with.
    :ivar cwd: the directory the arguments were given in (workers start there).
    :ivar board: a worker's accept board, inherited from worker 0.
    :ivar replay_descriptor: a server worker's replay cache in shared
        memory, inherited from worker 0 (no replay file).
    :ivar replay_path: a server's replay-cache file (``None``: memory).
    """

    config: TunnelConfig
    operations: Operations
    log_level: str
    worker_index: Optional[int] = None
    worker_args: Tuple[str, ...] = ()
    cwd: str = "."
    board: "Optional[AcceptBoard]" = None
    replay_descriptor: Optional[int] = None
    replay_path: Optional[str] = None

    @property
    def is_worker(self) -> bool:
        """Whether this process is worker 1 or later of ``--workers``."""
        return self.worker_index is not None

    @property
    def supervises(self) -> bool:
        """Whether this process starts and watches worker processes."""
        return self.config.workers > 1 and not self.is_worker


def resolved_listen_descriptions(config: TunnelConfig,
                                 skip: Sequence[int] = ()) -> Dict[int, str]:
    """The endpoint description of each pair's listen address, host names
    resolved (once, here).

    :param skip: pair indexes that listen elsewhere (adopted sockets).
    :raises ConfigError: a listen host name does not resolve.
    """
    return {pair.index: listen_description(pair.listen)
            for pair in config.pairs if pair.index not in skip}


def make_plan(config: TunnelConfig, operations: Operations, log_level: str,
              worker_index: Optional[int] = None, role_args: Sequence[str] = (),
              cwd: str = ".", pidfile: Optional[str] = None) -> Plan:
    """Do the start-up I/O of a parsed tunnel end.

    :param role_args: the arguments of the run after ``server``/``client``
        (what workers are started with, ``--config`` already expanded).
    :param pidfile: twistd's ``--pidfile`` (the default replay file sits
        next to it), ``None`` for the console script.
    :raises ConfigError: naming what cannot be used.
    """
    board: "Optional[AcceptBoard]" = None
    replay_descriptor: Optional[int] = None
    inherited: Dict[int, int] = {}
    overrides: Dict[int, str] = {}
    if worker_index is not None:
        from tigertunnel.ops.workers import (
            inherited_board,
            inherited_listen_fds,
            inherited_replay_descriptor,
        )

        inherited = inherited_listen_fds(config.pairs)
        board = inherited_board(len(config.pairs), config.workers)
        replay_descriptor = inherited_replay_descriptor()
    else:
        if operations.systemd_sockets:
            from tigertunnel.ops.systemd import adopted_listen_descriptions

            overrides = adopted_listen_descriptions(config.pairs)
        overrides.update(resolved_listen_descriptions(config, skip=list(overrides)))
    worker_args = [str(config.role), *role_args]
    replay_path: Optional[str] = None
    if config.role is Role.SERVER:
        from tigertunnel.ops.replay import replay_path as replay_file_path

        replay_path = replay_file_path(operations.replay_file, pidfile)
        # Workers have no pidfile of their own: they open worker 0's file.
        worker_args.append(f"--replay-file={replay_path or 'memory'}")
    return Plan(replace(config, inherited_fds=inherited, listen_overrides=overrides),
                operations, log_level, worker_index, tuple(worker_args), cwd,
                board, replay_descriptor, replay_path)
