"""The ``tigertunnel`` console script.

* ``tigertunnel keygen -o FILE [--force]`` — new PSK key file (0600).
* ``tigertunnel kemgen -o PREFIX [--force]`` — new X-Wing key pair
  (``PREFIX.pub``, ``PREFIX.key`` 0600).
* ``tigertunnel server|client ...`` — run a tunnel end in the foreground,
  with the same options as ``twistd tigertunnel server|client``.
* ``tigertunnel demo`` — a loopback demonstration (see :mod:`tigertunnel.demo`).

Errors print one line ``tigertunnel: error: ...`` and exit with status 1
(2 for a usage error).
"""

import sys
from typing import List, Optional

from twisted.python import usage

from tigertunnel.errors import KeyFileError

USAGE = """usage: tigertunnel COMMAND [options]

commands:
  keygen -o FILE [--force]      write a new PSK key file (mode 0600)
  kemgen -o PREFIX [--force]    write PREFIX.pub and PREFIX.key (X-Wing)
  server [options]              run a tunnel server in the foreground
  client [options]              run a tunnel client in the foreground
  demo [--sessions N]           loopback demo with the built-in echo backend
  bench [--sizes ...] [--json F] benchmark: tunnel vs direct, CPU per round trip

'tigertunnel server --help' and 'tigertunnel client --help' list options.
The same server/client run under twistd:
  twistd -n tigertunnel server -p :3000,127.0.0.1:3001 -k secret.key
  twistd --pidfile tt.pid tigertunnel client -p :4000,HOST:3000 -k secret.key
"""


class _GenOptions(usage.Options):
    optFlags = [["force", None, "Replace existing files."]]
    optParameters = [["output", "o", None, "Output path."]]

    def postOptions(self) -> None:
        if not self["output"]:
            raise usage.UsageError("output path (-o) is required")


def _fail(message: str, status: int = 1) -> int:
    sys.stderr.write(f"tigertunnel: error: {message}\n")
    return status


def _keygen(argv: List[str], kem: bool) -> int:
    from tigertunnel.crypto.keys import kemgen, keygen

    opts = _GenOptions()
    try:
        opts.parseOptions(argv)
    except usage.UsageError as e:
        return _fail(str(e), 2)
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
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    service = tap.makeService(options)
    try:
        service.privilegedStartService()
        service.startService()
    except Exception as e:
        return _fail(f"cannot start: {e}")
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()  # type: ignore[attr-defined]
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
    if command == "demo":
        from tigertunnel.demo import main as demo_main
        return demo_main(rest)
    if command == "bench":
        from tigertunnel.bench import main as bench_main
        return bench_main(rest)
    return _fail(f"unknown command: {command!r} (see tigertunnel --help)", 2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
