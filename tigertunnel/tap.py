"""twistd plugin options and service maker for ``twistd tigertunnel``.

``twistd [-n] [--pidfile F] tigertunnel server -p :3000,127.0.0.1:3001 -k K``
``twistd [-n] [--pidfile F] tigertunnel client -p 127.0.0.1:4000,HOST:3000 -k K``
``twistd [-n] [--pidfile F] tigertunnel client --config cluster.ini``

Parse, then plan, then build. The options only parse and check values
(:data:`tigertunnel.ops.validators.VALIDATORS`, the table the cluster
config file uses too; a key file is checked by reading it) into frozen
settings. ``makeService`` makes the start-up plan
(:func:`tigertunnel.ops.plan.make_plan`: host names resolved, inherited
sockets adopted), assembles it (:func:`tigertunnel.ops.assemble.assemble`)
and, under twistd, binds the ports before twistd daemonizes
(:mod:`tigertunnel.ops.startup`). Any bad value or unusable port stops
start-up with one line naming it (``tigertunnel: error: ...`` on stderr,
under twistd as from the console script) and a non-zero exit status.

Under twistd the process is hardened (not dumpable, no core files:
:mod:`tigertunnel.ops.hardening`) as soon as twistd hands the arguments to
:class:`Options`, before any key file is read; the console script does the
same in :func:`tigertunnel.cli.main`.
"""

import os
import sys
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Optional, Sequence, cast

from twisted.application import app
from twisted.application.service import IService
from twisted.python import usage

from tigertunnel import logs
from tigertunnel.config import clusterfile
from tigertunnel.config.model import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_POOL_SIZE,
    DEFAULT_SHUTDOWN_TIMEOUT,
    MAX_PROXY_PAIRS,
    Role,
    TunnelConfig,
    label_pairs,
    parse_proxy,
)
from tigertunnel.keys.files import trusted_owners
from tigertunnel.ops.plan import Operations
from tigertunnel.ops.validators import (
    VALIDATORS,
    check_metrics_exposure,
    check_value,
    metrics_tls,
    require_native_kem,
    whole_number,
)
from tigertunnel.tools.options import ExampleOptions
from tigertunnel.errors import ConfigError, KeyFileError

if TYPE_CHECKING:
    from tigertunnel.ops.shutdown import ProcessReactor
    from tigertunnel.ops.tls import ServerTLS


class _EndOptions(ExampleOptions):
    """Options shared by ``server`` and ``client``."""

    role = ""
    hidden = ("worker-index",)
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
        #: The settings, once parsed (frozen).
        self.config: Optional[TunnelConfig] = None
        self.operations = Operations()
        #: Canonical names of the options given on the command line.
        self.given: FrozenSet[str] = frozenset()

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
        """Check one config-file value with the validator of its flag
        (:data:`~tigertunnel.ops.validators.VALIDATORS`; a flag's ``yes`` or
        ``no`` is checked by the file's reader).

        :raises usage.UsageError: naming the problem.
        """
        if key in VALIDATORS:
            check_value(key, value, self.key_owners())

    def value(self, name: str) -> Any:
        """The parsed value of option ``name`` (``None``: not given).

        :raises usage.UsageError: the value is refused (a key file: the
            message says ``cannot use key file:``).
        """
        text = self[name]
        if text is None:
            return None
        try:
            return VALIDATORS[name](text, self.key_owners())
        except KeyFileError as e:
            raise usage.UsageError(f"cannot use key file: {e}") from None

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
        self.value("log-level")
        self.value("log-format")
        try:
            label_pairs(self["proxies"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        settings: Dict[str, Any] = {
            "max_sessions": self.value("max-sessions"),
            "handshake_timeout": self.value("handshake-timeout"),
            "cluster_id": self.value("cluster"),
        }
        key = self["key"]
        if key is None and not self["plaintext"]:
            raise usage.UsageError("no key file: give -k KEYFILE (see "
                                   "'tigertunnel keygen'), or --plaintext to "
                                   "run unencrypted on purpose")
        if key is not None and self["plaintext"]:
            raise usage.UsageError("-k and --plaintext exclude each other")
        settings.update(psk=self.value("key"), key_path=key)
        settings.update(self.role_settings(encrypted=key is not None))
        self.operations = self.check_operations()
        settings["workers"] = self.check_workers()
        self.config = TunnelConfig(role=Role.parse(self.role),
                                   pairs=list(self["proxies"]), **settings)

    def check_workers(self) -> int:
        """Check --workers and --worker-index; the number of processes."""
        workers = int(self.value("workers"))
        index = self["worker-index"]
        if index is not None:
            if workers < 2:
                raise usage.UsageError("--worker-index needs --workers 2 or more")
            whole_number("worker-index", index, workers - 1)
        return workers

    def check_operations(self) -> Operations:
        """Check --metrics (and its TLS files) and --shutdown-timeout."""
        metrics = self.value("metrics")
        tls: "Optional[ServerTLS]" = None
        if metrics is not None:
            tls = metrics_tls(self["metrics-tls-cert"], self["metrics-tls-key"],
                              self["metrics-tls-client-ca"], self.key_owners())
            check_metrics_exposure(metrics, tls, bool(self["metrics-public"]))
        else:
            for name in _TLS_FILE_OPTIONS:
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} needs --metrics")
        worker = self["worker-index"] is not None
        # A worker serves on worker 0's sockets; metrics are worker 0's.
        return Operations(
            metrics=metrics.description if metrics is not None and not worker else None,
            shutdown_timeout=self.value("shutdown-timeout"),
            systemd_sockets=bool(self["systemd-sockets"]) and not worker,
            metrics_tls=tls)

    def role_settings(self, encrypted: bool) -> Dict[str, Any]:
        """The settings of this role's own options (its KEM key file)."""
        return {}


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
        self.operations = replace(self.operations, replay_file=self.value("replay-file"))

    def role_settings(self, encrypted: bool) -> Dict[str, Any]:
        require_kem = bool(self["require-kem"])
        path = self["kemsecret"]
        if path is None:
            if require_kem:
                raise usage.UsageError("--require-kem needs --kemsecret")
            return {"require_kem": require_kem}
        if not encrypted:
            raise usage.UsageError("--kemsecret requires -k (KEM mode "
                                   "requires encryption)")
        kem_secret = self.value("kemsecret")
        require_native_kem("--kemsecret")
        return {"require_kem": require_kem, "kem_secret": kem_secret, "kem_path": path}


class ClientOptions(_EndOptions):
    """``tigertunnel client``: accept TB clients, tunnel to a server."""

    role = "client"
    synopsis = "[options] -p LISTEN,SERVER -k KEYFILE | --config FILE [--replica N]"
    longdesc = """Accept TigerBeetle connections (TB clients, or a replica talking
to its peers) and carry them over a pool of encrypted connections to the
tunnel server of each proxy pair. SIGHUP reloads the key files; SIGTERM
drains and exits."""
    examples = """Examples:
  twistd --pidfile tt.pid tigertunnel client -p 127.0.0.1:4000,tunnel.example.org:3000 -k secret.key
  twistd -n tigertunnel client -k secret.key --kempublic server-kem.pub \\
      -p 127.0.0.1:4000,r0.example:3000 -p 127.0.0.1:4001,r1.example:3000 -p 127.0.0.1:4002,r2.example:3000
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

    def role_settings(self, encrypted: bool) -> Dict[str, Any]:
        settings: Dict[str, Any] = {"pool_size": self.value("num-conns")}
        path = self["kempublic"]
        if path is None:
            return settings
        if not encrypted:
            raise usage.UsageError("--kempublic requires -k (KEM mode "
                                   "requires encryption)")
        settings.update(kem_public=self.value("kempublic"), kem_path=path)
        require_native_kem("--kempublic")
        return settings


class Options(ExampleOptions):
    """tigertunnel: an encrypted tunnel for TigerBeetle traffic."""

    synopsis = "server|client [options]"
    examples = """Examples:
  twistd -n tigertunnel server -p :3000,127.0.0.1:3001 -k secret.key
  twistd --pidfile tt.pid tigertunnel client -p 127.0.0.1:4000,HOST:3000 -k secret.key
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
        while the sub-options are parsed), and make a usage error one line
        on stderr and exit status 1 (:func:`tigertunnel.ops.startup.fail`)."""
        if _twistd_options(self.parent) is None:
            super().parseOptions(options)
            return
        from tigertunnel.ops.hardening import harden_once
        from tigertunnel.ops.startup import fail
        harden_once()
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            # twistd would print every option of the mode before the message.
            fail(str(e))

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
    """Build the tunnel service from parsed :class:`Options`: make the
    start-up plan (:func:`~tigertunnel.ops.plan.make_plan`), then assemble
    it (:func:`~tigertunnel.ops.assemble.assemble`).

    Under twistd a plan that cannot be made, or a port that cannot be
    bound (the ports are bound here), exits with one line; a client names
    its TB-side listeners reachable beyond loopback in one warning.

    :param reactor: the global reactor by default; tests pass a
        ``MemoryReactorClock``.
    :raises usage.UsageError: (not under twistd) the plan cannot be made.
    """
    from tigertunnel.ops.assemble import assemble
    from tigertunnel.ops.plan import make_plan
    from tigertunnel.ops.startup import (
        bind_before_daemonizing,
        fail,
        probe_replay_file,
        warn_reachable_tb_listeners,
    )

    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = cast("ProcessReactor", _reactor)
    sub = options.subOptions
    twistd = _twistd_options(options)
    index = sub["worker-index"]
    try:
        plan = make_plan(sub.config, sub.operations, sub["log-level"],
                         None if index is None else int(index), sub.raw_args, sub.cwd,
                         twistd.get("pidfile") if twistd is not None else None)
    except ConfigError as e:
        if twistd is not None:
            fail(str(e))
        raise usage.UsageError(str(e)) from None
    top = assemble(plan, reactor)
    if plan.is_worker:
        return top
    warn_reachable_tb_listeners(plan.config)
    if twistd is not None:
        # Ports bound (and an existing replay file tried, where twistd keeps
        # user, root and directory) before twistd daemonizes: an error is
        # one line.
        bind_before_daemonizing(top)
        if (plan.replay_path and twistd.get("uid") is None
                and twistd.get("chroot") is None and twistd.get("rundir", ".") == "."):
            probe_replay_file(plan.replay_path)
    return top
