"""The top-level service of a tunnel end, and its graceful shutdown.

On SIGTERM (twistd stops the reactor, which stops this service) a tunnel end
shuts down in this order, within ``--shutdown-timeout`` seconds:

1. the operations services stop first (systemd hears ``STOPPING=1``, the
   SIGHUP handler is restored);
2. every listener stops accepting (TB clients on a tunnel client, pool
   connections on a tunnel server), and no new session or stream is taken;
3. every session is closed gracefully: what was already received is still
   written to its TB peer (the replica on a server, the TB client on a
   client) and its ``stream_close`` goes to the other tunnel end;
4. once the sessions are gone, the pool connections are closed cleanly
   (everything written before is delivered, then FIN);
5. the metrics listener stops last, so a scrape during the drain works.

Whatever is still open when the timeout expires is aborted, so the process
always exits. With ``handle_sigterm`` our own SIGTERM handler replaces the
reactor's once it runs: the reactor's makes ``twistd`` end by re-raising
SIGTERM, ours stops the reactor the same way but lets ``twistd`` exit with
status 0 (and remove its pidfile) after a graceful shutdown.
"""

import signal
import threading
from types import FrameType
from typing import Any, Callable, List, Optional, Protocol

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from tigertunnel.config.model import DEFAULT_SHUTDOWN_TIMEOUT
from tigertunnel.interfaces import Reactor
from tigertunnel.logs import logger
from tigertunnel.net.multiplexer import ServerMultiplexer, SessionMultiplexer
from tigertunnel.net.pool import PoolSlot
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.ops.reload import SignalHandler

#: Seconds between two looks at the connections still draining.
POLL_INTERVAL = 0.02
#: Seconds to wait for aborted connections to be gone after the timeout.
ABORT_GRACE = 1.0

log = logger(__name__)


class ProcessReactor(Reactor, Protocol):
    """The reactor calls of a graceful shutdown: time, start-up hooks,
    signal hops and stopping the reactor."""

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any,
                        **kw: Any) -> Any:
        """Call ``callable`` once the reactor runs."""

    def callFromThread(self, callable: Callable[..., Any], *args: Any,
                       **kw: Any) -> None:
        """Call ``callable`` in the reactor thread (safe from a signal)."""

    def stop(self) -> None:
        """Stop the reactor."""


class TunnelService(MultiService):
    """Parent of a tunnel end's multiplexers and operations services.

    Its children are the :class:`~tigertunnel.net.pairmux.SessionMultiplexer` of every proxy pair;
    operations services (reload, systemd, metrics) are kept apart, started
    after the children and stopped around the drain.

    :param clock: the reactor (or a ``MemoryReactorClock``).
    :param shutdown_timeout: seconds the graceful stop may take.
    """

    def __init__(self, clock: ProcessReactor,
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
                 handle_sigterm: bool = False) -> None:
        super().__init__()
        self.clock = clock
        self.shutdown_timeout = shutdown_timeout
        self.handle_sigterm = handle_sigterm
        self._previous_sigterm: SignalHandler = None
        self._sigterm_installed = False
        self.early: List[IService] = []
        self.late: List[IService] = []
        self._aborted = False
        self._given_up = False
        self._waiters: List["defer.Deferred[None]"] = []
        #: The ports are bound (``privilegedStartService`` ran).
        self.bound = False

    @property
    def multiplexers(self) -> List[SessionMultiplexer]:
        """The multiplexers of every proxy pair."""
        return [s for s in self if isinstance(s, SessionMultiplexer)]

    def add_operation(self, service: IService, stop_last: bool = False) -> None:
        """Add an operations service; ``stop_last`` keeps it up during the drain."""
        (self.late if stop_last else self.early).append(service)

    def privilegedStartService(self) -> None:
        """Bind the ports, once: under twistd they are bound before it
        daemonizes (:mod:`tigertunnel.ops.startup`), and twistd's own call
        afterwards does nothing."""
        if self.bound:
            return
        self.bound = True
        super().privilegedStartService()
        for service in self.late + self.early:
            service.privilegedStartService()

    def startService(self) -> None:
        super().startService()
        for service in self.late + self.early:
            service.startService()
        if self.handle_sigterm:
            self.clock.callWhenRunning(self._install_sigterm)

    def _install_sigterm(self) -> None:
        if not self.running or threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _on_sigterm(self, signum: int, frame: Optional[FrameType]) -> None:
        self.clock.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        if not self.running:
            return  # already shutting down
        log.info("SIGTERM: shutting down gracefully (at most {timeout} s)",
                 timeout=self.shutdown_timeout)
        self.clock.stop()

    def _restore_sigterm(self) -> None:
        if self._sigterm_installed:
            signal.signal(signal.SIGTERM, self._previous_sigterm
                          if self._previous_sigterm is not None else signal.SIG_DFL)
            self._sigterm_installed = False

    def stopService(self) -> "defer.Deferred[None]":
        """Drain and stop (see the module docstring); never fails."""
        Service.stopService(self)
        self.bound = False
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        try:
            for service in reversed(self.early):
                await defer.maybeDeferred(service.stopService)
            await self._drain()
            for service in reversed(self.late):
                await defer.maybeDeferred(service.stopService)
        except Exception:
            log.failure("while shutting down")
        finally:
            self._restore_sigterm()

    async def _drain(self) -> None:
        muxes = self.multiplexers
        self._aborted = self._given_up = False
        deadline: IDelayedCall = self.clock.callLater(
            self.shutdown_timeout, self._abort, muxes)
        give_up: IDelayedCall = self.clock.callLater(
            self.shutdown_timeout + ABORT_GRACE, self._give_up)
        try:
            stops: "List[defer.Deferred[Any]]" = []
            for mux in muxes:
                mux.stopping = True
                for child in mux:
                    if not isinstance(child, PoolSlot):
                        stops.append(defer.maybeDeferred(child.stopService))
            await self._wait(defer.gatherResults(stops, consumeErrors=True))
            count = sum(len(mux.sessions) for mux in muxes)
            if count:
                log.info("shutting down: closing {count} sessions", count=count)
            for mux in muxes:
                for session in list(mux.sessions):
                    session.close()
            await self._until(lambda: not any(m.sessions for m in muxes))
            self._close_server_connections(muxes)
            closing = [defer.maybeDeferred(mux.stopService) for mux in muxes]
            await self._wait(defer.gatherResults(closing, consumeErrors=True))
            await self._until(lambda: not self._close_server_connections(muxes))
        finally:
            for call in (deadline, give_up):
                if call.active():
                    call.cancel()

    async def _wait(self, d: "defer.Deferred[Any]") -> None:
        """Wait for ``d``, or until the shutdown gives up."""
        if self._given_up:
            return
        waiter: "defer.Deferred[None]" = defer.Deferred()
        self._waiters.append(waiter)

        def done(result: Any) -> None:
            if not waiter.called:
                waiter.callback(None)

        d.addBoth(done)
        await waiter

    def _give_up(self) -> None:
        self._given_up = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    async def _until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()``, or until the shutdown gives up."""
        while not done() and not self._given_up:
            await task.deferLater(IReactorTime(self.clock), POLL_INTERVAL,
                                  lambda: None)

    @staticmethod
    def _close_server_connections(muxes: List[SessionMultiplexer]) -> bool:
        """Close a server's pool connections (again: some may be new).

        A client's pool slots close their own when they stop.

        :returns: whether any pool connection is still there.
        """
        left = False
        for mux in muxes:
            if isinstance(mux, ServerMultiplexer):
                for connection in _connections(mux):
                    connection.close_gracefully()
            left = left or bool(mux.pool_connections)
        return left

    def _abort(self, muxes: List[SessionMultiplexer]) -> None:
        self._aborted = True
        sessions = sum(len(m.sessions) for m in muxes)
        connections = sum(len(m.pool_connections) for m in muxes)
        log.warn("shutdown timeout ({timeout} s): aborting {sessions} sessions "
                 "and {pool_connections} pool connections",
                 timeout=self.shutdown_timeout, sessions=sessions,
                 pool_connections=connections)
        for mux in muxes:
            for session in list(mux.sessions):
                session.close(abort=True)
            for connection in _connections(mux):
                connection.abort()


def _connections(mux: SessionMultiplexer) -> List[TunnelProtocol]:
    """The established pool connections of ``mux`` and (tunnel server)
    those still in their handshake."""
    connections = list(mux.pool_connections)
    if isinstance(mux, ServerMultiplexer):
        connections += list(mux.pending)
    return connections
