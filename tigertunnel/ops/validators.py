"""The values of a tunnel end's options: one table for flags and config file.

:data:`VALIDATORS` maps the long name of every ``server``/``client`` option
that takes a value to the function that parses and checks it. The
command-line options (:class:`tigertunnel.tap.Options`) and the ``[tunnel]``
keys of a cluster config file (:mod:`tigertunnel.config.clusterfile`, whose
keys are exactly these long names) both go through it, so a value is
accepted or refused the same way, with the same message, wherever it is
given. Rules between options (``--require-kem`` needs ``--kemsecret`` ...)
are the options' own, checked once all values are in.

A validator takes the text and the users a secret file may belong to, and
returns the parsed value. It raises :class:`~twisted.python.usage.UsageError` naming the
bad value, or, for a key file, :class:`~tigertunnel.errors.KeyFileError`
naming the file (the caller says which option it was). Reading a key or
certificate file is its check; nothing here listens, resolves or inherits
(that is the start-up plan, :mod:`tigertunnel.ops.plan`).
"""

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, FrozenSet, Mapping, Optional, Tuple

from twisted.python import usage

from tigertunnel import logs
from tigertunnel.errors import ConfigError, KeyFileError
from tigertunnel.keys.files import (
    load_kem_public_file,
    load_kem_secret_file,
    load_psk_file,
    read_key_file,
)
from tigertunnel.keys.format import KeyStore, parse_int

if TYPE_CHECKING:
    from tigertunnel.ops.tls import ServerTLS

#: Parses and checks one option value: ``(text, key file owners) -> value``.
Validator = Callable[[str, FrozenSet[int]], Any]

def whole_number(name: str, text: str, limit: int = 2 ** 32 - 1) -> int:
    """``text`` as a whole number from 1 to ``limit``.

    :raises usage.UsageError: naming ``name`` and the value.
    """
    try:
        value = int(text, 10)
    except ValueError:
        raise usage.UsageError(f"invalid {name}: {text!r} (expected a whole "
                               f"number)") from None
    if not 1 <= value <= limit:
        raise usage.UsageError(f"invalid {name}: {text!r} (must be 1 to "
                               f"{limit})")
    return value


def _counted(name: str, limit: int = 2 ** 32 - 1) -> Validator:
    return lambda text, _owners: whole_number(name, text, limit)


def _workers(text: str, _owners: FrozenSet[int]) -> int:
    from tigertunnel.ops.workers import MAX_WORKERS
    return whole_number("workers", text, MAX_WORKERS)


def _seconds(text: str) -> float:
    """``text`` as seconds, more than 0 and at most an hour.

    :raises ValueError: it is not.
    """
    value = float(text)
    if not 0 < value <= 3600:
        raise ValueError(text)
    return value


def _handshake_timeout(text: str, _owners: FrozenSet[int]) -> float:
    try:
        return _seconds(text)
    except ValueError:
        raise usage.UsageError(f"invalid handshake-timeout: {text!r}") from None


def _shutdown_timeout(text: str, _owners: FrozenSet[int]) -> float:
    try:
        return _seconds(text)
    except ValueError:
        raise usage.UsageError(f"invalid shutdown-timeout: {text!r} (seconds, "
                               f"more than 0, at most 3600)") from None


def _cluster(text: str, _owners: FrozenSet[int]) -> int:
    try:
        return parse_int(text, bits=128)
    except ValueError:
        raise usage.UsageError(f"invalid cluster id: {text!r} (expected a "
                               f"decimal u128)") from None


def _log_level(text: str, _owners: FrozenSet[int]) -> str:
    if text not in logs.LEVELS:
        raise usage.UsageError(f"invalid log level: {text!r} (use: err, warn, "
                               f"info, debug)")
    return text


def _log_format(text: str, _owners: FrozenSet[int]) -> str:
    if text not in logs.FORMATS:
        raise usage.UsageError(f"invalid log format: {text!r} "
                               f"(use: {', '.join(logs.FORMATS)})")
    return text


@dataclass(frozen=True)
class MetricsEndpoint:
    """A ``--metrics`` endpoint description and whether only this host
    (loopback, a UNIX socket) can reach it."""

    description: str
    local: bool


def _metrics(text: str, _owners: FrozenSet[int]) -> MetricsEndpoint:
    from tigertunnel.net.listeners import endpoint_is_local

    try:
        local = endpoint_is_local(text)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise usage.UsageError(f"invalid --metrics endpoint {text!r}: "
                               f"{e or type(e).__name__} (example: tcp:9101:"
                               f"interface=127.0.0.1)") from None
    return MetricsEndpoint(text, local)


def _replay_file(text: str, _owners: FrozenSet[int]) -> str:
    from tigertunnel.ops.replay import IN_MEMORY

    if text in IN_MEMORY:
        return text
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise usage.UsageError(f"invalid --replay-file {text!r}: directory "
                               f"{folder!r} does not exist")
    if os.path.isdir(text):
        raise usage.UsageError(f"invalid --replay-file {text!r}: it is a "
                               f"directory (give a file name)")
    return text


def _tls_certificates(path: str, _owners: FrozenSet[int]) -> str:
    from tigertunnel.ops.tls import read_certificates

    try:
        read_certificates(path)
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    return path


def _tls_key(path: str, owners: FrozenSet[int]) -> str:
    """The key file on its own (whether it is the certificate's key is
    checked with both, :func:`tigertunnel.ops.tls.read_server_tls`)."""
    try:
        read_key_file(path, secret=True, owners=owners)
    except (ConfigError, KeyFileError) as e:
        raise usage.UsageError(str(e)) from None
    return path


def _psk_file(path: str, owners: FrozenSet[int]) -> KeyStore:
    return load_psk_file(path, owners)


def _kem_secret_file(path: str, owners: FrozenSet[int]) -> KeyStore:
    return load_kem_secret_file(path, owners)


def _kem_public_file(path: str, _owners: FrozenSet[int]) -> Tuple[int, bytes]:
    return load_kem_public_file(path)


def metrics_tls(cert: Optional[str], key: Optional[str], client_ca: Optional[str],
                owners: FrozenSet[int]) -> "Optional[ServerTLS]":
    """Read and check the ``--metrics-tls-*`` files together (``None``:
    plain HTTP).

    :raises usage.UsageError: one is missing its pair, or a file is unusable.
    """
    from tigertunnel.ops.tls import read_server_tls

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
        return read_server_tls(cert, key, client_ca, owners)
    except ConfigError as e:
        raise usage.UsageError(f"--metrics TLS: {e}") from None


def check_metrics_exposure(metrics: MetricsEndpoint, tls: "Optional[ServerTLS]",
                           public: bool) -> None:
    """Refuse ``--metrics`` that other hosts can reach without
    authentication, unless ``--metrics-public``.

    :raises usage.UsageError: naming the endpoint and the three ways out.
    """
    authenticated = tls is not None and tls.requires_client_certificate
    if not metrics.local and not authenticated and not public:
        raise usage.UsageError(
            f"--metrics {metrics.description!r} can be reached from other "
            f"hosts and has no authentication: give "
            f"interface=127.0.0.1 (or a unix: socket), require client "
            f"certificates with --metrics-tls-client-ca, or add "
            f"--metrics-public to serve it there on purpose")


def require_native_kem(option: str) -> None:
    """Refuse a KEM key file where ML-KEM cannot run (no native ML-KEM).

    :raises usage.UsageError: naming the option and what to install.
    """
    from tigertunnel.crypto.kem import check_available
    from tigertunnel.errors import KEMUnavailableError

    try:
        check_available()
    except KEMUnavailableError as e:
        raise usage.UsageError(f"cannot use {option}: {e}") from None


#: Every option that takes a value, by long name: its validator.
VALIDATORS: Mapping[str, Validator] = {
    "key": _psk_file,
    "kemsecret": _kem_secret_file,
    "kempublic": _kem_public_file,
    "cluster": _cluster,
    "max-sessions": _counted("max-sessions"),
    "num-conns": _counted("num-conns", 1024),
    "workers": _workers,
    "log-level": _log_level,
    "log-format": _log_format,
    "handshake-timeout": _handshake_timeout,
    "shutdown-timeout": _shutdown_timeout,
    "metrics": _metrics,
    "metrics-tls-cert": _tls_certificates,
    "metrics-tls-key": _tls_key,
    "metrics-tls-client-ca": _tls_certificates,
    "replay-file": _replay_file,
}

def check_value(name: str, text: str, owners: FrozenSet[int]) -> Any:
    """Parse and check the value ``text`` of option ``name``.

    :raises usage.UsageError: the value is refused (a key file: the
        message names the file).
    :raises KeyError: ``name`` takes no value or is not an option.
    """
    try:
        return VALIDATORS[name](text, owners)
    except KeyFileError as e:
        raise usage.UsageError(str(e)) from None

