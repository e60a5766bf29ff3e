"""twistd plugin options and service maker for ``twistd tigertunnel``.

``twistd [-n] [--pidfile F] tigertunnel server -p :3000,127.0.0.1:3001 -k K``
``twistd [-n] [--pidfile F] tigertunnel client -p :4000,HOST:3000 -k K``
``twistd [-n] [--pidfile F] tigertunnel client --config cluster.ini``

Every option, address and key file is validated while the options are
parsed, so a bad value stops start-up with a one-line message naming it and a
non-zero exit status, before anything listens or daemonizes.
"""

import getopt
import os
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Set

from twisted.application.service import IService
from twisted.python import usage

from tigertunnel import logs
from tigertunnel.config import clusterfile as configfile
from tigertunnel.config.model import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_POOL_SIZE,
    MAX_PROXY_PAIRS,
    TunnelConfig,
    listen_description,
    parse_proxy,
)
from tigertunnel.keys.keyfile import (
    load_kem_public_file,
    load_kem_secret_file,
    load_psk_file,
    parse_int,
)
from tigertunnel.errors import ConfigError, KeyFileError

#: Default seconds a graceful shutdown (SIGTERM) may take.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0


@dataclass
class Operations:
    """Settings of the operations features (metrics, shutdown, systemd)."""

    metrics: Optional[str] = None
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    systemd_sockets: bool = False


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


def without_options(args: List[str], names: Sequence[str]) -> List[str]:
    """``args`` without the long options ``names`` (and their values).

    Unique prefixes count, as getopt accepts them (``--conf F``).
    """
    out: List[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "--":
            return out + list(args[i:])
        if arg.startswith("--") and len(arg) > 2:
            name, eq, _ = arg[2:].partition("=")
            if len(name) >= 3 and any(n.startswith(name) for n in names):
                skip = not eq
                continue
        out.append(arg)
    return out


class _EndOptions(ExampleOptions):
    """Options shared by ``server`` and ``client``."""

    role = ""
    optFlags = [
        ["plaintext", None, "Run without encryption (no -k). Only for "
         "testing on a trusted network: nothing is authenticated."],
        ["systemd-sockets", None, "Listen on the sockets systemd passes "
         "(socket activation): one ListenStream= per -p, in order."],
    ]
    optParameters = [
        ["key", "k", None, "PSK key file (tigertunnel keygen)."],
        ["cluster", "c", None, "TigerBeetle cluster id (decimal u128); must "
         "match on both ends."],
        ["max-sessions", "m", str(DEFAULT_MAX_SESSIONS),
         "Maximum concurrent sessions per proxy pair."],
        ["log-level", None, "info", "err, warn, info or debug."],
        ["handshake-timeout", None, str(DEFAULT_HANDSHAKE_TIMEOUT),
         "Seconds allowed for a pool connection's handshake."],
        ["metrics", None, None, "Serve /metrics (Prometheus) and /status "
         "(JSON) over HTTP on this endpoint, e.g. tcp:9101:interface=127.0.0.1."],
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
        self.given: Set[str] = set()

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Parse, with ``--config FILE`` expanded in front of the arguments."""
        args = list(sys.argv[1:] if options is None else options)
        #: The arguments as given, and where (workers are started with the
        #: same ones, in the same directory).
        self.raw_args = list(args)
        self.cwd = os.getcwd()
        try:
            found, _ = getopt.getopt(args, self.shortOpt, self.longOpt)
        except getopt.error:
            found = []  # the real parse reports it
        values = {}
        for opt, value in found:
            name = opt.lstrip("-")
            name = self.synonyms.get(name, self.synonyms.get(
                name.replace("-", "_"), name))
            self.given.add(name)
            values[name] = value
        path = values.get("config")
        if path is not None and "help" not in self.given:
            from_file = self.config_file_args(path, values.get("replica"))
            args = from_file + args
            # Workers get the file's values as read now, not the file
            # (a restarted worker must run what worker 0 runs).
            self.raw_args = from_file + without_options(
                self.raw_args, ("config", "replica"))
        super().parseOptions(args)

    def config_file_args(self, path: str, replica: Optional[str]) -> List[str]:
        """The arguments ``--config`` stands for, each value checked first.

        :raises usage.UsageError: ``FILE: [section] key: reason``.
        """
        if "proxy" in self.given:
            raise usage.UsageError("-p and --config exclude each other (put "
                                   "the proxy pairs in the config file)")
        number: Optional[int] = None
        if replica is not None:
            if not replica.isdigit():
                raise usage.UsageError(f"invalid --replica: {replica!r} "
                                       f"(expected a replica number)")
            number = int(replica)
        try:
            cluster = configfile.load(path)
            args = cluster.argv(self.role, number)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        for key, value, where in cluster.options:
            if self.role in configfile.option_roles(key):
                check_option(self.role, key, value, f"{path}: {where}")
        return args

    def opt_proxy(self, value: str) -> None:
        """LISTEN,TARGET proxy pair (repeat for several replicas)."""
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
        for pair in self["proxies"]:
            try:
                listen_description(pair.listen)  # resolves a listen host name
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        cfg = TunnelConfig(role=self.role, pairs=list(self["proxies"]))
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
                cfg.psk = load_psk_file(key)
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
            from tigertunnel.ops.workers import inherited_listen_fds

            if cfg.workers < 2:
                raise usage.UsageError("--worker-index needs --workers 2 or more")
            _positive_int("worker-index", index, cfg.workers - 1)
            # A worker serves on worker 0's sockets; metrics are worker 0's.
            self.operations.metrics = None
            try:
                cfg.inherited_fds = inherited_listen_fds(cfg.pairs)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None

    def check_operations(self, cfg: TunnelConfig) -> Operations:
        """Check --metrics, --shutdown-timeout and --systemd-sockets."""
        ops = Operations(metrics=self["metrics"])
        if ops.metrics is not None:
            from twisted.internet.endpoints import serverFromString

            try:
                serverFromString(None, ops.metrics)
            except (ValueError, KeyError, IndexError, TypeError,
                    AttributeError) as e:
                raise usage.UsageError(f"invalid --metrics endpoint "
                                       f"{ops.metrics!r}: {e or type(e).__name__}"
                                       f" (example: tcp:9101:interface="
                                       f"127.0.0.1)") from None
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
    ]

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
        cfg.kem_secret = load_kem_secret_file(path)
        cfg.kem_path = path


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

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a mode: server or client")


_PROBE_PAIR = "127.0.0.1:1,127.0.0.1:2"


def check_option(role: str, key: str, value: str, where: str) -> None:
    """Check one config-file option with the code the flag goes through.

    :raises usage.UsageError: ``<where>: <reason>``.
    """
    try:
        if key == "key":
            load_psk_file(value)
        elif key == "kemsecret":
            load_kem_secret_file(value)
        elif key == "kempublic":
            load_kem_public_file(value)
        elif configfile.option_kind(key) == "value":
            probe = ServerOptions() if role == "server" else ClientOptions()
            usage.Options.parseOptions(probe, ["--plaintext", "-p", _PROBE_PAIR,
                                               f"--{key}={value}"])
    except (KeyFileError, usage.UsageError) as e:
        raise usage.UsageError(f"{where}: {e}") from None


def makeService(options: Options, reactor: Any = None) -> IService:
    """Build the tunnel service from parsed :class:`Options`.

    The multiplexers are the children of a
    :class:`~tigertunnel.ops.shutdown.TunnelService` (graceful shutdown), with
    key reload on SIGHUP, the optional metrics listener and, under systemd,
    the notifications as its operations services.
    """
    from tigertunnel.logs import limit_accept_errors
    from tigertunnel.ops.memory import memory_trimmer, tune_malloc
    from tigertunnel.ops.metrics import MetricsService
    from tigertunnel.ops.reload import KeyReloader, ReloadService
    from tigertunnel.net.multiplexer import build_service
    from tigertunnel.ops.shutdown import TunnelService
    from tigertunnel.ops.systemd import Notifier, SystemdService, watchdog_interval

    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = _reactor
    sub = options.subOptions
    config: TunnelConfig = sub.config
    ops: Operations = sub.operations
    logs.set_level(sub["log-level"])
    top = TunnelService(reactor, ops.shutdown_timeout, handle_sigterm=True)
    build_service(config, reactor, top=top)
    # Process-wide, once: malloc settings for 1 MiB frames, a periodic heap
    # trim, and one rate-limited line for accept errors.
    tune_malloc()
    limit_accept_errors()
    top.add_operation(memory_trimmer(reactor))
    reloader = KeyReloader(top.multiplexers, reactor)
    listeners = []
    notifier = Notifier.from_environment()
    watchdog = watchdog_interval()
    if notifier.enabled:
        systemd = SystemdService(notifier, reactor, watchdog)
        listeners.append(systemd)
    if config.workers > 1 and sub["worker-index"] is None:
        from tigertunnel.ops.workers import WorkerSupervisor, worker_command

        muxes = top.multiplexers
        supervisor = WorkerSupervisor(
            reactor, worker_command([sub.role] + sub.raw_args), config.workers,
            lambda: [mux.listener.port.fileno() for mux in muxes], sub.cwd,
            ops.shutdown_timeout)
        listeners.append(supervisor)  # SIGHUP goes to the workers too
        top.add_operation(supervisor, stop_last=True)
    top.add_operation(ReloadService(reloader, reactor, listeners))
    if ops.metrics is not None:
        top.add_operation(MetricsService(ops.metrics, top.multiplexers,
                                         reloader, reactor), stop_last=True)
    if notifier.enabled:
        top.add_operation(systemd)
    return top


def end_options(argv: List[str]) -> Options:
    """Parse ``server ...`` / ``client ...`` arguments (console script)."""
    opts = Options()
    opts.parseOptions(argv)
    return opts
