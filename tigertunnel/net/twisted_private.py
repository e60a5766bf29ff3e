"""Every use of a name private to Twisted, checked against Twisted when imported.

Twisted has no public API for four things tigertunnel does; they are here,
and only here (``tests/test_twisted_private.py`` reads the package's
sources and fails if another module names anything private to Twisted):

* :data:`LEAN_REACTOR`: :class:`LeanLoop`, the event dispatch and main loop
  of :class:`~tigertunnel.net.reactor.LeanEPollReactor`, reads the epoll
  reactor's poller, its selectables, its timed-call queues and its
  started/stopped flags, and calls its ``_doReadOrWrite`` and
  ``_insertNewDelayedCalls``.
* :data:`DIRECT_SEND`: :func:`direct_send` reads a TCP transport's
  write queue (``dataBuffer`` from ``offset``, ``_tempDataLen``) and
  ``_writeDisconnected``, so that
  :func:`~tigertunnel.net.sockets.direct_sender` may send straight to the
  socket when nothing is queued.
* :data:`GATED_ACCEPT`: :func:`gate_accepts` puts a gate in front of a
  listening ``tcp.Port``'s ``doRead`` and sets its ``numberAccepts`` (with
  ``--workers``, one accept per wake-up, when the gate says so).
* :data:`SYNC_LISTEN_ERRORS`: :func:`raise_listen_errors` sets a
  ``StreamServerEndpointService``'s ``_raiseSynchronously``, as
  ``twisted.application.strports.service`` does, so that a port that
  cannot be bound fails start-up instead of being logged.

At import, each feature's names are looked up in the installed Twisted (on
the class, or among the attribute names its ``__init__`` or the named
method stores) and the signatures it calls are compared. A feature whose
check fails is off and its callers keep Twisted's stock behaviour: the stock
epoll reactor, ``transport.write`` for every send, Twisted's own accept loop,
listen errors logged by the service. One warning, logged at import (so at
start-up), names the missing names and what is used instead.
"""

import errno
import inspect
from types import CodeType
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.python import log

from tigertunnel.logs import logger

__all__ = [
    "LEAN_REACTOR", "DIRECT_SEND", "GATED_ACCEPT", "SYNC_LISTEN_ERRORS",
    "MISSING", "LeanLoop", "direct_send", "gate_accepts",
    "raise_listen_errors", "check", "LONGEST_WAIT",
]

#: The longest poll timeout, in seconds: epoll_wait takes a C int of ms
#: (Twisted's ``timeout`` uses the same bound).
LONGEST_WAIT = 2147483

_log = logger(__name__)


def _stored_names(code: CodeType) -> Set[str]:
    """The names ``code`` (and the functions nested in it) uses as attributes."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _stored_names(const)
    return names


def _method_names(cls: type, method: str) -> Set[str]:
    """The attribute names used by ``method`` of every class in ``cls``'s MRO."""
    names: Set[str] = set()
    for klass in cls.__mro__:
        function = vars(klass).get(method)
        code = getattr(function, "__code__", None)
        if isinstance(code, CodeType):
            names |= _stored_names(code)
    return names


def check(cls: type, attributes: Iterable[str], set_in: Tuple[str, ...] = ("__init__",),
          signatures: Optional[Dict[str, List[str]]] = None,
          read_by: Tuple[str, ...] = ()) -> List[str]:
    """The names of ``cls`` that are missing (empty when all are there).

    :param attributes: names that must be attributes of ``cls``, or be
        used as attributes by one of the methods ``set_in`` (names an
        ``__init__`` stores on the instance are not on the class).
    :param signatures: method name to its parameter names (``self``
        included); a method with other parameters counts as missing.
    :param read_by: methods that must use each of ``attributes`` (an
        attribute they no longer read counts as missing).
    """
    used: Set[str] = set()
    for method in set_in:
        used |= _method_names(cls, method)
    reads: Optional[Set[str]] = None
    if read_by:
        reads = set()
        for method in read_by:
            reads |= _method_names(cls, method)
    missing = [f"{cls.__name__}.{name}" for name in attributes
               if (not hasattr(cls, name) and name not in used)
               or (reads is not None and name not in reads)]
    for name, parameters in (signatures or {}).items():
        try:
            found = list(inspect.signature(getattr(cls, name)).parameters)
        except (AttributeError, TypeError, ValueError):
            found = []
        if found != parameters:
            missing.append(f"{cls.__name__}.{name}({', '.join(parameters[1:])})")
    return missing


#: Per feature, the Twisted names it needs that this Twisted lacks.
MISSING: Dict[str, List[str]] = {
    "the lean epoll reactor": check(
        EPollReactor,
        ["_poller", "_selectables", "_started", "_justStopped", "_pendingTimedCalls",
         "_newTimedCalls", "threadCallQueue", "running", "runUntilCurrent", "seconds"],
        signatures={"_doReadOrWrite": ["self", "selectable", "fd", "event"],
                    "_insertNewDelayedCalls": ["self"]}),
    "direct sends": check(
        tcp.Connection,
        ["_tempDataLen", "dataBuffer", "offset", "_writeDisconnected", "connected",
         "disconnecting", "socket"]),
    "gated accepts (--workers)": check(
        tcp.Port, ["numberAccepts"], set_in=("startListening",), read_by=("doRead",)),
    "listen errors at start-up": check(
        StreamServerEndpointService, ["_raiseSynchronously"], set_in=(),
        read_by=("privilegedStartService",)),
}

#: Whether :class:`LeanLoop` can run on this Twisted.
LEAN_REACTOR = not MISSING["the lean epoll reactor"]
#: Whether :func:`direct_send` can read a transport's write queue.
DIRECT_SEND = not MISSING["direct sends"]
#: Whether :func:`gate_accepts` can gate a port's accept loop.
GATED_ACCEPT = not MISSING["gated accepts (--workers)"]
#: Whether :func:`raise_listen_errors` can make listen errors fatal.
SYNC_LISTEN_ERRORS = not MISSING["listen errors at start-up"]

#: What each feature's callers do instead when it is off.
FALLBACKS = {
    "the lean epoll reactor": "the stock epoll reactor",
    "direct sends": "transport.write for every send",
    "gated accepts (--workers)": "Twisted's accept loop in every worker",
    "listen errors at start-up": "listen errors logged, not fatal",
}


def _report() -> None:
    """One warning naming what this Twisted lacks and what is used instead."""
    off = [feature for feature, names in MISSING.items() if names]
    if not off:
        return
    _log.warn("Twisted {version} lacks {names}: using {fallbacks}",
              version=twisted.__version__,
              names=", ".join(name for feature in off for name in MISSING[feature]),
              fallbacks="; ".join(FALLBACKS[feature] for feature in off))


_report()


class LeanLoop:
    """The event dispatch and main loop of the lean epoll reactor; mixed
    into :class:`~twisted.internet.epollreactor.EPollReactor` by
    :class:`~tigertunnel.net.reactor.LeanEPollReactor` (whose docstring
    says what changes). Only used when :data:`LEAN_REACTOR`."""

    _poller: Any
    _selectables: Dict[int, Any]
    _started: bool
    _justStopped: bool
    _pendingTimedCalls: List[Any]
    _newTimedCalls: List[Any]
    threadCallQueue: List[Any]
    running: bool
    _doReadOrWrite: Callable[[Any, int, int], None]
    _insertNewDelayedCalls: Callable[[], None]
    runUntilCurrent: Callable[[], None]
    seconds: Callable[[], float]

    def doPoll(self, timeout: Optional[float]) -> None:
        """Poll for events and handle each one; ``None`` waits indefinitely."""
        try:
            events = self._poller.poll(-1 if timeout is None else timeout,
                                       len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise  # a programming error, as in EPollReactor
        selectable_of = self._selectables.get
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable: Any = selectable_of(fd)
            if selectable is None:
                continue  # removed by an earlier event of this poll
            try:
                handle(selectable, fd, event)
            except BaseException:
                # _doReadOrWrite catches what a transport raises; this is
                # its disconnect path failing: log it, keep serving.
                log.err(None, "error handling a socket event")

    doIteration = doPoll

    def mainLoop(self) -> None:
        """Turn until stopped; an exception escaping a turn is logged and
        the loop goes on (as in Twisted's ``mainLoop``)."""
        while self._started:
            try:
                self._turn_until_stopped()
            except BaseException:
                _log.failure("Unexpected error in main loop")
        _log.info("Main loop terminated.")

    def _turn_until_stopped(self) -> None:
        seconds = self.seconds
        poll = self.doPoll
        while self._started:
            now = seconds()
            pending = self._pendingTimedCalls
            if (self.threadCallQueue or self._newTimedCalls or self._justStopped
                    or (pending and pending[0].time <= now)):
                self.runUntilCurrent()
                # Calls made by the calls just run; Twisted's timeout()
                # inserts them the same way.
                self._insertNewDelayedCalls()
                now = seconds()
                pending = self._pendingTimedCalls
            if not self.running:
                wait: Optional[float] = 0.0
            elif not pending:
                wait = None
            else:
                wait = pending[0].time - now
                if wait < 0.0:
                    wait = 0.0
                elif wait > LONGEST_WAIT:
                    wait = LONGEST_WAIT
            poll(wait)


def direct_send(transport: Any) -> Callable[["bytes | bytearray"], None]:
    """The sender of :func:`~tigertunnel.net.sockets.direct_sender` for a
    Twisted TCP transport (a ``tcp.Connection``; only when :data:`DIRECT_SEND`).

    When the transport holds nothing queued to write (``dataBuffer`` from
    ``offset``, ``_tempDataLen``) and may still be written to, the data
    goes to its socket; what the kernel does not take, or all of it on an
    error, goes to the transport's ``write``, behind which Twisted meets
    the error and disconnects as usual.
    """
    t = transport
    send = transport.socket.send
    write = transport.write

    def send_direct(data: "bytes | bytearray") -> None:
        if (not t._tempDataLen and t.offset == len(t.dataBuffer) and t.connected
                and not t.disconnecting and not t._writeDisconnected):
            try:
                sent = send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # Twisted's next send meets the error and disconnects
            if sent == len(data):
                return
            if sent:
                write(bytes(memoryview(data)[sent:]))
                return
        write(bytes(data))

    return send_direct


def gate_accepts(port: Any, may_accept: Callable[[], bool],
                 accepted: Callable[[], None], refused: Callable[[], None]) -> bool:
    """Put a gate in front of a listening ``tcp.Port``'s accept loop.

    Twisted's ``tcp.Port.doRead`` accepts as many connections as are
    waiting; gated, each wake-up asks ``may_accept``: yes accepts one
    connection and calls ``accepted``, no calls ``refused`` (which stops the
    port reading).

    :returns: whether the gate is in place (``False`` without
        :data:`GATED_ACCEPT`, or for a port that is not a reading file
        descriptor, such as a memory reactor's: the port accepts as Twisted
        does).
    """
    accept_waiting = getattr(port, "doRead", None)
    if not GATED_ACCEPT or accept_waiting is None:
        return False

    def doRead() -> Any:
        if not may_accept():
            refused()
            return None
        port.numberAccepts = 1
        try:
            return accept_waiting()
        finally:
            accepted()

    setattr(port, "doRead", doRead)
    return True


def raise_listen_errors(service: StreamServerEndpointService) -> bool:
    """Make the service's ``privilegedStartService`` raise when its port
    cannot be bound (as ``strports.service`` does), rather than log it.

    :returns: whether it will (``False`` without :data:`SYNC_LISTEN_ERRORS`).
    """
    if SYNC_LISTEN_ERRORS:
        service._raiseSynchronously = True
    return SYNC_LISTEN_ERRORS
