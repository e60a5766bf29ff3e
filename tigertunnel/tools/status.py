"""``tigertunnel status [URL]``: a terminal view of a running tunnel end's ``/status``.

Fetches the ``/status`` JSON of a tunnel end started with ``--metrics``
(default ``http://127.0.0.1:9101/status``; a URL without a path gets
``/status``, ``HOST:PORT`` means ``http://HOST:PORT/status``) and prints its
proxy pairs, their pool connections (key id, state, sessions), sessions, a
tunnel server's backend reachability, and, where the tunnel end reports them, the
TigerBeetle request latencies (p50/p99 per operation), evictions, cluster
mismatches and view. ``--json`` prints the document as received instead.

An ``https://`` URL (``--metrics`` with ``--metrics-tls-cert``) is fetched
by :mod:`tigertunnel.tools.https`, which checks the endpoint's certificate
against ``--ca FILE`` and its host name, and shows ``--cert FILE --key
FILE`` to an endpoint that requires a client certificate.

Exit status: 0 when the tunnel end is healthy (HTTP 200), 1 when it is not
(503: a client pair has no pool connection, a server's replica is
unreachable, or it is shutting down) or
cannot be read (one line naming the URL), 2 for a bad option or URL.
"""

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, NoReturn, Optional, TextIO, Tuple

from tigertunnel.errors import ConfigError

if TYPE_CHECKING:
    from tigertunnel.tools.https import ClientFiles

DEFAULT_URL = "http://127.0.0.1:9101/status"


class UsageError(Exception):
    """A bad option or URL (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_args(argv: List[str]) -> argparse.Namespace:
    """Parse and check the options of ``tigertunnel status``.

    :raises UsageError: naming the bad option or URL.
    """
    parser = _Parser(
        prog="tigertunnel status",
        description="Show a running tunnel end's /status (its --metrics listener).\n"
                    "Exit status 0 when healthy, 1 when not or unreachable, "
                    "2 for a bad option.",
        epilog="""Examples:
  tigertunnel status
  tigertunnel status 10.0.0.5:9101
  tigertunnel status http://10.0.0.5:9101/status
  tigertunnel status --json | jq '.pairs[].pool'
  tigertunnel status https://tunnel0.example:9101 --ca metrics-ca.pem \\
      --cert scraper.pem --key scraper.key""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default=DEFAULT_URL,
                        help=f"the /status URL, or HOST:PORT (default {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true",
                        help="print the /status JSON as received")
    parser.add_argument("-t", "--timeout", default="5",
                        help="seconds to wait for the answer (default 5)")
    parser.add_argument("--ca", metavar="FILE",
                        help="https: the PEM CA certificates the endpoint's "
                             "certificate must chain to (default: the system's)")
    parser.add_argument("--cert", metavar="FILE",
                        help="https: a PEM client certificate to show (with --key)")
    parser.add_argument("--key", metavar="FILE",
                        help="https: the PEM private key of --cert (mode 0600)")
    args = parser.parse_args(argv)
    raw = args.timeout
    try:
        args.timeout = float(raw)
    except ValueError:
        args.timeout = -1.0
    if not 0 < args.timeout <= 300:
        raise UsageError(f"--timeout must be a number of seconds in (0, 300], "
                         f"not {raw!r}")
    args.url = status_url(args.url)
    check_tls_arguments(args)
    return args


def check_tls_arguments(args: argparse.Namespace) -> None:
    """--ca, --cert and --key go with an https:// URL; --cert with --key.

    :raises UsageError: naming the misplaced option.
    """
    https = urllib.parse.urlsplit(args.url).scheme == "https"
    for name in ("ca", "cert", "key"):
        if getattr(args, name) is not None and not https:
            raise UsageError(f"--{name} is for an https:// URL, not {args.url!r}")
    if (args.cert is None) != (args.key is None):
        given, missing = ("cert", "key") if args.key is None else ("key", "cert")
        raise UsageError(f"--{given} needs --{missing}")


def status_url(url: str) -> str:
    """The ``/status`` URL of ``url``: an http(s) URL (``/status`` added when
    it has no path), or ``HOST:PORT`` / ``[IPv6]:PORT`` (``http://HOST:PORT/status``).

    :raises UsageError: naming ``url`` if it is neither.
    """
    if "://" not in url:
        host, colon, port = url.rpartition(":")
        if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UsageError(f"not an http:// URL or HOST:PORT: {url!r}")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # a bare IPv6 address
        url = f"http://{host}:{int(port)}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"not an http:// URL or HOST:PORT: {url!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/status")
    return urllib.parse.urlunsplit(parts)


def fetch(url: str, timeout: float,
          tls: "Optional[ClientFiles]" = None) -> Tuple[int, Dict[str, Any]]:
    """GET ``url``: (HTTP status, the JSON document).

    :param tls: for an ``https://`` URL, the ``--ca``, ``--cert`` and
        ``--key`` files (:mod:`tigertunnel.tools.https`).
    :raises ConfigError: one of those files is unusable.
    :raises OSError: if the tunnel end cannot be reached or answers
        something other than a ``/status`` JSON object (the message says why).
    """
    if urllib.parse.urlsplit(url).scheme == "https":
        from tigertunnel.tools import https

        code, body = https.fetch(url, timeout, tls or https.ClientFiles())
        return code, _document(code, body)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            code, body = response.status, response.read()
    except urllib.error.HTTPError as e:  # 503 still carries the document
        code, body = e.code, e.read()
        e.close()
    except urllib.error.URLError as e:
        raise OSError(str(e.reason)) from None
    except http.client.HTTPException as e:
        raise OSError(f"not an HTTP answer ({type(e).__name__})") from None
    return code, _document(code, body)


def _client_files(args: argparse.Namespace) -> "ClientFiles":
    from tigertunnel.tools.https import ClientFiles

    return ClientFiles(args.ca, args.cert, args.key)


def _document(code: int, body: bytes) -> Dict[str, Any]:
    """The /status JSON object of an answer.

    :raises OSError: it is not one.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        raise OSError(f"HTTP {code}, not JSON") from None
    if not isinstance(doc, dict):
        raise OSError(f"HTTP {code}, not a /status document")
    return doc


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000.0
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _counts(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"


def _pair_lines(pair: Mapping[str, Any]) -> List[str]:
    lines = [f"pair {pair.get('name', '?')}  {pair.get('listen', '?')} -> "
             f"{pair.get('target', '?')}  "
             f"{'healthy' if pair.get('healthy') else 'UNHEALTHY'}  "
             f"sessions {pair.get('sessions', '?')}"]
    pool = pair.get("pool") or {}
    if pool:
        size = f"/{pool['size']}" if "size" in pool else ""
        lines.append(f"  pool: {pool.get('healthy', 0)}{size} healthy, "
                     f"{pool.get('draining', 0)} draining, "
                     f"{pool.get('handshaking', 0)} handshaking")
    backend = pair.get("backend")
    if isinstance(backend, Mapping) and backend.get("reachable") is not None:
        lines.append(f"  backend {pair.get('target', '?')}: "
                     + ("reachable" if backend["reachable"]
                        else f"UNREACHABLE ({backend.get('error') or 'connect failed'})"))
    # ``links``: what a tunnel end of the release before called them.
    for connection in pair.get("pool_connections", pair.get("links")) or ():
        key = connection.get("key_id")
        lines.append(f"    {connection.get('name', '?'):<12} key "
                     f"{key if key is not None else '-'}"
                     f"  {connection.get('state', '?'):<8}  "
                     f"{connection.get('sessions', 0)} sessions")
    failures = pair.get("handshake_failures") or {}
    if any(failures.values()):
        lines.append(f"  handshake failures: {_counts(failures)}")
    refused = pair.get("sessions_refused") or {}
    if any(refused.values()):
        lines.append(f"  sessions refused: {_counts(refused)}")
    lines.extend(_tb_lines(pair.get("tb")))
    return lines


def _tb_lines(tb: Any) -> List[str]:
    """The TigerBeetle section of a pair; nothing when the tunnel end has none."""
    if not isinstance(tb, Mapping):
        return []
    view = tb.get("view")
    lines = [f"  TigerBeetle: view {view if view is not None else '-'}, "
             f"evictions: {_counts(tb.get('evictions') or {})}, "
             f"cluster mismatches: {tb.get('cluster_mismatches', 0)}"]
    latency = tb.get("latency") or {}
    requests = tb.get("requests") or {}
    if latency or requests:
        lines.append(f"    {'operation':<24} {'requests':>9} {'answered':>9} "
                     f"{'p50 ms':>8} {'p99 ms':>8}")
        for op in sorted(set(latency) | set(requests)):
            entry = latency.get(op) or {}
            lines.append(f"    {op:<24} {requests.get(op, 0):>9} "
                         f"{entry.get('count', 0):>9} {_ms(entry.get('p50')):>8} "
                         f"{_ms(entry.get('p99')):>8}")
    return lines


def render(doc: Mapping[str, Any], url: str, code: int) -> str:
    """The terminal view of a ``/status`` document (missing sections are skipped)."""
    state = "healthy" if code == 200 and doc.get("healthy", True) else "UNHEALTHY"
    if doc.get("stopping"):
        state += " (shutting down)"
    lines = [f"tigertunnel {doc.get('role') or '?'} at {url}: {state} (HTTP {code})"]
    keys = doc.get("keys") or {}
    if keys:
        lines.append("keys: " + ", ".join(
            f"{kind} {' '.join(str(k) for k in ids) if ids else '-'}"
            for kind, ids in keys.items()))
    reload = doc.get("reload")
    if isinstance(reload, Mapping) and reload.get("time") is not None:
        results = reload.get("results") or {}
        last = "ok" if reload.get("ok") else f"FAILED: {reload.get('error')}"
        lines.append(f"last key reload: {last} ({results.get('ok', 0)} ok, "
                     f"{results.get('error', 0)} failed)")
    pairs = doc.get("pairs")
    if not pairs:
        lines.append("no proxy pairs")
    for pair in pairs or ():
        if isinstance(pair, Mapping):
            lines.extend(_pair_lines(pair))
    return "\n".join(lines) + "\n"


def main(argv: List[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Entry point of ``tigertunnel status``; returns the exit status."""
    try:
        args = parse_args(argv)
    except UsageError as e:
        err.write(f"tigertunnel: error: status: {e}\n")
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    url = args.url
    try:
        code, doc = fetch(url, args.timeout, _client_files(args))
    except ConfigError as e:
        err.write(f"tigertunnel: error: status: {e}\n")
        return 2
    except OSError as e:
        err.write(f"tigertunnel: error: status: cannot read {url}: {e}\n")
        return 1
    if args.json:
        out.write(json.dumps(doc, indent=1) + "\n")
    else:
        out.write(render(doc, url, code))
    return 0 if code == 200 and doc.get("healthy", True) is not False else 1


if __name__ == "__main__":  # python -m tigertunnel.tools.status
    sys.exit(main(sys.argv[1:]))
