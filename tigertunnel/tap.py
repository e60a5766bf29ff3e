"""twistd plugin options and service maker for ``twistd tigertunnel``.

``twistd [-n] [--pidfile F] tigertunnel server -p :3000,127.0.0.1:3001 -k K``
``twistd [-n] [--pidfile F] tigertunnel client -p :4000,HOST:3000 -k K``
``twistd [-n] [--pidfile F] tigertunnel client --config cluster.ini``

Every option, address and key file is validated while the options are
parsed, so a bad value stops start-up with a one-line message naming it and a
non-zero exit status, before anything listens or daemonizes.

Under twistd the process is hardened (not dumpable, no core files:
:mod:`tigertunnel.ops.hardening`) as soon as twistd hands the arguments to
:class:`Options`, before any key file is read; the console script does the
same in :func:`tigertunnel.cli.main`.
"""

import os
import sys
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union, cast

from twisted.application import app
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore, IReactorProcess, IReactorTime
from twisted.python import usage

from tigertunnel import logs
from tigertunnel.config import clusterfile
from tigertunnel.config.model import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_POOL_SIZE,
    MAX_PROXY_PAIRS,
    Role,
    TunnelConfig,
    listen_description,
    parse_proxy,
)
from tigertunnel.keys.files import (
    load_kem_public_file,
    load_kem_secret_file,
    load_psk_file,
    trusted_owners,
)
from tigertunnel.keys.format import parse_int
from tigertunnel.errors import ConfigError, KeyFileError

if TYPE_CHECKING:
    from tigertunnel.ops.shutdown import ProcessReactor, TunnelService
    from tigertunnel.ops.tls import ServerTLS
    from tigertunnel.ops.workers import AcceptBalancer, AcceptBoard

#: Default seconds a graceful shutdown (SIGTERM) may take.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0


@dataclass
class Operations:
    """Settings of the operations features (metrics, shutdown, systemd)."""

    metrics: Optional[str] = None
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    systemd_sockets: bool = False
    #: The ``--replay-file`` value as given (``None``: not given).
    replay_file: Optional[str] = None
    #: ``--metrics`` over HTTPS (``--metrics-tls-cert`` and ``-key``).
    metrics_tls: "Optional[ServerTLS]" = None


def _positive_int(name: str, text: str, limit: int = 2 ** 32 - 1) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise usage.UsageError(f"invalid {name}: {text!r} (expected a whole "
                               f"number)") from None
    if not 1 <= value <= limit:
        raise usage.UsageError(f"invalid {name}: {text!r} (must be 1 to "
                               f"{limit})")
    return value


class ExampleOptions(usage.Options):
    """Options whose ``--help`` ends with :attr:`examples`, verbatim.

    (Twisted re-wraps ``longdesc``, which would mangle command lines.)
    """

    examples = ""

    def getUsage(self, width: Optional[int] = None) -> str:
        text: str = super().getUsage(width)
        if self.examples:
            text = text.rstrip("\n") + "\n\n" + self.examples.strip("\n") + "\n"
        return text


class _EndOptions(ExampleOptions):
    """Options shared by ``server`` and ``client``."""

    role = ""
    optFlags = [
        ["plaintext", None, "Run without encryption (no -k). Only for "
         "testing on a trusted network: nothing is authenticated."],
        ["systemd-sockets", None, "Listen on the sockets systemd passes "
         "(socket activation): each -p on the one named after its LISTEN "
         "port (FileDescriptorName=), else one ListenStream= per -p, in "
         "order."],
        ["metrics-public", None, "Allow --metrics on an address other hosts "
         "can reach (the endpoint has no authentication unless "
         "--metrics-tls-client-ca)."],
    ]
    optParameters = [
        ["key", "k", None, "PSK key file (tigertunnel keygen)."],
        ["cluster", "c", None, "TigerBeetle cluster id (decimal u128); must "
         "match on both ends."],
        ["max-sessions", "m", str(DEFAULT_MAX_SESSIONS),
         "Maximum concurrent sessions per proxy pair."],
        ["log-level", None, "info", "err, warn, info or debug."],
        ["log-format", None, "text", "text or json (one JSON object per line). "
         "On the journal (JOURNAL_STREAM) lines carry their priority."],
        ["handshake-timeout", None, str(DEFAULT_HANDSHAKE_TIMEOUT),
         "Seconds allowed for a pool connection's handshake."],
        ["metrics", None, None, "Serve /metrics (Prometheus) and /status "
         "(JSON) over HTTP on this endpoint, e.g. tcp:9101:interface=127.0.0.1 "
         "(loopback or a UNIX socket unless --metrics-public)."],
        ["metrics-tls-cert", None, None, "Serve --metrics over HTTPS with this "
         "PEM certificate (then its intermediates)."],
        ["metrics-tls-key", None, None, "The PEM private key of "
         "--metrics-tls-cert (a secret file: mode 0600)."],
        ["metrics-tls-client-ca", None, None, "Require a client certificate "
         "signed by a CA of this PEM file on --metrics (mutual TLS)."],
        ["shutdown-timeout", None, str(DEFAULT_SHUTDOWN_TIMEOUT),
         "Seconds a graceful shutdown (SIGTERM) may take before connections "
         "are aborted."],
        ["config", None, None, "Cluster config file (INI) giving the proxy "
         "pairs and options; flags override it."],
        ["replica", None, None, "With --config: the replica this tunnel end "
         "runs next to (server: required with several replicas; client: "
         "replica-to-replica pairs)."],
        ["workers", None, "1", "Processes serving this tunnel end; more than "
         "1 starts worker processes that accept on the same listening "
         "sockets (-n and -m apply to each)."],
        ["worker-index", None, None, "Internal: set by --workers on the "
         "worker processes it starts."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["proxies"] = []
        self.config: Optional[TunnelConfig] = None
        self.operations = Operations()
        #: Canonical names of the options given on the command line.
        self.given: FrozenSet[str] = frozenset()
        #: A worker's accept board, inherited from worker 0 (``--workers``).
        self.board: Optional["AcceptBoard"] = None

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Parse, with ``--config FILE`` expanded in front of the arguments."""
        args = list(sys.argv[1:] if options is None else options)
        #: The directory the arguments were given in (workers start there).
        self.cwd = os.getcwd()
        expanded = clusterfile.expand_arguments(
            self, self.role, args, config_file_options(), self.check_file_option)
        self.given = expanded.given
        #: The arguments workers are started with.
        self.raw_args = expanded.worker_args
        super().parseOptions(expanded.args)

    def check_file_option(self, key: str, value: str) -> None:
        """Check one config-file value with the code its flag goes through.

        :raises usage.UsageError: naming the problem.
        """
        owners = self.key_owners()
        loaders = {"key": lambda path: load_psk_file(path, owners),
                   "kemsecret": lambda path: load_kem_secret_file(path, owners),
                   "kempublic": load_kem_public_file}
        try:
            if key in _TLS_FILE_OPTIONS:
                _check_tls_file(key, value, owners)
            elif key in loaders:
                loaders[key](value)
            elif not config_file_options()[key].flag:
                probe = type(self)()
                usage.Options.parseOptions(probe, ["--plaintext", "-p", _PROBE_PAIR,
                                                   f"--{key}={value}"])
        except KeyFileError as e:
            raise usage.UsageError(str(e)) from None

    def key_owners(self) -> FrozenSet[int]:
        """The users a secret key file may belong to: this user, root and,
        under ``twistd -u``, the user twistd will switch to (which must be
        able to read the files again on a reload)."""
        twistd = _twistd_options(self.parent)
        uid = twistd.get("uid") if twistd is not None else None
        return trusted_owners(() if uid is None else (int(uid),))

    def opt_proxy(self, value: str) -> None:
        """LISTEN,TARGET[,name=NAME] proxy pair (repeat for several
        replicas; NAME labels its metrics, default: TARGET)."""
        if len(self["proxies"]) >= MAX_PROXY_PAIRS:
            raise usage.UsageError(f"too many proxy pairs (max "
                                   f"{MAX_PROXY_PAIRS})")
        try:
            self["proxies"].append(parse_proxy(value, len(self["proxies"])))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    opt_p = opt_proxy

    def postOptions(self) -> None:
        if self["replica"] is not None and self["config"] is None:
            raise usage.UsageError("--replica needs --config")
        if not self["proxies"]:
            raise usage.UsageError(f"at least one proxy pair (-p LISTEN,TARGET)"
                                   f" is required for {self.role} mode")
        level = self["log-level"]
        if level not in logs.LEVELS:
            raise usage.UsageError(f"invalid log level: {level!r} (use: err, "
                                   f"warn, info, debug)")
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(f"invalid log format: {self['log-format']!r} "
                                   f"(use: {', '.join(logs.FORMATS)})")
        for pair in self["proxies"]:
            try:
                listen_description(pair.listen)  # resolves a listen host name
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        try:
            cfg = TunnelConfig(role=Role.parse(self.role), pairs=list(self["proxies"]))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        cfg.max_sessions = _positive_int("max-sessions",
                                         self["max-sessions"])
        try:
            cfg.handshake_timeout = float(self["handshake-timeout"])
            if not 0 < cfg.handshake_timeout <= 3600:
                raise ValueError
        except ValueError:
            raise usage.UsageError(f"invalid handshake-timeout: "
                                   f"{self['handshake-timeout']!r}") from None
        if self["cluster"] is not None:
            try:
                cfg.cluster_id = parse_int(self["cluster"], bits=128)
            except ValueError:
                raise usage.UsageError(f"invalid cluster id: "
                                       f"{self['cluster']!r} (expected a "
                                       f"decimal u128)") from None
        key = self["key"]
        if key is None and not self["plaintext"]:
            raise usage.UsageError("no key file: give -k KEYFILE (see "
                                   "'tigertunnel keygen'), or --plaintext to "
                                   "run unencrypted on purpose")
        if key is not None and self["plaintext"]:
            raise usage.UsageError("-k and --plaintext exclude each other")
        try:
            if key is not None:
                cfg.psk = load_psk_file(key, self.key_owners())
                cfg.key_path = key
            self.load_role_keys(cfg)
        except KeyFileError as e:
            raise usage.UsageError(f"cannot use key file: {e}") from None
        self.operations = self.check_operations(cfg)
        self.check_workers(cfg)
        self.config = cfg

    def check_workers(self, cfg: TunnelConfig) -> None:
        """Check --workers and --worker-index."""
        from tigertunnel.ops.workers import MAX_WORKERS

        cfg.workers = _positive_int("workers", self["workers"], MAX_WORKERS)
        index = self["worker-index"]
        if index is not None:
            from tigertunnel.ops.workers import inherited_board, inherited_listen_fds

            if cfg.workers < 2:
                raise usage.UsageError("--worker-index needs --workers 2 or more")
            _positive_int("worker-index", index, cfg.workers - 1)
            # A worker serves on worker 0's sockets; metrics are worker 0's.
            self.operations.metrics = None
            try:
                cfg.inherited_fds = inherited_listen_fds(cfg.pairs)
                self.board = inherited_board(len(cfg.pairs), cfg.workers)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None

    def check_operations(self, cfg: TunnelConfig) -> Operations:
        """Check --metrics, --shutdown-timeout and --systemd-sockets."""
        ops = Operations(metrics=self["metrics"])
        if ops.metrics is not None:
            from tigertunnel.net.listeners import endpoint_is_local

            try:
                local = endpoint_is_local(ops.metrics)
            except (ValueError, KeyError, IndexError, TypeError,
                    AttributeError) as e:
                raise usage.UsageError(f"invalid --metrics endpoint "
                                       f"{ops.metrics!r}: {e or type(e).__name__}"
                                       f" (example: tcp:9101:interface="
                                       f"127.0.0.1)") from None
            ops.metrics_tls = self.check_metrics_tls()
            authenticated = (ops.metrics_tls is not None
                             and ops.metrics_tls.requires_client_certificate)
            if not local and not authenticated and not self["metrics-public"]:
                raise usage.UsageError(
                    f"--metrics {ops.metrics!r} can be reached from other "
                    f"hosts and has no authentication: give "
                    f"interface=127.0.0.1 (or a unix: socket), require client "
                    f"certificates with --metrics-tls-client-ca, or add "
                    f"--metrics-public to serve it there on purpose")
        else:
            for name in _TLS_FILE_OPTIONS:
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} needs --metrics")
        try:
            ops.shutdown_timeout = float(self["shutdown-timeout"])
            if not 0 < ops.shutdown_timeout <= 3600:
                raise ValueError
        except ValueError:
            raise usage.UsageError(f"invalid shutdown-timeout: "
                                   f"{self['shutdown-timeout']!r} (seconds, "
                                   f"more than 0, at most 3600)") from None
        if self["systemd-sockets"] and self["worker-index"] is None:
            from tigertunnel.ops.systemd import adopted_listen_descriptions

            ops.systemd_sockets = True
            try:
                cfg.listen_overrides = adopted_listen_descriptions(cfg.pairs)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        return ops

    def check_metrics_tls(self) -> "Optional[ServerTLS]":
        """Read and check the --metrics-tls-* files (``None``: plain HTTP)."""
        from tigertunnel.ops.tls import read_server_tls

        cert, key = self["metrics-tls-cert"], self["metrics-tls-key"]
        client_ca = self["metrics-tls-client-ca"]
        if cert is None and key is None:
            if client_ca is not None:
                raise usage.UsageError("--metrics-tls-client-ca needs "
                                       "--metrics-tls-cert and --metrics-tls-key")
            return None
        if cert is None or key is None:
            given, missing = (("cert", "key") if key is None else ("key", "cert"))
            raise usage.UsageError(f"--metrics-tls-{given} needs "
                                   f"--metrics-tls-{missing}")
        try:
            return read_server_tls(cert, key, client_ca, self.key_owners())
        except ConfigError as e:
            raise usage.UsageError(f"--metrics TLS: {e}") from None

    def load_role_keys(self, cfg: TunnelConfig) -> None:
        """Load and check the KEM key file of this role."""


class ServerOptions(_EndOptions):
    """``tigertunnel server``: accept pool connections, forward to a replica."""

    role = "server"
    synopsis = "[options] -p LISTEN,BACKEND -k KEYFILE | --config FILE --replica N"
    longdesc = """Accept pool connections from tunnel clients and forward each
stream to the backend (the TigerBeetle replica next to this server).
SIGHUP reloads the key files; SIGTERM drains and exits."""
    examples = """Examples:
  twistd -n tigertunnel server -p :3000,127.0.0.1:3001 -k secret.key
  twistd -n tigertunnel server -p :3000,127.0.0.1:3001 -k secret.key \\
      --kemsecret server-kem.key --require-kem --metrics tcp:9101:interface=127.0.0.1
  twistd --pidfile tt-server.pid --logfile tt-server.log \\
      tigertunnel server --config cluster.ini --replica 0
  tigertunnel check-config server --config cluster.ini --replica 0
"""
    optFlags = [
        ["require-kem", None, "Refuse PSK-only handshakes (KEM required)."],
    ]
    optParameters = [
        ["kemsecret", None, None, "X-Wing secret key file (PREFIX.key from "
         "tigertunnel kemgen)."],
        ["replay-file", None, None, "File of recently accepted ClientHellos, "
         "shared by the pairs and workers of this server and kept across "
         "restarts (default: PIDFILE.replay under twistd; 'memory' keeps "
         "them in this process only)."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self.check_replay_file()
        self.operations.replay_file = self["replay-file"]

    def load_role_keys(self, cfg: TunnelConfig) -> None:
        cfg.require_kem = bool(self["require-kem"])
        path = self["kemsecret"]
        if path is None:
            if cfg.require_kem:
                raise usage.UsageError("--require-kem needs --kemsecret")
            return
        if cfg.psk is None:
            raise usage.UsageError("--kemsecret requires -k (KEM mode "
                                   "requires encryption)")
        cfg.kem_secret = load_kem_secret_file(path, self.key_owners())
        cfg.kem_path = path

    def check_replay_file(self) -> None:
        """Check that ``--replay-file`` names a file in an existing directory."""
        from tigertunnel.ops.replay import IN_MEMORY

        value = self["replay-file"]
        if value is None or value in IN_MEMORY:
            return
        folder = os.path.dirname(os.path.abspath(value))
        if not os.path.isdir(folder):
            raise usage.UsageError(f"invalid --replay-file {value!r}: directory "
                                   f"{folder!r} does not exist")
        if os.path.isdir(value):
            raise usage.UsageError(f"invalid --replay-file {value!r}: it is a "
                                   f"directory (give a file name)")


class ClientOptions(_EndOptions):
    """``tigertunnel client``: accept TB clients, tunnel to a server."""

    role = "client"
    synopsis = "[options] -p LISTEN,SERVER -k KEYFILE | --config FILE [--replica N]"
    longdesc = """Accept TigerBeetle connections (TB clients, or a replica talking
to its peers) and carry them over a pool of encrypted connections to the
tunnel server of each proxy pair. SIGHUP reloads the key files; SIGTERM
drains and exits."""
    examples = """Examples:
  twistd --pidfile tt.pid tigertunnel client -p :4000,tunnel.example.org:3000 -k secret.key
  twistd -n tigertunnel client -k secret.key --kempublic server-kem.pub \\
      -p :4000,r0.example:3000 -p :4001,r1.example:3000 -p :4002,r2.example:3000
  twistd -n tigertunnel client --config cluster.ini               (TB clients)
  twistd -n tigertunnel client --config cluster.ini --replica 1   (replica 1's peers)
  tigertunnel check-config client --config cluster.ini
"""
    optParameters = [
        ["num-conns", "n", str(DEFAULT_POOL_SIZE),
         "Pool connections per proxy pair."],
        ["kempublic", None, None, "X-Wing public key file (PREFIX.pub from "
         "tigertunnel kemgen)."],
    ]

    def load_role_keys(self, cfg: TunnelConfig) -> None:
        cfg.pool_size = _positive_int("num-conns", self["num-conns"], 1024)
        path = self["kempublic"]
        if path is None:
            return
        if cfg.psk is None:
            raise usage.UsageError("--kempublic requires -k (KEM mode "
                                   "requires encryption)")
        cfg.kem_public = load_kem_public_file(path)
        cfg.kem_path = path


class Options(ExampleOptions):
    """tigertunnel: an encrypted tunnel for TigerBeetle traffic."""

    synopsis = "server|client [options]"
    examples = """Examples:
  twistd -n tigertunnel server -p :3000,127.0.0.1:3001 -k secret.key
  twistd --pidfile tt.pid tigertunnel client -p :4000,HOST:3000 -k secret.key
'twistd tigertunnel server --help' and 'client --help' list the options.
"""
    subCommands = [
        ["server", None, ServerOptions, "Run the tunnel server (next to a "
         "replica)."],
        ["client", None, ClientOptions, "Run the tunnel client (next to TB "
         "clients or a replica)."],
    ]

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Parse; under twistd, harden the process first (keys are read
        while the sub-options are parsed)."""
        if _twistd_options(self.parent) is not None:
            from tigertunnel.ops.hardening import harden_once
            harden_once()
        super().parseOptions(options)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a mode: server or client")
        twistd = _twistd_options(self.parent)
        if twistd is not None:
            # twistd opens its log with our observer (--log-level on every
            # line, --log-format, the journal's priorities); --logger wins.
            logs.use_for_twistd(twistd, self.subOptions["log-format"])


def _twistd_options(options: Optional[usage.Options]) -> Optional[usage.Options]:
    """twistd's own options, if ``options`` (or one of its parents) are them."""
    while options is not None:
        if isinstance(options, app.ServerOptions):
            return options
        options = options.parent
    return None


#: The options naming the files of ``--metrics`` over TLS.
_TLS_FILE_OPTIONS = ("metrics-tls-cert", "metrics-tls-key", "metrics-tls-client-ca")


def _check_tls_file(option: str, path: str, owners: FrozenSet[int]) -> None:
    """Check one --metrics-tls-* file of a cluster config file on its own
    (whether the key is the certificate's is checked with both).

    :raises usage.UsageError: naming the problem.
    """
    from tigertunnel.ops.tls import read_certificates

    try:
        if option == "metrics-tls-key":
            from tigertunnel.keys.files import read_key_file
            read_key_file(path, secret=True, owners=owners)
        else:
            read_certificates(path)
    except (ConfigError, KeyFileError) as e:
        raise usage.UsageError(str(e)) from None


#: A proxy pair that lets a probe parse reach the option being checked.
_PROBE_PAIR = "127.0.0.1:1,127.0.0.1:2"
#: Long options a cluster config file cannot set: what picks the file and
#: the replica, the proxy pairs (the file's replicas give them), the process
#: layout, and usage's own --help and --version.
COMMAND_LINE_ONLY = ("config", "replica", "proxy", "workers", "worker-index",
                     "help", "version")


@lru_cache(maxsize=1)
def config_file_options() -> Dict[str, clusterfile.FileOption]:
    """The ``[tunnel]`` keys of a cluster config file: the long options of
    ``server`` and ``client``, less :data:`COMMAND_LINE_ONLY`."""
    return clusterfile.option_table({"server": ServerOptions(), "client": ClientOptions()},
                                   COMMAND_LINE_ONLY)


def makeService(options: Options, reactor: "Optional[ProcessReactor]" = None) -> IService:
    """Build the tunnel service from parsed :class:`Options`.

    The multiplexers are the children of a
    :class:`~tigertunnel.ops.shutdown.TunnelService` (graceful shutdown), with
    key reload on SIGHUP, the optional metrics listener and, under systemd,
    the notifications as its operations services.

    :param reactor: the global reactor by default; tests pass a
        ``MemoryReactorClock``.
    """
    from tigertunnel.logs import logger
    from tigertunnel.net.multiplexer import build_service
    from tigertunnel.ops import hardening
    from tigertunnel.ops.memory import freeze_startup_heap, memory_trimmer, tune_malloc
    from tigertunnel.ops.metrics import MetricsService
    from tigertunnel.ops.backend import backend_probes
    from tigertunnel.ops.figures import figures_reporter
    from tigertunnel.ops.metrics import process_collectors
    from tigertunnel.ops.tbmetrics import watch_pairs
    from tigertunnel.ops.reload import KeyReloader, ReloadService
    from tigertunnel.ops.replay import ReplayCacheService, replay_path
    from tigertunnel.ops.shutdown import TunnelService
    from tigertunnel.ops.systemd import Notifier, SystemdService, watchdog_interval
    from tigertunnel.ops.workers import WorkerSupervisor, create_board, worker_command

    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = cast("ProcessReactor", _reactor)
    sub = options.subOptions
    config: TunnelConfig = sub.config
    ops: Operations = sub.operations
    logs.set_level(sub["log-level"])
    hardened = hardening.applied()
    if hardened is not None:
        for problem in hardened.problems:
            logger("tigertunnel.ops.hardening").warn(
                "process hardening incomplete: {problem}", problem=problem)
    top = TunnelService(reactor, ops.shutdown_timeout, handle_sigterm=True)
    replay: Optional[ReplayCacheService] = None
    worker_args = [sub.role] + sub.raw_args
    if config.role is Role.SERVER:
        twistd = _twistd_options(options)
        path = replay_path(ops.replay_file,
                           twistd.get("pidfile") if twistd is not None else None)
        replay = ReplayCacheService(path)
        # Workers have no pidfile of their own: they open worker 0's file.
        worker_args.append(f"--replay-file={path or 'memory'}")
    build_service(config, reactor, top=top, replay_cache=replay)
    if replay is not None:
        top.add_operation(replay, stop_last=True)
    # Process-wide, once: malloc settings for 1 MiB frames, a periodic heap
    # trim.
    tune_malloc()
    top.add_operation(memory_trimmer(IReactorTime(reactor)))
    reactor.callWhenRunning(freeze_startup_heap)
    # What each pair sees of TigerBeetle: logged (evictions, view changes)
    # and, with --metrics, served.
    recorders = watch_pairs(top.multiplexers, reactor.seconds)
    reloader = KeyReloader(top.multiplexers, reactor)
    listeners: List[Union[SystemdService, WorkerSupervisor]] = []
    notifier = Notifier.from_environment()
    watchdog = watchdog_interval()
    systemd: Optional[SystemdService] = None
    if notifier.enabled:
        systemd = SystemdService(notifier, IReactorCore(reactor), watchdog)
        listeners.append(systemd)
    supervisor: Optional[WorkerSupervisor] = None
    board: "Optional[Tuple[int, AcceptBoard]]" = None
    if config.workers > 1:
        # New connections go to the worker that serves fewest (one board
        # per tunnel end: worker 0 makes it, the others inherit it).
        if sub["worker-index"] is None:
            board = create_board(len(top.multiplexers), config.workers)
        accept_board = board[1] if board is not None else sub.board
        assert accept_board is not None
        top.add_operation(_balance_accepts(top, accept_board,
                                           int(sub["worker-index"] or 0),
                                           IReactorTime(reactor)))
    if config.workers > 1 and sub["worker-index"] is not None:
        # A worker: its figures go to worker 0, which serves the sum.
        top.add_operation(figures_reporter(top.multiplexers, recorders,
                                           IReactorTime(reactor), process_collectors()))
    if config.workers > 1 and sub["worker-index"] is None:
        supervisor = WorkerSupervisor(
            IReactorProcess(reactor), worker_command(worker_args),
            config.workers, partial(_listening_descriptors, top), sub.cwd,
            ops.shutdown_timeout, board=board)
        listeners.append(supervisor)  # SIGHUP goes to the workers too
        top.add_operation(supervisor, stop_last=True)
    top.add_operation(ReloadService(reloader, reactor, listeners))
    if ops.metrics is not None:
        others = (lambda: supervisor.figures) if supervisor is not None else None
        top.add_operation(MetricsService(ops.metrics, top.multiplexers,
                                         reloader, reactor, recorders, others,
                                         tls=ops.metrics_tls),
                          stop_last=True)
        # A server's /metrics and /status tell whether its replica is up.
        for probe in backend_probes(top.multiplexers, reactor):
            top.add_operation(probe)
    if systemd is not None:
        top.add_operation(systemd)
    return top


def _balance_accepts(top: "TunnelService", board: "AcceptBoard", worker: int,
                     clock: IReactorTime) -> "AcceptBalancer":
    """Put a gate on each pair's listener; the balancer that keeps the
    board written."""
    from tigertunnel.ops.workers import AcceptBalancer, PairGate

    gates = []
    for pair, mux in enumerate(top.multiplexers):
        gate = PairGate(board, pair, worker, mux)
        mux.listener.gate = gate
        gates.append((gate, mux.listener))
    return AcceptBalancer(board, worker, clock, gates)


def _listening_descriptors(top: "TunnelService") -> List[int]:
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
