"""The listeners of a tunnel end: where TB clients or pool connections arrive.

Each proxy pair listens on its ``-p`` address (TB clients on a tunnel
client, pool connections on a tunnel server), on a ``systemd:`` socket
handed over by socket activation, or, in a ``--workers`` worker, on the
socket inherited from worker 0. A port that cannot be bound is fatal at
start-up with a one-line :class:`~tigertunnel.errors.ListenError`
(:func:`start_listening`, also used by the metrics listener).
"""

import ipaddress
from typing import Any, Callable, Dict, List, Optional, Protocol, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from zope.interface import implementer

from tigertunnel.config.model import ProxyPair, TunnelConfig, listen_description
from tigertunnel.errors import ListenError
from tigertunnel.interfaces import Reactor
from tigertunnel.net import twisted_private
from tigertunnel.net.sockets import socket_family


def listen_error(where: str, error: CannotListenError) -> ListenError:
    """The fatal error of a port that cannot be bound, in one line:
    ``cannot listen on WHERE: REASON`` (the system's words for the reason)."""
    reason = error.socketError
    text = getattr(reason, "strerror", None) or str(reason)
    return ListenError(f"cannot listen on {where}: {text}")


def start_listening(start: Callable[[], None], where: str) -> None:
    """Call ``start`` (a service's start-up), turning a port that cannot be
    bound into :func:`listen_error`'s one-line error.

    :raises ListenError: naming ``where`` and the reason.
    """
    try:
        start()
    except CannotListenError as e:
        raise listen_error(where, e) from None


def endpoint_is_local(description: str) -> bool:
    """Whether a server endpoint description listens only where other hosts
    cannot connect: a TCP interface on loopback (``127.0.0.0/8``, ``::1``,
    ``localhost``) or a UNIX socket. Anything else, including a TCP
    endpoint without ``interface=`` (all addresses), is not.

    :raises ValueError: and the other errors of ``serverFromString`` for a
        malformed description.
    """
    endpoint = serverFromString(None, description)
    if isinstance(endpoint, UNIXServerEndpoint):
        return True
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint,
                                          SSL4ServerEndpoint)):
        return False
    interface = description_arguments(description).get("interface", "")
    if not interface:
        return False
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface.split("%")[0]).is_loopback
    except ValueError:
        return False


def description_arguments(description: str) -> Dict[str, str]:
    """The ``key=value`` arguments of an endpoint description, unescaped
    as ``serverFromString`` reads them (``\\`` escapes the next character,
    so ``interface=\\:\\:1`` is ``::1``)."""
    fields: List[str] = [""]
    escaped = False
    for char in description:
        if escaped:
            fields[-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("")
        else:
            fields[-1] += char
    found: Dict[str, str] = {}
    for field in fields[1:]:
        key, equals, value = field.partition("=")
        if equals:
            found[key] = value
    return found


def pair_listen_description(config: TunnelConfig, pair: ProxyPair) -> str:
    """The server endpoint description a pair listens on.

    ``config.listen_overrides`` may give another description for the pair
    (a ``systemd:`` socket handed over by socket activation).
    """
    override = config.listen_overrides.get(pair.index)
    return str(override) if override else listen_description(pair.listen)


class AcceptingPort(Protocol):
    """What a listener uses of its listening port (Twisted's ``tcp.Port``)."""

    def startReading(self) -> None:
        """Accept connections."""

    def stopReading(self) -> None:
        """Leave connections in the accept queue."""

    def fileno(self) -> int:
        """The listening socket's descriptor (handed to worker processes)."""


class AcceptGate(Protocol):
    """Decides, at each accept, whether this worker takes the next
    connection (:class:`~tigertunnel.ops.workers.balance.PairGate`)."""

    def may_accept(self) -> bool:
        """Whether to take the next connection now."""

    def accepted(self) -> None:
        """A connection was taken."""

    def paused(self) -> None:
        """The listener stopped reading, leaving connections to the others."""


@implementer(IStreamServerEndpoint)
class _Announcing:
    """An endpoint that hands the port it listens on to ``listening``
    (whose result is the port the service keeps)."""

    def __init__(self, endpoint: IStreamServerEndpoint,
                 listening: Callable[[Any], Any]) -> None:
        self._endpoint = endpoint
        self._announce = listening

    def listen(self, protocolFactory: IProtocolFactory) -> "Deferred[Any]":
        """Listen on the wrapped endpoint; the port goes to ``listening``."""
        return self._endpoint.listen(protocolFactory).addCallback(self._announce)


class ListenerService(StreamServerEndpointService):
    """A pair's listening service; keeps its port (``--workers`` hands the
    socket to the worker processes).

    :ivar held: accept nothing until :meth:`release` (a client worker
        leaves the connections on the shared socket to the other workers
        until its own pool is up).
    :ivar gate: with ``--workers``, asked before each accept; the listener
        then takes one connection per wake-up, and when the gate says no it
        stops reading (:attr:`paused`) until :meth:`resume`.
    """

    #: The listening port, once bound.
    port: Optional[AcceptingPort] = None
    held = False
    gate: Optional[AcceptGate] = None
    paused = False

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        super().__init__(_Announcing(endpoint, self._listening), factory)

    def _listening(self, port: Any) -> Any:
        self.port = cast(AcceptingPort, port)
        if self.gate is not None:
            self._gate_accepts(self.port, self.gate)
        if self.held:
            self.port.stopReading()
        return port

    def _gate_accepts(self, port: AcceptingPort, gate: AcceptGate) -> None:
        """Put ``gate`` in front of the port's accept loop: Twisted's
        ``tcp.Port.doRead`` accepts as many connections as are waiting;
        this one asks the gate and accepts one
        (:func:`~tigertunnel.net.twisted_private.gate_accepts`; without it
        every worker accepts as Twisted does)."""
        def refused() -> None:
            self.paused = True
            port.stopReading()
            gate.paused()

        twisted_private.gate_accepts(port, gate.may_accept, gate.accepted, refused)

    def release(self) -> None:
        """Start accepting (once)."""
        if self.held:
            self.held = False
            if self.port is not None and not self.paused:
                self.port.startReading()

    def resume(self) -> None:
        """Accept again after the gate paused this listener (not while
        held, nor once the service stopped)."""
        if self.paused:
            self.paused = False
            if self.port is not None and self.running and not self.held:
                self.port.startReading()


def pair_listener(config: TunnelConfig, pair: ProxyPair, factory: Factory,
                  reactor: Reactor) -> ListenerService:
    """The listening service of a pair.

    A worker process (``--workers``) accepts on the socket it inherited from
    worker 0; otherwise the pair's address (or its systemd socket) is used.
    """
    inherited = config.inherited_fds.get(pair.index)
    endpoint: IStreamServerEndpoint
    if inherited is not None:
        endpoint = AdoptedStreamServerEndpoint(reactor, inherited,
                                               socket_family(inherited))
    else:
        endpoint = serverFromString(reactor,
                                    pair_listen_description(config, pair))
    service = ListenerService(endpoint, factory)
    twisted_private.raise_listen_errors(service)  # as strports.service does
    return service
