"""Validated configuration of a tunnel end (pure: no reactor, no sockets).

User-facing address syntax (docs/protocol.rst §9, plus host names, which
the reference documents but rejects):

* ``:PORT`` — every IPv4 interface;
* ``IPv4:PORT`` and ``[IPv6]:PORT``;
* ``HOSTNAME:PORT``.

Addresses are converted here, once, into Twisted endpoint descriptions; any
bad value raises :class:`~tigertunnel.errors.ConfigError` naming it.
"""

import enum
import ipaddress
import re
import socket
from dataclasses import dataclass, field, replace
from typing import List, Mapping, Optional, Tuple, Union

from tigertunnel.keys.format import KeyStore
from tigertunnel.keys.ring import KeyRing
from tigertunnel.errors import ConfigError

MAX_PROXY_PAIRS = 16
DEFAULT_POOL_SIZE = 4
DEFAULT_MAX_SESSIONS = 1000
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Default seconds a graceful shutdown (SIGTERM) may take before connections
#: are aborted (``--shutdown-timeout``).
DEFAULT_SHUTDOWN_TIMEOUT = 10.0


class Role(str, enum.Enum):
    """Which end of the tunnel a process is: the tunnel client or server.

    A ``str`` enum: it formats as its value (``client``, ``server``) in logs
    and JSON, and compares equal to it.
    """

    CLIENT = "client"
    SERVER = "server"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: Union[str, "Role"]) -> "Role":
        """The role named ``value``.

        :raises ConfigError: ``value`` is neither ``client`` nor ``server``.
        """
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"invalid role: {value!r} (expected client or "
                              f"server)") from None


@dataclass(frozen=True)
class Address:
    """A host (IP literal or name; empty = all IPv4 interfaces) and a port."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        """Whether the host is an IPv6 literal."""
        try:
            return ipaddress.ip_address(self.host).version == 6
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _escape(host: str) -> str:
    return host.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def parse_address(text: str, what: str) -> Address:
    """Parse ``:PORT``, ``IPv4:PORT``, ``[IPv6]:PORT`` or ``HOST:PORT``.

    :param what: names the value in errors (``listen address`` ...).
    :raises ConfigError: the text is not an address with a port 1..65535.
    """
    bad = ConfigError(f"invalid {what}: {text!r} (expected :PORT, "
                      f"IPv4:PORT, [IPv6]:PORT or HOST:PORT)")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise bad
        port_text = rest[1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise bad
        except ValueError:
            raise bad from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise bad
        if host:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                if not _valid_hostname(host):
                    raise bad from None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise bad
    return Address(host, int(port_text))


def _valid_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    for label in labels:
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isalnum() or c == "-" for c in label) or not label.isascii():
            return False
    return True


#: Listen backlog of the tunnel's listeners (Twisted's default is 50). TB
#: clients reconnect together after a failover; a connection that finds the
#: accept queue full waits for a SYN retransmission (1 s, then 3 s, 7 s ...).
LISTEN_BACKLOG = 1024


def listen_description(address: Address) -> str:
    """Return the Twisted server endpoint description for a listen address.

    A host name is resolved once, here (listening needs an address).

    :raises ConfigError: the host name does not resolve.
    """
    host = address.host
    if host and not _is_ip(host):
        try:
            host = str(socket.getaddrinfo(host, address.port, socket.AF_UNSPEC,
                                          socket.SOCK_STREAM)[0][4][0])
        except (OSError, IndexError) as e:
            raise ConfigError(f"cannot resolve listen host {address.host!r}: "
                              f"{e}") from None
    if not host:
        return f"tcp:{address.port}:backlog={LISTEN_BACKLOG}"
    kind = "tcp6" if ipaddress.ip_address(host).version == 6 else "tcp"
    return (f"{kind}:{address.port}:interface={_escape(host)}"
            f":backlog={LISTEN_BACKLOG}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


#: A pair name given with ``-p LISTEN,TARGET,name=NAME``: letters, digits,
#: ``_ . : -``, 1 to 64 characters.
_PAIR_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")


@dataclass(frozen=True)
class ProxyPair:
    """One ``-p LISTEN,TARGET[,name=NAME]`` pair (target = backend or tunnel server).

    :ivar given_name: the ``name=`` of ``-p`` (a cluster config file gives
        ``replicaN``), or ``None``.
    :ivar label: what the pair reaches, as metrics and ``/status`` name it
        (label ``pair``): the given name, else the target address; set by
        :class:`TunnelConfig` (:func:`label_pairs`), ``""`` before.
    """

    index: int
    listen: Address
    target: Address
    given_name: Optional[str] = None
    label: str = ""

    @property
    def name(self) -> str:
        """A short name used in logs: ``pair0`` ..."""
        return f"pair{self.index}"


def parse_proxy(text: str, index: int) -> ProxyPair:
    """Parse ``LISTEN,TARGET`` or ``LISTEN,TARGET,name=NAME``.

    :raises ConfigError: naming the bad part.
    """
    listen, sep, target = text.partition(",")
    target, _, suffix = target.partition(",")
    if not sep or not listen or not target:
        raise ConfigError(f"invalid proxy pair {text!r}: expected "
                          f"LISTEN,TARGET[,name=NAME] such as :4000,127.0.0.1:3000")
    given: Optional[str] = None
    if suffix or text.count(",") > 1:
        key, eq, given = suffix.partition("=")
        if key != "name" or not eq:
            raise ConfigError(f"invalid proxy pair {text!r}: after LISTEN,TARGET "
                              f"only name=NAME may follow, not {suffix!r}")
        if not _PAIR_NAME.match(given):
            raise ConfigError(f"invalid proxy pair name {given!r}: 1 to 64 "
                              f"letters, digits, '_', '.', ':' or '-'")
    return ProxyPair(index, parse_address(listen, "listen address"),
                     parse_address(target, "target address"), given)


def label_pairs(pairs: List[ProxyPair]) -> List[ProxyPair]:
    """``pairs`` with their :attr:`~ProxyPair.label` set.

    A pair is labelled with its given name, else its target address; pairs
    without a name that reach the same address get ``#INDEX`` appended
    (``127.0.0.1:3001#1``), so every label is unique.

    :raises ConfigError: two pairs would have the same label (the same
        given name, or a given name that is another pair's label).
    """
    defaults = [str(pair.target) for pair in pairs]
    labelled = []
    for pair, default in zip(pairs, defaults):
        if pair.given_name is not None:
            label = pair.given_name
        elif sum(1 for p, d in zip(pairs, defaults)
                 if p.given_name is None and d == default) > 1:
            label = f"{default}#{pair.index}"
        else:
            label = default
        labelled.append(replace(pair, label=label))
    labels = [pair.label for pair in labelled]
    for label in labels:
        if labels.count(label) > 1:
            raise ConfigError(f"two proxy pairs are named {label!r} (give each "
                              f"its own -p ...,name=NAME)")
    return labelled


@dataclass(frozen=True)
class TunnelConfig:
    """The settings of one tunnel end (client or server), never changed.

    ``psk``, ``kem_public`` and ``kem_secret`` are the keys as read at
    start-up (:attr:`keyring`); the keys in use may be newer (a reload
    swaps the multiplexers' :class:`~tigertunnel.keys.ring.KeyRing`, and
    leaves this object as it is). ``psk`` is ``None`` only in explicit
    plaintext mode. ``role`` may be given as its name (``"client"``); it is
    a :class:`Role` afterwards.
    """

    role: Role
    pairs: List[ProxyPair]
    psk: Optional[KeyStore] = None
    kem_public: Optional[Tuple[int, bytes]] = None
    kem_secret: Optional[KeyStore] = None
    cluster_id: Optional[int] = None
    pool_size: int = DEFAULT_POOL_SIZE
    max_sessions: int = DEFAULT_MAX_SESSIONS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    require_kem: bool = False
    key_path: Optional[str] = None
    kem_path: Optional[str] = None
    #: Processes serving this tunnel end (``--workers``).
    workers: int = 1
    #: The listen endpoint description of each pair, by pair index, as the
    #: start-up plan settled it (:mod:`tigertunnel.ops.plan`): a listen host
    #: name resolved once, or a ``systemd:`` socket handed over by socket
    #: activation. A pair not in it listens on its own address.
    listen_overrides: Mapping[int, str] = field(default_factory=dict)
    #: Inherited listening sockets by pair index (a ``--workers`` worker
    #: accepts on worker 0's sockets), set by the start-up plan.
    inherited_fds: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role.parse(self.role))
        object.__setattr__(self, "pairs", label_pairs(self.pairs))

    @property
    def keyring(self) -> KeyRing:
        """The keys as read at start-up."""
        return KeyRing(self.psk, self.kem_public, self.kem_secret)
