"""The HTTPS GET of ``tigertunnel status https://...``, checking who answers.

The endpoint's certificate must chain to a CA of ``--ca FILE`` (the
system's trusted CAs without it) and name the URL's host, a DNS name or an
IP address: Twisted's ``optionsForClientTLS`` checks both, the name with
service-identity. ``--cert FILE --key FILE`` show a client certificate to an
endpoint started with ``--metrics-tls-client-ca``. Every failure is one
line saying which of these went wrong.

:func:`get` is the Deferred-returning request (tests run it on their
reactor); :func:`fetch` runs the reactor once around it, for the command.
"""

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.defer import ensureDeferred
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tigertunnel.ops.tls import client_tls


@dataclass(frozen=True)
class ClientFiles:
    """The ``--ca``, ``--cert`` and ``--key`` files (``None``: not given)."""

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None


@implementer(IPolicyForHTTPS)
class _Checked:
    """Agent's TLS policy: the one client connection creator we built."""

    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        self.creator = creator

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return self.creator


async def get(reactor: Any, url: str, creator: IOpenSSLClientConnectionCreator,
              timeout: float) -> Tuple[int, bytes]:
    """GET ``url`` over TLS made by ``creator``: (HTTP status, body).

    :raises Exception: whatever Twisted raises (see :func:`explain`).
    """
    agent = Agent(reactor, contextFactory=_Checked(creator), connectTimeout=timeout)
    clock = IReactorTime(reactor)
    response = await agent.request(b"GET", url.encode("ascii")).addTimeout(timeout, clock)
    body: bytes = await readBody(response).addTimeout(timeout, clock)
    return int(response.code), body


def _ssl_reasons(error: BaseException) -> List[str]:
    """The reason strings of an ``OpenSSL.SSL.Error`` (empty for others)."""
    if not type(error).__module__.startswith("OpenSSL") or not error.args:
        return []
    details: Sequence[Any] = error.args[0] if isinstance(error.args[0], list) else []
    return [str(item[-1]) for item in details if isinstance(item, tuple) and item]


def explain(error: BaseException, host: str) -> str:
    """One line saying why a request to ``host`` failed."""
    reasons = getattr(error, "reasons", None)  # ResponseNeverReceived & co.
    if reasons and isinstance(reasons[0], Failure) and reasons[0].value is not None:
        error = reasons[0].value
    from service_identity import VerificationError

    if isinstance(error, VerificationError):
        return (f"the endpoint's certificate is not valid for {host!r} "
                f"(its names do not include it)")
    ssl = _ssl_reasons(error)
    text = ", ".join(ssl)
    if "certificate verify failed" in text:
        return ("the endpoint's certificate is not signed by a CA of --ca "
                "(or the system's CAs without --ca): certificate verify failed")
    if "certificate required" in text or "handshake failure" in text:
        return (f"the endpoint refused us: it requires a client certificate "
                f"signed by its CA (--cert and --key) ({text})")
    if "unknown ca" in text or "bad certificate" in text:
        return f"the endpoint refused our client certificate ({text})"
    if ssl:
        return f"TLS failed: {text}"
    return str(error) or type(error).__name__


def fetch(url: str, timeout: float, files: ClientFiles = ClientFiles()) -> Tuple[int, bytes]:
    """GET an ``https://`` URL, checking the endpoint: (HTTP status, body).

    Runs the global reactor until the answer is in (or SIGINT/SIGTERM), so
    once per process.

    :raises ConfigError: a ``--ca``, ``--cert`` or ``--key`` file is unusable.
    :raises OSError: the request failed (the message says why, one line).
    """
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    host = urlsplit(url).hostname or ""
    creator = client_tls(host, files.ca, files.cert, files.key)
    outcome: List[Any] = []

    def start() -> None:
        d = ensureDeferred(get(reactor, url, creator, timeout))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise OSError("interrupted before an answer")
    result = outcome[0]
    if isinstance(result, Failure):
        raise OSError(explain(result.value or Exception("failed"), host))
    code, body = result
    return int(code), bytes(body)
