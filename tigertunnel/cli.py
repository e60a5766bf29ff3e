"""The ``tigertunnel`` console script.

* ``tigertunnel keygen -o FILE [--force]`` — new PSK key file (0600).
* ``tigertunnel kemgen -o PREFIX [--force]`` — new X-Wing key pair
  (``PREFIX.pub``, ``PREFIX.key`` 0600).
* ``tigertunnel server|client ...`` — run a tunnel end in the foreground,
  with the same options as ``twistd tigertunnel server|client``.
* ``tigertunnel check-config server|client ...`` — validate the options,
  the config file and the key files of a run without starting anything;
  ``tigertunnel check-config --config FILE`` checks every tunnel end a
  cluster config file describes.
* ``tigertunnel demo`` — a loopback demonstration (see :mod:`tigertunnel.tools.demo`).
* ``tigertunnel bench`` — the benchmark (see :mod:`tigertunnel.tools.bench`).
* ``tigertunnel status [URL]`` — a running tunnel end's /status in a terminal
  (see :mod:`tigertunnel.tools.status`).
* ``tigertunnel echo PORT`` — a TB-frame echo backend on 127.0.0.1 (see
  :mod:`tigertunnel.tools.echo`).
* ``tigertunnel --version`` (and ``--version`` after any command) — the
  version, the data path and the ML-KEM backend
  (:func:`tigertunnel.tools.options.version_line`).

The commands are the ``subCommands`` of :class:`Options` (which extends the
twistd plugin's options, so ``server`` and ``client`` parse exactly as under
twistd); :data:`COMMANDS` says how each one runs once parsed. Errors print
one line ``tigertunnel: error: ...`` and exit with status 1 (2 for a usage
error; check-config exits 1 for any invalid configuration). A reader that
stops reading the output (``| head -1``) ends a command quietly, with
status 141 as if SIGPIPE had ended it.
"""

import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from twisted.python import usage

from tigertunnel import tap
from tigertunnel.errors import ConfigError, KeyFileError
from tigertunnel.tools.options import ExampleOptions


class _GenOptions(ExampleOptions):
    optFlags = [["force", None, "Replace existing files."]]
    optParameters = [["output", "o", None, "Output path."]]

    def postOptions(self) -> None:
        if not self["output"]:
            raise usage.UsageError("output path (-o) is required")


class KeygenOptions(_GenOptions):
    """``tigertunnel keygen``."""

    synopsis = "-o FILE [--force]"
    longdesc = "Write a new PSK key file (one <key_id>:<64 hex> line, mode 0600)."
    examples = """Examples:
  tigertunnel keygen -o secret.key
  tigertunnel keygen -o new.key    # then see "Key rotation" in docs/operations.rst"""


class KemgenOptions(_GenOptions):
    """``tigertunnel kemgen``."""

    synopsis = "-o PREFIX [--force]"
    longdesc = """Write a new X-Wing key pair: PREFIX.key (servers, mode 0600) and
PREFIX.pub (clients)."""
    examples = """Example:
  tigertunnel kemgen -o server-kem   # server-kem.key, server-kem.pub"""


class _CommandOptions(ExampleOptions):
    """Options with subcommands whose help shows ``... COMMAND SUBCOMMAND``."""

    def getSynopsis(self) -> str:
        if self.subCommand is None:
            return super().getSynopsis()
        # A subcommand's help is showing: the path to it is enough here.
        if self.parent is None:
            return "Usage: tigertunnel"
        return f"{self.parent.getSynopsis()} {self.parent.subCommand}"


class CheckOptions(_CommandOptions):
    """``tigertunnel check-config``."""

    synopsis = "server|client [options] | --config FILE"
    longdesc = """Validate a run's options, config file and key files exactly as
start-up would, without listening or connecting; print what would run.
With only --config FILE, check every tunnel end the cluster file describes
(the server of each replica, the TB clients' client, each replica's client).
Exit status 0 when valid, 1 otherwise (one line naming the problem)."""
    examples = """Examples:
  tigertunnel check-config server -p :3000,127.0.0.1:3001 -k secret.key
  tigertunnel check-config client --config cluster.ini --replica 2
  tigertunnel check-config --config cluster.ini"""
    optParameters = [["config", None, None, "Cluster config file to check whole."]]
    subCommands = tap.Options.subCommands

    def postOptions(self) -> None:
        if self.subCommand is None and not self["config"]:
            raise usage.UsageError("give server|client [options], or --config FILE")


def _demo_options() -> usage.Options:
    from tigertunnel.tools.demo import DemoOptions
    return DemoOptions()


def _bench_options() -> usage.Options:
    from tigertunnel.tools.bench import BenchOptions
    return BenchOptions()


class StatusOptions(ExampleOptions):
    """Options of ``tigertunnel status`` (checked by :mod:`tigertunnel.tools.status`)."""

    synopsis = "[options] [URL | HOST:PORT]"
    longdesc = ("Show a running tunnel end's /status (its --metrics listener): pairs, "
                "pool connections, sessions, TB request p50/p99 per operation. "
                "Exit status 0 when healthy, 1 when not or unreachable, 2 for a bad option.")
    examples = """Examples:
  tigertunnel status
  tigertunnel status 10.0.0.5:9101
  tigertunnel status http://10.0.0.5:9101/status
  tigertunnel status --json | jq '.pairs[].pool'"""
    optFlags = [["json", None, "Print the /status JSON as received."]]
    optParameters = [["timeout", "t", "5", "Seconds to wait for the answer."],
                     ["ca", None, None, "https: PEM CA certificates the endpoint's "
                      "certificate must chain to (default: the system's)."],
                     ["cert", None, None, "https: a PEM client certificate to show."],
                     ["key", None, None, "https: the PEM private key of --cert."]]

    def parseArgs(self, url: Optional[str] = None) -> None:
        self["url"] = url

    def argv(self) -> List[str]:
        """The arguments for :func:`tigertunnel.tools.status.main`."""
        tls = [f"--{name}={self[name]}" for name in ("ca", "cert", "key")
               if self[name] is not None]
        return ([self["url"]] if self["url"] else []) + (
            ["--json"] if self["json"] else []) + ["--timeout", self["timeout"]] + tls


class EchoOptions(ExampleOptions):
    """Options of ``tigertunnel echo``."""

    synopsis = "PORT"
    longdesc = ("Run a TB-frame echo backend on 127.0.0.1:PORT (a stand-in for a "
                "replica: every complete TB frame goes straight back). Exits 1 with "
                "one line when the port cannot be bound; SIGTERM or Ctrl-C stops it.")
    examples = """Example (a tunnel server in front of it):
  tigertunnel echo 3001 &
  tigertunnel server -p :3000,127.0.0.1:3001 -k secret.key"""
    optFlags = [["hang-up", None, "Close a connection at a frame whose command is 0 "
                 "(reserved; TigerBeetle never sends it) instead of echoing it."]]

    def parseArgs(self, port: Optional[str] = None) -> None:
        if port is None:
            raise usage.UsageError("give the PORT to listen on (127.0.0.1:PORT)")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise usage.UsageError(f"invalid port: {port!r} (1 to 65535)")
        self["port"] = int(port)


class Options(tap.Options, _CommandOptions):
    """tigertunnel: an encrypted tunnel for TigerBeetle traffic."""

    synopsis = "Usage: tigertunnel COMMAND [options]"
    examples = """'tigertunnel COMMAND --help' lists the options of a command, with examples.
The same server/client run under twistd:
  twistd -n tigertunnel server -p :3000,127.0.0.1:3001 -k secret.key
  twistd --pidfile tt.pid tigertunnel client -p 127.0.0.1:4000,HOST:3000 -k secret.key
  twistd -n tigertunnel client --config cluster.ini
"""
    subCommands = [
        ["keygen", None, KeygenOptions, "Write a new PSK key file (mode 0600)."],
        ["kemgen", None, KemgenOptions, "Write PREFIX.pub and PREFIX.key (X-Wing)."],
        ["server", None, tap.ServerOptions, "Run a tunnel server in the foreground."],
        ["client", None, tap.ClientOptions, "Run a tunnel client in the foreground."],
        ["check-config", None, CheckOptions, "Validate options, config file and key "
         "files (of one run, or of every tunnel end of a cluster file)."],
        ["demo", None, _demo_options, "Loopback demo with the built-in echo backend."],
        ["bench", None, _bench_options, "Benchmark: tunnel vs direct, CPU per round trip."],
        ["status", None, StatusOptions, "Show a running tunnel end's health and "
         "figures (its /status); exit 0 when healthy."],
        ["echo", None, EchoOptions, "Run a TB-frame echo backend on 127.0.0.1 "
         "(a stand-in replica for trying the tunnel)."],
    ]

    opt_h = usage.Options.opt_help

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a command")


def _fail(message: str, status: int = 1) -> int:
    sys.stderr.write(f"tigertunnel: error: {message}\n")
    return status


def _keygen(options: Options) -> int:
    from tigertunnel.keys.generate import kemgen, keygen

    opts = options.subOptions
    path = opts["output"]
    force = bool(opts["force"])
    try:
        if options.subCommand == "kemgen":
            key_id = kemgen(path, force=force)
            sys.stderr.write(f"Generated KEM keypair {key_id} -> {path}.pub, "
                             f"{path}.key\n")
        else:
            key_id = keygen(path, force=force)
            sys.stderr.write(f"Generated key {key_id} -> {path}\n")
    except KeyFileError as e:
        return _fail(str(e))
    return 0


def install_reactor() -> None:
    """Install the lean epoll reactor (:mod:`tigertunnel.net.reactor`) where
    epoll exists, unless something installed a reactor already."""
    if "twisted.internet.reactor" in sys.modules:
        return
    try:
        import select
        select.epoll
    except AttributeError:
        return  # not Linux: Twisted's default reactor
    from tigertunnel.net.reactor import install

    install()


def _run_end(options: Options) -> int:
    install_reactor()
    from twisted.internet import reactor
    from twisted.logger import ILogObserver, globalLogBeginner

    from tigertunnel.logs import logger, output_observer

    worker = options.subOptions["worker-index"] is not None
    observer: ILogObserver
    if worker:
        # A worker process of --workers: its supervisor relays the log.
        from tigertunnel.ops.workers import die_with_supervisor, worker_log_observer

        try:
            if not die_with_supervisor():
                return _fail("worker: the supervisor process is gone")
        except OSError as e:
            return _fail(f"worker: {e}")
        observer = worker_log_observer()
    else:
        observer = output_observer(sys.stderr, options.subOptions["log-format"])
    try:
        service = tap.makeService(options)
    except usage.UsageError as e:  # the start-up plan: one line
        return _fail(str(e))
    try:
        service.privilegedStartService()
        service.startService()
    except Exception as e:  # a start-up failure is one line, not a traceback
        return _fail(f"cannot start: {e}")
    # Twisted keeps the events of the start-up until now: a failed start
    # shows only its error line, not the ports that did open before it.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    # The line twistd writes at start-up, so both ways of running say it
    # (once started: a start-up error stays the only line).
    logger(__name__).info(
        "reactor class: {name}", name=f"{type(reactor).__module__}.{type(reactor).__qualname__}")
    if worker:
        from tigertunnel.ops.workers import announce_ready
        announce_ready()
    reactor.run()
    return 0


def describe_run(options: usage.Options) -> List[str]:
    """What a parsed ``server``/``client`` run would do, one line per item.

    :param options: options whose ``subOptions`` are a parsed tunnel end.
    """
    from tigertunnel.ops.reload import describe

    sub = options.subOptions
    cfg = sub.config
    lines = [f"{cfg.role}: {len(cfg.pairs)} proxy pairs; "
             f"{describe(cfg.keyring, cfg.role)}"]
    for pair in cfg.pairs:
        lines.append(f"  {pair.name}: {pair.listen} -> {pair.target} (pair={pair.label})")
    if sub.operations.metrics:
        lines.append(f"  metrics: {sub.operations.metrics}")
    if cfg.workers > 1:
        lines.append(f"  workers: {cfg.workers} processes on shared listening "
                     f"sockets")
    return lines


def _check_config(options: Options) -> int:
    from tigertunnel.config import clusterfile
    from tigertunnel.ops.plan import resolved_listen_descriptions

    check = options.subOptions
    if check.subCommand is not None:
        try:
            resolved_listen_descriptions(check.subOptions.config)  # as a run's plan does
        except ConfigError as e:
            return _fail(str(e))
        sys.stdout.write("ok\n")
        sys.stdout.write("".join(line + "\n" for line in describe_run(check)))
        return 0
    path = check["config"]
    try:
        count = len(clusterfile.load(path, tap.config_file_options()).replicas)
    except ConfigError as e:
        return _fail(str(e))
    runs = [["server", "--config", path, "--replica", str(n)] for n in range(count)]
    runs.append(["client", "--config", path])
    if count > 1:
        runs += [["client", "--config", path, "--replica", str(n)]
                 for n in range(count)]
    for run in runs:
        parsed = tap.Options()
        try:
            parsed.parseOptions(run)
            resolved_listen_descriptions(parsed.subOptions.config)
        except (usage.UsageError, ConfigError) as e:
            return _fail(str(e))
        sys.stdout.write(f"ok: {' '.join(run[1:])}\n")
        sys.stdout.write("".join(line + "\n" for line in describe_run(parsed)))
    return 0


def _demo(options: Options) -> int:
    from tigertunnel.tools.demo import run
    return run(options.subOptions)


def _bench(options: Options) -> int:
    from tigertunnel.tools.bench import run
    return run(options.subOptions)


def _echo(options: Options) -> int:
    from tigertunnel.tools.echo import serve
    install_reactor()
    return serve(options.subOptions["port"], bool(options.subOptions["hang-up"]))


def _status(options: Options) -> int:
    from tigertunnel.tools.status import main as status_main
    sub = options.subOptions
    assert isinstance(sub, StatusOptions)
    return status_main(sub.argv())


@dataclass(frozen=True)
class Command:
    """How a parsed command runs.

    :ivar run: runs it; returns the exit status.
    :ivar usage_status: the exit status of a usage error.
    :ivar usage_prefix: put before a usage error's message.
    """

    run: Callable[[Options], int]
    usage_status: int = 2
    usage_prefix: str = ""


#: Every subcommand of :class:`Options`.
COMMANDS: Dict[str, Command] = {
    "keygen": Command(_keygen),
    "kemgen": Command(_keygen),
    "server": Command(_run_end),
    "client": Command(_run_end),
    "check-config": Command(_check_config, usage_status=1),
    "demo": Command(_demo, usage_prefix="demo: "),
    "bench": Command(_bench, usage_prefix="bench: "),
    "status": Command(_status, usage_prefix="status: "),
    "echo": Command(_echo, usage_prefix="echo: "),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Run the console script; returns the exit status.

    Run on the process's own command line (``argv`` not given), it first
    hardens the process (not dumpable, no core files:
    :func:`~tigertunnel.ops.hardening.harden_once`), before the options are
    parsed, since parsing reads the key files. Tests that pass ``argv``
    leave their runner as it is.
    """
    if argv is None:
        from tigertunnel.ops.hardening import harden_once
        harden_once()
    args = sys.argv[1:] if argv is None else argv
    options = Options()
    if not args or args == ["help"]:
        sys.stdout.write(str(options))
        return 0
    try:
        try:
            options.parseOptions(args)
        except usage.UsageError as e:
            if options.subCommand is None:
                kind = "option" if args[0].startswith("-") else "command"
                return _fail(f"unknown {kind}: {args[0]!r} (see tigertunnel --help)", 2)
            command = COMMANDS[options.subCommand]
            return _fail(f"{command.usage_prefix}{e}", command.usage_status)
        except SystemExit as e:  # --help, --version
            sys.stdout.flush()
            return int(e.code or 0)
        assert options.subCommand is not None  # postOptions made sure
        status = COMMANDS[options.subCommand].run(options)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _quiet_broken_pipe() -> int:
    """Whoever read our output stopped reading (``| head``): exit quietly.

    Python would report the lost output at exit; stdout is pointed at
    ``/dev/null`` so that the final flush has nowhere to fail.

    :returns: 141, the status of a process ended by SIGPIPE.
    """
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # no real stdout (a test's StringIO): nothing is left to flush
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
