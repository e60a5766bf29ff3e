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

Socket activation: with ``--systemd-sockets`` pair *i* adopts the *i*-th
socket systemd passes (``ListenStream=`` lines, in order) through
Twisted's ``systemd:domain=INET:index=i`` endpoint;
:func:`adopted_listen_descriptions` checks that each inherited socket is
bound to the address the pair names.
"""

import ipaddress
import os
import socket
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

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


def inherited_fileno(index: int) -> int:
    """The file descriptor of the ``index``-th socket systemd passed.

    Asks Twisted's ``systemd:`` endpoint parser, which read (and removed)
    ``LISTEN_FDS`` when ``twisted.internet.endpoints`` was imported.

    :raises IndexError: fewer sockets were passed.
    """
    from twisted.internet.endpoints import serverFromString

    endpoint = serverFromString(None, f"systemd:domain=INET:index={index}")
    return int(endpoint.fileno)


def adopted_listen_descriptions(
        pairs: Sequence[ProxyPair],
        fileno: Callable[[int], int] = inherited_fileno) -> Dict[int, str]:
    """Map each pair index to the ``systemd:`` endpoint of its inherited socket.

    :param fileno: the descriptor of the *n*-th inherited socket; raises
        ``IndexError`` past the last.
    :returns: ``{pair index: "systemd:domain=INET:index=N"}``.
    :raises ConfigError: fewer sockets than pairs, or a socket bound to
        another address than its pair's listen address.
    """
    result = {}
    for index, pair in enumerate(pairs):
        try:
            fd = fileno(index)
        except IndexError:
            raise ConfigError(f"--systemd-sockets: systemd passed {index} "
                              f"sockets for {len(pairs)} proxy pairs (one "
                              f"ListenStream= per -p, in order)") from None
        try:
            bound = _bound_address(fd)
        except OSError as e:
            raise ConfigError(f"--systemd-sockets: inherited descriptor {fd} "
                              f"is not a socket: {e.strerror}") from None
        if not bound_to_pair(pair, bound):
            raise ConfigError(f"--systemd-sockets: {pair.name} listens on "
                              f"{pair.listen} but inherited socket {index} is "
                              f"bound to {bound!r}")
        family = "INET6" if ":" in str(bound[0]) else "INET"
        result[pair.index] = f"systemd:domain={family}:index={index}"
    return result
