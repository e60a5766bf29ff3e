"""Start-up: every port bound while an error can still be one line, and what to warn about.

Under ``twistd`` a service's ports are normally bound after twistd has
daemonized: an error then reaches the user as twistd's "An error has
occurred" (cut at 100 bytes) and a traceback in the log. So
``twistd tigertunnel`` binds the listening ports of the proxy pairs and of
``--metrics`` in ``makeService`` instead, while twistd still has the
terminal and has written no pidfile: :func:`bind_before_daemonizing` prints
one line ``tigertunnel: error: cannot start: ...`` on stderr and exits 1 when
one cannot be bound, the same line the console script prints, with or
without ``-n``. twistd then starts the service (after daemonizing and
dropping privileges); its ``privilegedStartService`` binds only once
(:class:`~tigertunnel.ops.shutdown.TunnelService`). A server's replay file
that exists already is opened once beforehand too (:func:`probe_replay_file`)
when twistd will not switch users, change root or change directory, so a
file that is not a replay cache, or cannot be opened, is the same one line
(a new one is still created by the service, once twistd runs it).

:func:`reachable_tb_listeners` names the TB-side listeners of a tunnel
client that other hosts can reach. TigerBeetle has no authentication, so
whoever reaches such a port can use the tunnel; the client logs one warning
at start naming them (:func:`warn_reachable_tb_listeners`).
"""

import os
import sys
from typing import List, NoReturn

from twisted.application.service import IService

from tigertunnel.config.model import Role, TunnelConfig, listen_description
from tigertunnel.errors import ConfigError
from tigertunnel.logs import logger
from tigertunnel.net.listeners import endpoint_is_local

log = logger(__name__)


def fail(message: str, status: int = 1) -> NoReturn:
    """Print ``tigertunnel: error: MESSAGE`` on stderr and exit with ``status``."""
    sys.stderr.write(f"tigertunnel: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(status)


def bind_before_daemonizing(top: IService) -> None:
    """Bind ``top``'s listening ports now (``privilegedStartService``).

    :raises SystemExit: (status 1) after one line on stderr, when a port
        cannot be bound or anything else in the binding fails.
    """
    try:
        top.privilegedStartService()
    except Exception as e:  # one line, whatever it is: nothing runs yet
        fail(f"cannot start: {e}")


def probe_replay_file(path: str) -> None:
    """Open the replay file ``path``, if it exists, and close it again.

    Nothing is created: the service creates a new file when it starts.

    :raises SystemExit: (status 1) after one line on stderr naming the file,
        when the replay cache cannot use it.
    """
    from tigertunnel.ops.replay import FileReplayCache

    if not os.path.lexists(path):
        return
    try:
        FileReplayCache(path).close()
    except Exception as e:  # ReplayCacheError, or anything else: one line
        fail(f"cannot start: {e}")


def _shown(host: str, port: int) -> str:
    if not host:
        return f"*:{port} (all IPv4 interfaces)"
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def reachable_tb_listeners(config: TunnelConfig) -> List[str]:
    """The TB-side listen addresses of a tunnel client that are not on loopback.

    A pair listening on all interfaces (``:PORT``, ``0.0.0.0``, ``::``) or on
    any address that is not loopback counts; a host name counts by the
    address it resolves to. A tunnel server's listeners take pool
    connections, which must prove the key: they are never named.
    """
    if config.role is not Role.CLIENT:
        return []
    reachable = []
    for pair in config.pairs:
        # The start-up plan's resolved description, if it made one (a
        # systemd socket's is no address: the pair's own is then used).
        planned = config.listen_overrides.get(pair.index, "")
        try:
            local = endpoint_is_local(planned if planned.startswith("tcp")
                                      else listen_description(pair.listen))
        except (ConfigError, ValueError):
            local = False
        if not local:
            reachable.append(_shown(pair.listen.host, pair.listen.port))
    return reachable


def warn_reachable_tb_listeners(config: TunnelConfig) -> None:
    """Log one warning naming the client's TB-side listeners beyond loopback (if any)."""
    reachable = reachable_tb_listeners(config)
    if reachable:
        log.warn("TB-side listener reachable beyond loopback: {addresses}; anyone "
                 "who can connect there can use the tunnel (TigerBeetle has no "
                 "authentication): bind it to 127.0.0.1 or a private interface",
                 addresses=", ".join(reachable))
