"""The cluster config file (``--config FILE``): every proxy pair of a cluster.

One INI file (read with :mod:`configparser`) describes a whole 3- or
6-replica cluster, and the same file serves every tunnel end of it::

    [tunnel]
    key = secret.key            ; -k (relative paths: from this file's directory)
    kemsecret = server-kem.key  ; --kemsecret, used by servers
    kempublic = server-kem.pub  ; --kempublic, used by clients
    cluster = 0                 ; -c
    local-port = 4000           ; tunnel clients listen on local-host:local-port+N
    local-host = 127.0.0.1

    [replica 0]
    tunnel = r0.example:3000    ; where replica 0's tunnel server is reached
    backend = 127.0.0.1:3001    ; replica 0 itself, as its tunnel server reaches it
    ; listen = :3000            ; the tunnel server's listen address (default :PORT of tunnel)
    ; local = 127.0.0.1:4000    ; a tunnel client's listen address for replica 0

    [replica 1]
    ...

Which proxy pairs a tunnel end gets:

* ``server --config F --replica N``: one pair, replica N's ``listen`` to its
  ``backend`` (``--replica`` may be left out when the file has one replica);
* ``client --config F``: the client→replica direction, one pair per replica
  (TB clients use ``--addresses`` = the ``local`` addresses in order);
* ``client --config F --replica N``: the replica↔replica direction, next to
  replica N: one pair per *other* replica (replica N's ``--addresses`` lists
  its own real address and these ``local`` addresses).

Other keys of ``[tunnel]`` are the long option names, exactly as spelled
out (``max-sessions``, ``num-conns``, ``metrics``, ``shutdown-timeout``,
``require-kem = yes`` ...; no abbreviations): the table of them
(:func:`option_table`) is read off the ``server`` and ``client`` options
themselves, less the few that only a command line can give. Options that
belong to the other role are ignored. Each value is checked by its flag's
validator (:data:`tigertunnel.ops.validators.VALIDATORS`, passed in as
``check``). Nothing here resolves a host name: listen addresses are
resolved once, by the start-up plan.

The file becomes command-line arguments placed *before* the real ones
(:func:`expand_arguments`, the pre-pass of the options' parse), so it goes
through exactly the same validation as the flags, and flags given on the
command line override it. Every error is one line naming the file, the
section and the key.
"""

import configparser
import getopt
import os
import re
from dataclasses import dataclass, field
from typing import (
    Callable,
    Collection,
    Dict,
    FrozenSet,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

from twisted.python import usage

from tigertunnel.config.model import MAX_PROXY_PAIRS, Address, parse_address
from tigertunnel.errors import ConfigError

_REPLICA = re.compile(r"replica (\d+)\Z")
#: [tunnel] keys that name files: relative paths are from the file's directory.
PATH_OPTIONS = frozenset({"key", "kemsecret", "kempublic", "metrics-tls-cert",
                          "metrics-tls-key", "metrics-tls-client-ca"})
_LOCAL_KEYS = {"local-host", "local-port"}
_REPLICA_KEYS = {"tunnel", "backend", "listen", "local"}


@dataclass(frozen=True)
class FileOption:
    """A ``[tunnel]`` key: the long option it stands for.

    :ivar flag: the option takes no value (``yes``/``no`` in the file).
    :ivar roles: the tunnel ends (``server``, ``client``) that have it.
    """

    name: str
    flag: bool
    roles: FrozenSet[str]


#: ``[tunnel]`` key to option, as :func:`option_table` makes it.
OptionTable = Mapping[str, FileOption]


def option_table(by_role: Mapping[str, usage.Options],
                 excluded: Collection[str]) -> Dict[str, FileOption]:
    """The ``[tunnel]`` keys: every long option of each role's options.

    :param by_role: an instance of each role's options (``server``, ``client``).
    :param excluded: long options a file cannot set.
    """
    kinds: Dict[str, bool] = {}
    roles: Dict[str, List[str]] = {}
    for role, options in by_role.items():
        for long_opt in options.longOpt:
            name = long_opt.rstrip("=")
            if name in excluded:
                continue
            kinds[name] = not long_opt.endswith("=")
            roles.setdefault(name, []).append(role)
    return {name: FileOption(name, kinds[name], frozenset(roles[name]))
            for name in sorted(kinds)}


class ConfigFileError(ConfigError):
    """A config file is unusable; the message is ``FILE: [section] key: why``."""


@dataclass(frozen=True)
class Replica:
    """One ``[replica N]`` section, resolved."""

    index: int
    tunnel: Address
    backend: Address
    listen: str
    local: str


@dataclass
class ClusterFile:
    """A parsed cluster config file.

    :ivar table: the ``[tunnel]`` keys it was read with.
    :ivar options: the ``[tunnel]`` options in file order, as
        ``(key, value, "[tunnel] key")`` (paths made absolute, flags
        ``yes``/``no``).
    :ivar replicas: the ``[replica N]`` sections in order.
    """

    path: str
    table: OptionTable
    options: List[Tuple[str, str, str]] = field(default_factory=list)
    replicas: List[Replica] = field(default_factory=list)

    def _error(self, section: str, key: Optional[str], message: str) -> ConfigFileError:
        where = f"[{section}]" + (f" {key}" if key else "")
        return ConfigFileError(f"{self.path}: {where}: {message}")

    def pairs(self, role: str, replica: Optional[int]) -> List[str]:
        """The ``-p LISTEN,TARGET,name=replicaN`` values of ``role`` (next to
        ``replica``): each pair is named for the replica it reaches.

        :raises ConfigFileError: ``replica`` is not in the file, or a server
            without ``--replica`` in a file with several replicas.
        """
        count = len(self.replicas)
        if replica is not None and not 0 <= replica < count:
            raise ConfigFileError(f"{self.path}: --replica {replica}: the file "
                                  f"describes replicas 0 to {count - 1}")
        if role == "server":
            if replica is None:
                if count != 1:
                    raise ConfigFileError(f"{self.path}: a server needs "
                                          f"--replica N (which replica it fronts)")
                replica = 0
            r = self.replicas[replica]
            return [f"{r.listen},{r.backend},name=replica{r.index}"]
        return [f"{r.local},{r.tunnel},name=replica{r.index}" for r in self.replicas
                if r.index != replica]

    def argv(self, role: str, replica: Optional[int]) -> List[str]:
        """Command-line arguments equivalent to this file for ``role``."""
        args: List[str] = []
        for key, value, _ in self.options:
            option = self.table[key]
            if role not in option.roles:
                continue
            if option.flag:
                if value == "yes":
                    args.append(f"--{key}")
            elif key == "key":
                args += ["-k", value]
            else:
                args.append(f"--{key}={value}")
        for pair in self.pairs(role, replica):
            args += ["-p", pair]
        return args


def _address_text(address: Address) -> str:
    return str(address) if address.host else f":{address.port}"


def load(path: str, table: OptionTable) -> ClusterFile:
    """Read and check the structure and addresses of a cluster config file.

    Values of ``[tunnel]`` are checked when the resulting arguments are
    parsed (:meth:`ClusterFile.argv`).

    :param table: the ``[tunnel]`` keys (see :func:`option_table`).
    :raises ConfigFileError: naming the file, the section and the key.
    """
    result = ClusterFile(path, table)
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       inline_comment_prefixes=(";", "#"),
                                       default_section="\0none")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path}: not UTF-8 text") from None
    except configparser.Error as e:
        message = str(e).replace("\n", " ")
        raise ConfigFileError(f"{path}: {message}") from None
    base = os.path.dirname(os.path.abspath(path))
    local_host, local_port = "127.0.0.1", 4000
    indexes: Dict[int, configparser.SectionProxy] = {}
    for name in parser.sections():
        section = parser[name]
        match = _REPLICA.match(name)
        if match:
            indexes[int(match.group(1))] = section
            continue
        if name != "tunnel":
            raise result._error(name, None, "unknown section (expected [tunnel] "
                                "or [replica N])")
        for key, value in section.items():
            if key in _LOCAL_KEYS:
                if key == "local-port":
                    if not (value.isdigit() and 0 < int(value) < 65536):
                        raise result._error(name, key, f"invalid port {value!r}")
                    local_port = int(value)
                else:
                    try:
                        parse_address(f"{value}:1", "local-host")
                    except ConfigError:
                        raise result._error(name, key, f"invalid host "
                                            f"{value!r}") from None
                    local_host = value
                continue
            if key not in table:
                raise result._error(name, key, f"unknown key (known: "
                                    f"{', '.join(sorted(table) + sorted(_LOCAL_KEYS))})")
            if table[key].flag:
                try:
                    value = "yes" if section.getboolean(key) else "no"
                except ValueError:
                    raise result._error(name, key, f"expected yes or no, got "
                                        f"{value!r}") from None
            elif key in PATH_OPTIONS:
                value = os.path.join(base, os.path.expanduser(value))
            if not value:
                raise result._error(name, key, "empty value")
            result.options.append((key, value, f"[{name}] {key}"))
    if not indexes:
        raise ConfigFileError(f"{path}: no [replica N] section")
    if sorted(indexes) != list(range(len(indexes))):
        raise ConfigFileError(f"{path}: replica sections must be numbered 0 to "
                              f"{len(indexes) - 1} (found {sorted(indexes)})")
    if len(indexes) > MAX_PROXY_PAIRS:
        raise ConfigFileError(f"{path}: at most {MAX_PROXY_PAIRS} replicas")
    for index in range(len(indexes)):
        result.replicas.append(_replica(result, index, indexes[index],
                                        local_host, local_port))
    return result


def _replica(result: ClusterFile, index: int, section: configparser.SectionProxy,
             local_host: str, local_port: int) -> Replica:
    name = section.name
    for key in section:
        if key not in _REPLICA_KEYS:
            raise result._error(name, key, "unknown key (known: backend, "
                                "listen, local, tunnel)")
    values: Dict[str, Address] = {}
    for key in ("tunnel", "backend", "listen", "local"):
        text = section.get(key)
        if text is None:
            if key in ("tunnel", "backend"):
                raise result._error(name, key, "missing")
            continue
        try:
            values[key] = parse_address(text, f"{key} address")
        except ConfigError as e:
            raise result._error(name, key, str(e)) from None
    if local_port + index > 65535:
        raise result._error(name, "local", f"local-port {local_port} + {index} "
                            f"is not a port")
    listen = values.get("listen", Address("", values["tunnel"].port))
    local = values.get("local", Address(local_host, local_port + index))
    return Replica(index, values["tunnel"], values["backend"],
                   _address_text(listen), _address_text(local))


# -- the pre-pass: --config FILE expanded in front of the arguments ---------


@dataclass(frozen=True)
class Expanded:
    """The arguments of a run once ``--config FILE`` is expanded.

    :ivar args: what to parse: the file's arguments, then the given ones
        (which override them).
    :ivar worker_args: what workers are started with: the file's values as
        read now, then the given arguments less ``--config`` and
        ``--replica`` (a restarted worker must run what worker 0 runs).
    :ivar given: the canonical names of the options on the command line.
    """

    args: List[str]
    worker_args: List[str]
    given: FrozenSet[str]


@dataclass(frozen=True)
class Given:
    """The options of a command line, as the parse will read them.

    :ivar values: ``{canonical name: last value}`` (``""`` for a flag).
    :ivar options: each option in order, as ``(spelled-out option, value)``:
        long options by their full name (getopt expands a unique prefix
        such as ``--conf``), ``value`` ``None`` for a flag.
    :ivar rest: the arguments after the options.
    """

    values: Dict[str, str]
    options: List[Tuple[str, Optional[str]]]
    rest: List[str]

    def without(self, names: Collection[str]) -> List[str]:
        """The command line again, without the long options ``names`` (and
        their values)."""
        out: List[str] = []
        for opt, value in self.options:
            if opt[2:] in names and opt.startswith("--"):
                continue
            out += [opt] if value is None else [opt, value]
        return out + (["--"] + self.rest if self.rest else [])


def given_options(options: usage.Options, args: Sequence[str]) -> Given:
    """The options in ``args``, as the parse will read them (getopt's own
    reading: a long option may be a unique prefix of its name).

    :returns: no options when the arguments do not parse (the parse itself
        reports that).
    """
    try:
        found, rest = getopt.getopt(list(args), options.shortOpt, options.longOpt)
    except getopt.error:
        return Given({}, [], list(args))
    short = options.shortOpt
    takes_value = {f"--{name.rstrip('=')}" for name in options.longOpt if name.endswith("=")}
    takes_value |= {f"-{letter}" for letter, colon in zip(short, short[1:] + " ")
                    if letter != ":" and colon == ":"}
    values: Dict[str, str] = {}
    spelled: List[Tuple[str, Optional[str]]] = []
    for opt, value in found:
        name = opt.lstrip("-")
        name = options.synonyms.get(name, options.synonyms.get(
            name.replace("-", "_"), name))
        values[name] = value
        spelled.append((opt, value if opt in takes_value else None))
    return Given(values, spelled, rest)


#: Checks one ``[tunnel]`` value: ``(key, value)``; raises ``UsageError``.
OptionCheck = Callable[[str, str], None]


def file_arguments(path: str, role: str, replica: Optional[str],
                   given: Collection[str], table: OptionTable,
                   check: OptionCheck) -> List[str]:
    """The arguments ``--config path`` stands for, each value checked first.

    :param replica: the ``--replica`` value as given, if any.
    :param given: the options on the command line (``-p`` excludes a file).
    :raises usage.UsageError: ``FILE: [section] key: reason``.
    """
    if "proxy" in given:
        raise usage.UsageError("-p and --config exclude each other (put "
                               "the proxy pairs in the config file)")
    number: Optional[int] = None
    if replica is not None:
        if not replica.isdigit():
            raise usage.UsageError(f"invalid --replica: {replica!r} "
                                   f"(expected a replica number)")
        number = int(replica)
    try:
        cluster = load(path, table)
        args = cluster.argv(role, number)
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    for key, value, where in cluster.options:
        if role in table[key].roles:
            try:
                check(key, value)
            except usage.UsageError as e:
                raise usage.UsageError(f"{path}: {where}: {e}") from None
    return args


def expand_arguments(options: usage.Options, role: str, args: Sequence[str],
                     table: OptionTable, check: OptionCheck) -> Expanded:
    """The pre-pass of a tunnel end's parse: put ``--config FILE`` in front.

    :param options: the role's options about to parse ``args`` (their
        option names are read here).
    :param check: checks one of the file's values with the code the flag
        goes through.
    :raises usage.UsageError: the file or one of its values is unusable.
    """
    found = given_options(options, args)
    given = frozenset(found.values)
    path = found.values.get("config")
    if path is None or "help" in given:
        return Expanded(list(args), list(args), given)
    from_file = file_arguments(path, role, found.values.get("replica"), given, table, check)
    return Expanded(from_file + list(args),
                    from_file + found.without(("config", "replica")), given)
