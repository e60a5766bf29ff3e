"""systemd integration: ``sd_notify`` messages and socket activation.

Notifications (``sd_notify(3)``; sent only when ``NOTIFY_SOCKET`` is set,
so nothing changes outside systemd):

* ``READY=1`` once every listener is up (the reactor is running);
* ``RELOADING=1`` with ``MONOTONIC_USEC`` before a SIGHUP key reload, then
  ``READY=1`` and a ``STATUS=`` line saying how it went (this is what
  ``Type=notify-reload`` expects);
* ``STOPPING=1`` when SIGTERM starts the graceful shutdown;
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` when systemd asks for it
  (``WatchdogSec=``), from the reactor thread, so a stuck reactor stops it.

Socket activation: with ``--systemd-sockets`` each proxy pair adopts the
inherited socket named after its LISTEN port (``FileDescriptorName=4000``
for ``-p 127.0.0.1:4000,...``, as ``LISTEN_FDNAMES`` passes it), whatever
the order systemd passes the sockets in. When no inherited socket bears such
a name (a ``.socket`` unit without ``FileDescriptorName=`` names its sockets
after itself), pair *i* takes the *i*-th socket, in ``ListenStream=`` order.
Either way :func:`adopted_listen_descriptions` checks that each socket is
bound to the address its pair names, and the pair listens on it through
Twisted's ``systemd:domain=INET:index=N`` endpoint.
"""

import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall

from tigertunnel.config.model import ProxyPair
from tigertunnel.errors import ConfigError
from tigertunnel.logs import logger

log = logger("tigertunnel.systemd")

#: The first file descriptor systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3


class Notifier:
    """Sends ``sd_notify`` datagrams to ``NOTIFY_SOCKET``.

    :param address: the socket path (``@name`` for the abstract namespace);
        ``None`` makes every call a no-op.
    """

    def __init__(self, address: Optional[str]) -> None:
        self.address = address or None
        self._sock: Optional[socket.socket] = None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Optional[Mapping[str, str]] = None) -> "Notifier":
        """The notifier systemd asked for (a no-op one outside systemd)."""
        return cls((os.environ if environ is None else environ).get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram.

        :returns: whether it was sent; a failure is logged once, never raised.
        """
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(assignments).encode(), target)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warn("cannot notify systemd at {address}: {reason}",
                         address=self.address, reason=e.strerror or str(e))
            return False
        return True

    def close(self) -> None:
        """Close the datagram socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Optional[Mapping[str, str]] = None,
                      pid: Optional[int] = None) -> Optional[float]:
    """Seconds between two ``WATCHDOG=1``: half of ``WATCHDOG_USEC``.

    :returns: ``None`` when no watchdog is asked for this process
        (unset, invalid, or ``WATCHDOG_PID`` names another process).
    """
    if environ is None:
        environ = os.environ
    text = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(text)
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class SystemdService(Service):
    """Tells systemd about start-up, reloads, the watchdog and shutdown.

    Start it after the listeners (it is the last operations service), stop
    it first (``STOPPING=1`` before the connections drain).

    :param reactor: provides ``callWhenRunning``, and ``IReactorTime`` for
        the watchdog's clock.
    :param monotonic: ``CLOCK_MONOTONIC`` in seconds (``MONOTONIC_USEC``).
    """

    def __init__(self, notifier: Notifier, reactor: IReactorCore,
                 watchdog: Optional[float] = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self.reactor = reactor
        self.clock = IReactorTime(reactor)
        self.watchdog = watchdog
        self.monotonic = monotonic
        self._loop: Optional[LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if not self.running:
            return
        self.notifier.notify("READY=1", f"STATUS=tigertunnel running "
                             f"(pid {os.getpid()})", f"MAINPID={os.getpid()}")
        if self.watchdog is not None and self._loop is None:
            self._loop = LoopingCall(self.notifier.notify, "WATCHDOG=1")
            self._loop.clock = self.clock
            self._loop.start(self.watchdog, now=True)

    def stopService(self) -> None:
        super().stopService()
        self.notifier.notify("STOPPING=1", "STATUS=tigertunnel stopping")
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.notifier.close()

    def reloading(self) -> None:
        """A SIGHUP key reload starts."""
        usec = int(self.monotonic() * 1_000_000)
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={usec}",
                             "STATUS=reloading key files")

    def reloaded(self, ok: bool) -> None:
        """The key reload ended (``ok`` = the new keys are in use)."""
        status = ("keys reloaded" if ok else
                  "key reload failed, old keys kept (see the log)")
        self.notifier.notify("READY=1", f"STATUS={status}")


def _bound_address(fileno: int) -> Any:
    """``getsockname()`` of an inherited socket, without taking it over."""
    sock = socket.socket(fileno=os.dup(fileno))
    try:
        return sock.getsockname()
    finally:
        sock.close()


def bound_to_pair(pair: ProxyPair, bound: Any) -> bool:
    """Whether a socket's ``getsockname()`` is ``pair``'s listen address
    (only its port when the address is a host name)."""
    if not isinstance(bound, tuple) or bound[1] != pair.listen.port:
        return False
    host = pair.listen.host
    try:
        wanted = ipaddress.ip_address(host) if host else None
    except ValueError:
        return True  # a host name: only the port can be compared
    if wanted is None:
        return ipaddress.ip_address(bound[0]).is_unspecified
    return ipaddress.ip_address(bound[0].split("%")[0]) == wanted


@dataclass(frozen=True)
class InheritedSocket:
    """One socket systemd passed (``sd_listen_fds_with_names(3)``)."""

    #: Its position among the passed sockets (``systemd:...:index=N``).
    index: int
    fileno: int
    #: Its ``FileDescriptorName=`` (``""`` when systemd passed no names).
    name: str = ""


def socket_name(pair: ProxyPair) -> str:
    """The ``FileDescriptorName=`` of ``pair``'s socket: its LISTEN port."""
    return str(pair.listen.port)


def inherited_sockets(environ: Optional[Mapping[str, str]] = None) -> List[InheritedSocket]:
    """The sockets systemd passed to this process, in order, with their names.

    The descriptors come from Twisted's ``systemd:`` endpoint parser, which
    read (and removed) ``LISTEN_PID`` and ``LISTEN_FDS`` when
    ``twisted.internet.endpoints`` was imported; the names from
    ``LISTEN_FDNAMES``, which it leaves in the environment.
    """
    from twisted.internet.endpoints import serverFromString

    filenos: List[int] = []
    while True:
        try:
            endpoint = serverFromString(
                None, f"systemd:domain=INET:index={len(filenos)}")
        except IndexError:
            break
        filenos.append(int(endpoint.fileno))
    text = (os.environ if environ is None else environ).get("LISTEN_FDNAMES", "")
    names = text.split(":") if text else []
    if len(names) != len(filenos):
        names = [""] * len(filenos)
    return [InheritedSocket(i, fd, name)
            for i, (fd, name) in enumerate(zip(filenos, names))]


def _family(sock: InheritedSocket, pair: ProxyPair) -> Tuple[str, Any]:
    """``(INET or INET6, getsockname())`` of ``sock``.

    :raises ConfigError: it is not a socket.
    """
    try:
        bound = _bound_address(sock.fileno)
    except OSError as e:
        raise ConfigError(f"--systemd-sockets: inherited descriptor "
                          f"{sock.fileno} (for {pair.name}) is not a socket: "
                          f"{e.strerror}") from None
    return ("INET6" if ":" in str(bound[0] if isinstance(bound, tuple) else "")
            else "INET"), bound


def adopted_listen_descriptions(
        pairs: Sequence[ProxyPair],
        inherited: Optional[Sequence[InheritedSocket]] = None) -> Dict[int, str]:
    """Map each pair index to the ``systemd:`` endpoint of its inherited socket.

    A pair takes the socket named :func:`socket_name` (of the sockets with
    that name, the one bound to its LISTEN address); when no passed socket
    bears the name of any pair, pair *i* takes the *i*-th socket.

    :param inherited: the passed sockets (:func:`inherited_sockets` by
        default).
    :returns: ``{pair index: "systemd:domain=INET:index=N"}``.
    :raises ConfigError: one line: a pair's named socket is missing (naming
        the name and the names passed), fewer sockets than pairs, or a
        socket bound to another address than its pair's LISTEN address.
    """
    if inherited is None:
        inherited = inherited_sockets()
    by_name = any(s.name == socket_name(p) for s in inherited for p in pairs)
    taken: Set[int] = set()
    result = {}
    for position, pair in enumerate(pairs):
        if by_name:
            name = socket_name(pair)
            candidates = [s for s in inherited
                          if s.name == name and s.index not in taken]
            if not candidates:
                passed = ", ".join(repr(s.name) for s in inherited) or "none"
                raise ConfigError(
                    f"--systemd-sockets: no inherited socket named {name!r} "
                    f"for {pair.name} ({pair.listen}); systemd passed {passed} "
                    f"(FileDescriptorName= of each .socket unit: the LISTEN "
                    f"port of its pair)")
        elif position < len(inherited):
            candidates = [inherited[position]]
        else:
            raise ConfigError(f"--systemd-sockets: systemd passed "
                              f"{len(inherited)} sockets for {len(pairs)} proxy "
                              f"pairs (name each after its pair's LISTEN port "
                              f"with FileDescriptorName=, or give one "
                              f"ListenStream= per -p, in order)")
        found = [(sock, *_family(sock, pair)) for sock in candidates]
        chosen = [(sock, family) for sock, family, bound in found
                  if bound_to_pair(pair, bound)]
        if not chosen:
            sock, _, bound = found[0]
            what = f"socket {sock.name!r}" if by_name else f"socket {sock.index}"
            raise ConfigError(f"--systemd-sockets: {pair.name} listens on "
                              f"{pair.listen} but inherited {what} is bound "
                              f"to {bound!r}")
        sock, family = chosen[0]
        taken.add(sock.index)
        result[pair.index] = f"systemd:domain={family}:index={sock.index}"
    return result
