"""Backend reachability of a tunnel server: a periodic connect to each pair's replica.

A tunnel server that listens is of no use when its replica is down. Every
session's backend connect records its outcome in the pair's
:class:`~tigertunnel.stats.Reachability`; when no session has connected
for :data:`PROBE_INTERVAL` seconds, :class:`BackendProbe` makes one TCP
connect to the backend and closes it at once (no byte is sent), so the
record stays current on an idle pair too. ``/metrics``
(``tigertunnel_backend_reachable``) and ``/status`` (``backend``; the pair
and the tunnel end unhealthy when the last connect failed) read it.
"""

from typing import Any, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from tigertunnel.interfaces import Reactor
from tigertunnel.net.multiplexer import ServerMultiplexer, SessionMultiplexer

__all__ = ["PROBE_INTERVAL", "BackendProbe", "backend_probes"]

#: Seconds between two probes of an idle pair's backend (and the longest a
#: connect may take: a probe still waiting then counts as a failure).
PROBE_INTERVAL = 5.0


class _HangUp(Protocol):
    """Closes the probe connection as soon as it is made."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class BackendProbe(Service):
    """Connects to one server pair's backend every :data:`PROBE_INTERVAL`
    seconds unless a session did within that time.

    :param mux: the server pair (its ``endpoint_for`` and ``backend`` record).
    :param clock: when to probe.
    """

    def __init__(self, mux: ServerMultiplexer, clock: Reactor) -> None:
        self.mux = mux
        self.clock = clock
        self.pending: "Optional[Deferred[Any]]" = None
        self._call: Optional[IDelayedCall] = None

    def startService(self) -> None:
        super().startService()
        self.probe()

    def stopService(self) -> "Optional[Deferred[None]]":
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self.pending is not None:
            late, self.pending = self.pending, None
            late.cancel()
        super().stopService()
        return None

    def probe(self) -> None:
        """Connect now when the record is older than :data:`PROBE_INTERVAL`,
        then schedule the next look."""
        self._call = self.clock.callLater(PROBE_INTERVAL, self.probe)
        record = self.mux.backend
        now = self.clock.seconds()
        if record.checked is not None and now - record.checked < PROBE_INTERVAL:
            return
        if self.pending is not None:  # the last probe has not ended: too slow
            late, self.pending = self.pending, None
            late.cancel()
            record.record(False, now, f"no answer to a connect within "
                          f"{PROBE_INTERVAL:.0f} s")
        factory = Factory.forProtocol(_HangUp)
        factory.noisy = False
        d: "Deferred[Any]" = self.mux.endpoint_for(self.mux.pair).connect(factory)
        self.pending = d

        def ended(result: Any) -> None:
            if self.pending is not d:
                return  # cancelled: already recorded
            self.pending = None
            if isinstance(result, Failure):
                record.record(False, self.clock.seconds(), result.getErrorMessage())
            else:
                record.record(True, self.clock.seconds())

        d.addBoth(ended)


def backend_probes(muxes: Sequence[SessionMultiplexer], clock: Reactor) -> List[BackendProbe]:
    """A probe for each tunnel server pair of ``muxes`` (none for a client)."""
    return [BackendProbe(mux, clock) for mux in muxes
            if isinstance(mux, ServerMultiplexer)]

