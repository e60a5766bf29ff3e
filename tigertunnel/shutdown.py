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
always exits (status 0 under twistd, which also removes its pidfile).
"""

from typing import Any, Callable, List

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall

from tigertunnel.logs import logger
from tigertunnel.services import ClientMultiplexer, PoolSlot, SessionMultiplexer

#: Default seconds a graceful shutdown may take before connections are aborted.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
#: Seconds between two looks at the connections still draining.
POLL_INTERVAL = 0.02
#: Seconds to wait for aborted connections to be gone after the timeout.
ABORT_GRACE = 1.0

log = logger("tigertunnel.shutdown")


class TunnelService(MultiService):
    """Parent of a tunnel end's multiplexers and operations services.

    Its children are the :class:`SessionMultiplexer` of every proxy pair;
    operations services (reload, systemd, metrics) are kept apart, started
    after the children and stopped around the drain.

    :param clock: the reactor (or a ``MemoryReactorClock``).
    :param shutdown_timeout: seconds the graceful stop may take.
    """

    def __init__(self, clock: Any,
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        super().__init__()
        self.clock = clock
        self.shutdown_timeout = shutdown_timeout
        self.early: List[IService] = []
        self.late: List[IService] = []
        self._deadline: Any = None
        self._aborted = False

    @property
    def multiplexers(self) -> List[SessionMultiplexer]:
        """The multiplexers of every proxy pair."""
        return [s for s in self if isinstance(s, SessionMultiplexer)]

    def add_operation(self, service: IService, stop_last: bool = False) -> None:
        """Add an operations service; ``stop_last`` keeps it up during the drain."""
        (self.late if stop_last else self.early).append(service)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for service in self.late + self.early:
            service.privilegedStartService()

    def startService(self) -> None:
        super().startService()
        for service in self.late + self.early:
            service.startService()

    def stopService(self) -> "defer.Deferred[None]":
        """Drain and stop (see the module docstring); never fails."""
        Service.stopService(self)
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

    async def _drain(self) -> None:
        muxes = self.multiplexers
        self._aborted = False
        deadline: IDelayedCall = self.clock.callLater(
            self.shutdown_timeout, self._abort, muxes)
        try:
            stops = []
            for mux in muxes:
                mux.stopping = True
                for child in mux:
                    if not isinstance(child, PoolSlot):
                        stops.append(defer.maybeDeferred(child.stopService))
            await defer.gatherResults(stops, consumeErrors=True)
            count = sum(len(mux.sessions) for mux in muxes)
            if count:
                log.info("shutting down: closing {count} sessions", count=count)
            for mux in muxes:
                for session in list(mux.sessions):
                    session.close()
            await self._until(lambda: not any(m.sessions for m in muxes))
            closing = []
            for mux in muxes:
                if not isinstance(mux, ClientMultiplexer):
                    # A client's pool slots close their own connections.
                    for link in list(mux.links) + list(getattr(mux, "pending", ())):
                        link.transport.loseConnection()
                closing.append(defer.maybeDeferred(mux.stopService))
            await defer.gatherResults(closing, consumeErrors=True)
            await self._until(lambda: not any(m.links for m in muxes))
        finally:
            if deadline.active():
                deadline.cancel()

    async def _until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()``, the timeout, or shortly after an abort."""
        waited_after_abort = 0.0
        while not done():
            if self._aborted:
                if waited_after_abort >= ABORT_GRACE:
                    return
                waited_after_abort += POLL_INTERVAL
            await task.deferLater(self.clock, POLL_INTERVAL, lambda: None)

    def _abort(self, muxes: List[SessionMultiplexer]) -> None:
        self._aborted = True
        sessions = sum(len(m.sessions) for m in muxes)
        links = sum(len(m.links) for m in muxes)
        log.warn("shutdown timeout ({timeout} s): aborting {sessions} sessions "
                 "and {links} pool connections", timeout=self.shutdown_timeout,
                 sessions=sessions, links=links)
        for mux in muxes:
            for session in list(mux.sessions):
                if session.transport is not None:
                    session.transport.abortConnection()
                else:
                    session.close(abort=True)
            for link in list(mux.links) + list(getattr(mux, "pending", ())):
                link.transport.abortConnection()
