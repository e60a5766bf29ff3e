"""twistd plugin options and service maker for ``twistd tigertunnel``.

``twistd [-n] [--pidfile F] tigertunnel server -p :3000,127.0.0.1:3001 -k K``
``twistd [-n] [--pidfile F] tigertunnel client -p :4000,HOST:3000 -k K``

Every option, address and key file is validated while the options are
parsed, so a bad value stops start-up with a one-line message naming it and a
non-zero exit status, before anything listens or daemonizes.
"""

from typing import Any, List, Optional

from twisted.application.service import IService
from twisted.python import usage

from tigertunnel import logs
from tigertunnel.config import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_POOL_SIZE,
    MAX_PROXY_PAIRS,
    TunnelConfig,
    listen_description,
    parse_proxy,
)
from tigertunnel.crypto.keys import (
    load_kem_public_file,
    load_kem_secret_file,
    load_psk_file,
    parse_int,
)
from tigertunnel.errors import ConfigError, KeyFileError


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


class _EndOptions(usage.Options):
    """Options shared by ``server`` and ``client``."""

    role = ""
    optFlags = [
        ["plaintext", None, "Run without encryption (no -k). Only for "
         "testing on a trusted network: nothing is authenticated."],
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self["proxies"] = []
        self.config: Optional[TunnelConfig] = None

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
        self.config = cfg

    def load_role_keys(self, cfg: TunnelConfig) -> None:
        """Load and check the KEM key file of this role."""


class ServerOptions(_EndOptions):
    """``tigertunnel server``: accept pool connections, forward to a replica."""

    role = "server"
    synopsis = ("[options] -p LISTEN,BACKEND -k KEYFILE\n"
                "Example: twistd -n tigertunnel server -p :3000,127.0.0.1:3001 "
                "-k secret.key")
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
    synopsis = ("[options] -p LISTEN,SERVER -k KEYFILE\n"
                "Example: twistd --pidfile tt.pid tigertunnel client "
                "-p :4000,tunnel.example.org:3000 -k secret.key")
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


class Options(usage.Options):
    """tigertunnel: an encrypted tunnel for TigerBeetle traffic."""

    synopsis = "server|client [options]"
    subCommands = [
        ["server", None, ServerOptions, "Run the tunnel server (next to a "
         "replica)."],
        ["client", None, ClientOptions, "Run the tunnel client (next to TB "
         "clients or a replica)."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a mode: server or client")


def makeService(options: Options, reactor: Any = None) -> IService:
    """Build the tunnel service from parsed :class:`Options`."""
    from tigertunnel.services import build_service

    sub = options.subOptions
    config: TunnelConfig = sub.config
    logs.set_level(sub["log-level"])
    return build_service(config, reactor)


def end_options(argv: List[str]) -> Options:
    """Parse ``server ...`` / ``client ...`` arguments (console script)."""
    opts = Options()
    opts.parseOptions(argv)
    return opts
