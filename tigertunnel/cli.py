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

Errors print one line ``tigertunnel: error: ...`` and exit with status 1
(2 for a usage error; check-config exits 1 for any invalid configuration).
"""

import sys
from typing import Any, List, Optional

from twisted.python import usage

from tigertunnel.errors import KeyFileError
from tigertunnel.tap import ExampleOptions

USAGE = """usage: tigertunnel COMMAND [options]

commands:
  keygen -o FILE [--force]      write a new PSK key file (mode 0600)
  kemgen -o PREFIX [--force]    write PREFIX.pub and PREFIX.key (X-Wing)
  server [options]              run a tunnel server in the foreground
  client [options]              run a tunnel client in the foreground
  check-config server|client [options]
                                validate options, config file and key files
  check-config --config FILE    validate every tunnel end of a cluster file
  demo [--sessions N]           loopback demo with the built-in echo backend
  bench [--sizes ...] [--json F] benchmark: tunnel vs direct, CPU per round trip

'tigertunnel COMMAND --help' lists the options of a command, with examples.
The same server/client run under twistd:
  twistd -n tigertunnel server -p :3000,127.0.0.1:3001 -k secret.key
  twistd --pidfile tt.pid tigertunnel client -p :4000,HOST:3000 -k secret.key
  twistd -n tigertunnel client --config cluster.ini
"""


class _GenOptions(ExampleOptions):
    optFlags = [["force", None, "Replace existing files."]]
    optParameters = [["output", "o", None, "Output path."]]

    def postOptions(self) -> None:
        if not self["output"]:
            raise usage.UsageError("output path (-o) is required")


class _KeygenOptions(_GenOptions):
    synopsis = "tigertunnel keygen -o FILE [--force]"
    longdesc = "Write a new PSK key file (one <key_id>:<64 hex> line, mode 0600)."
    examples = """Examples:
  tigertunnel keygen -o secret.key
  tigertunnel keygen -o new.key    # then see "Key rotation" in README.rst"""


class _KemgenOptions(_GenOptions):
    synopsis = "tigertunnel kemgen -o PREFIX [--force]"
    longdesc = """Write a new X-Wing key pair: PREFIX.key (servers, mode 0600) and
PREFIX.pub (clients)."""
    examples = """Example:
  tigertunnel kemgen -o server-kem   # server-kem.key, server-kem.pub"""


class _CheckOptions(ExampleOptions):
    synopsis = ("tigertunnel check-config server|client [options] | "
                "check-config --config FILE")
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


def _fail(message: str, status: int = 1) -> int:
    sys.stderr.write(f"tigertunnel: error: {message}\n")
    return status


def _keygen(argv: List[str], kem: bool) -> int:
    from tigertunnel.keys.generate import kemgen, keygen

    opts = _KemgenOptions() if kem else _KeygenOptions()
    try:
        opts.parseOptions(argv)
    except usage.UsageError as e:
        return _fail(str(e), 2)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    path = opts["output"]
    try:
        if kem:
            key_id = kemgen(path, force=bool(opts["force"]))
            sys.stderr.write(f"Generated KEM keypair {key_id} -> {path}.pub, "
                             f"{path}.key\n")
        else:
            key_id = keygen(path, force=bool(opts["force"]))
            sys.stderr.write(f"Generated key {key_id} -> {path}\n")
    except KeyFileError as e:
        return _fail(str(e))
    return 0


def _run_end(argv: List[str]) -> int:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from tigertunnel import tap

    try:
        options = tap.end_options(argv)
    except usage.UsageError as e:
        return _fail(str(e), 2)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    worker = options.subOptions["worker-index"] is not None
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
        observer = textFileLogObserver(sys.stderr)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = tap.makeService(options)
    try:
        service.privilegedStartService()
        service.startService()
    except Exception as e:
        return _fail(f"cannot start: {e}")
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if worker:
        from tigertunnel.ops.workers import announce_ready
        announce_ready()
    reactor.run()  # type: ignore[attr-defined]
    return 0


def describe_run(options: Any) -> List[str]:
    """What a parsed ``server``/``client`` run would do, one line per item."""
    from tigertunnel.ops.reload import KeySet, describe

    sub = options.subOptions
    cfg = sub.config
    keys = KeySet(cfg.psk, cfg.kem_public, cfg.kem_secret)
    lines = [f"{cfg.role}: {len(cfg.pairs)} proxy pairs; "
             f"{describe(keys, cfg.role)}"]
    for pair in cfg.pairs:
        lines.append(f"  {pair.name}: {pair.listen} -> {pair.target}")
    if sub.operations.metrics:
        lines.append(f"  metrics: {sub.operations.metrics}")
    if cfg.workers > 1:
        lines.append(f"  workers: {cfg.workers} processes on shared listening "
                     f"sockets")
    return lines


def _check_config(argv: List[str]) -> int:
    from tigertunnel import tap
    from tigertunnel.config import clusterfile as configfile
    from tigertunnel.errors import ConfigError

    if argv and argv[0] in ("server", "client"):
        runs = [argv]
    else:
        opts = _CheckOptions()
        try:
            opts.parseOptions(argv)
            if not opts["config"]:
                raise usage.UsageError("give server|client [options], or "
                                       "--config FILE")
            count = len(configfile.load(opts["config"], tap.config_file_options()).replicas)
        except (usage.UsageError, ConfigError) as e:
            return _fail(str(e))
        except SystemExit as e:  # --help
            return int(e.code or 0)
        path = opts["config"]
        runs = [["server", "--config", path, "--replica", str(n)]
                for n in range(count)]
        runs.append(["client", "--config", path])
        if count > 1:
            runs += [["client", "--config", path, "--replica", str(n)]
                     for n in range(count)]
    for run in runs:
        try:
            options = tap.end_options(run)
        except usage.UsageError as e:
            return _fail(str(e))
        except SystemExit as e:  # --help
            return int(e.code or 0)
        sys.stdout.write(f"ok: {' '.join(run[1:])}\n" if len(runs) > 1 else "ok\n")
        sys.stdout.write("".join(line + "\n" for line in describe_run(options)))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "keygen":
        return _keygen(rest, kem=False)
    if command == "kemgen":
        return _keygen(rest, kem=True)
    if command in ("server", "client"):
        return _run_end(args)
    if command == "check-config":
        return _check_config(rest)
    if command in ("demo", "bench"):
        from tigertunnel.tools import bench, demo
        tool: Any = demo if command == "demo" else bench
        opts = demo.DemoOptions() if command == "demo" else bench.BenchOptions()
        try:
            opts.parseOptions(rest)
        except usage.UsageError as e:
            return _fail(f"{command}: {e}", 2)
        return int(tool.run(opts))
    return _fail(f"unknown command: {command!r} (see tigertunnel --help)", 2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
