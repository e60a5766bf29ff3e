"""Heartbeat: drives a pool connection's liveness machine with the reactor clock.

Between two version-2 ends (docs/protocol.rst §12), each end
watches its pool connection with a :class:`~tigertunnel.wire.liveness.Liveness`
machine. :class:`Heartbeat` is the Twisted side of it: one timer per pool
connection, re-armed at most once a second, and nothing on the data path.

How it learns that frames arrive without a per-frame call: every sealed
frame the peer sends (data, stream_close, sealed stream_open, ping, pong)
consumes one value of the receive counter of the pool connection's codec,
and only authenticated frames advance it. The timer reads that counter
(``received()``); if it moved since the last look, the peer was heard from
within the last tick. So the data path pays nothing, and the time of the
last frame is known to within :data:`TICK` seconds (it can only make the
peer look up to that much more alive).

With the defaults a frozen peer is declared dead 15-16 s after its last
frame; a server whose version-2 client never answers the first ping (a
replayed ClientHello: the replayer has no keys) gives up after 5-6 s.
"""

from typing import Callable, Optional

from twisted.internet.interfaces import IDelayedCall

from tigertunnel.interfaces import Clock
from tigertunnel.wire.liveness import Action, Liveness

#: Longest time between two looks at a pool connection's receive counter.
TICK = 1.0
#: Shortest time between two looks (a deadline a rounding error away must
#: not re-arm the timer for "now" over and over).
MIN_DELAY = 0.05


class Heartbeat:
    """The liveness timer of one pool connection.

    :param clock: schedules the looks (the reactor).
    :param received: the number of authenticated frames received so far
        (the codec's receive counter).
    :param send_ping: sends one ping to the peer.
    :param dead: called once when the peer is declared dead, with the
        seconds since it was last heard from.
    :param first_frame_within: seconds within which the peer's first
        authenticated frame must arrive (a server's first ping), or
        ``None``.
    """

    def __init__(self, clock: Clock, received: Callable[[], int],
                 send_ping: Callable[[], None], dead: Callable[[float], None],
                 first_frame_within: Optional[float] = None) -> None:
        self.clock = clock
        self._received = received
        self._send_ping = send_ping
        self._dead = dead
        now = clock.seconds()
        self.machine = Liveness(now, first_frame_within=first_frame_within)
        self._seen = received()
        self._heard = now
        self._call: Optional[IDelayedCall] = None
        self._stopped = False
        self._arm(now)

    @property
    def running(self) -> bool:
        """Whether the timer is armed (not stopped, peer not dead)."""
        return self._call is not None

    def ping_sent(self) -> None:
        """Record a ping sent outside the timer (a server's first ping)."""
        self.machine.ping_sent(self.clock.seconds())

    def stop(self) -> None:
        """Cancel the timer for good (the pool connection is gone or failed)."""
        self._stopped = True
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _arm(self, now: float) -> None:
        deadline = self.machine.next_deadline()
        if deadline is None or self._stopped:
            return
        delay = min(TICK, max(MIN_DELAY, deadline - now))
        self._call = self.clock.callLater(delay, self._look)

    def _look(self) -> None:
        self._call = None
        now = self.clock.seconds()
        seen = self._received()
        if seen != self._seen:
            self._seen = seen
            self._heard = now
            self.machine.frame_received(now)
        action = self.machine.tick(now)
        if action is Action.DEAD:
            self._dead(now - self._heard)
            return
        if action is Action.SEND_PING:
            self._send_ping()
        self._arm(now)
