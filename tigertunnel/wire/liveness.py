"""When to ping a version-2 peer, and when to give a pool connection up.

A tunnel process that stops running while its kernel stays up (SIGSTOP, a
stuck disk, a swap storm, a debugger) still ACKs every byte, so neither TCP
keepalive nor ``TCP_USER_TIMEOUT`` ever fires, and the TB sessions on its
pool connections wait forever. Between two version-2 ends each side
therefore watches its pool connection with a :class:`Liveness` machine:

* any authenticated frame from the peer (data, stream_close, sealed
  stream_open, ping, pong) is proof of life: :meth:`Liveness.frame_received`;
* after :data:`PING_INTERVAL` seconds without one (and without a ping of
  ours in that time), :meth:`Liveness.tick` says :attr:`Action.SEND_PING`;
  the peer answers every ping with a pong;
* after :data:`DEAD_AFTER` seconds (three intervals) without one, it says
  :attr:`Action.DEAD`: the caller closes the pool connection and every
  session on it at its end, the peer does the same at the other end when
  its own machine fires, TB reconnects and retries, and a client's slot
  reconnects.

With the defaults a frozen peer is found 15 s after the last frame it sent
(pings at 5 s and 10 s go unanswered), plus at most one tick period: ticking
once a second, or at :meth:`Liveness.next_deadline`, closes its sessions
well within 20 s. A healthy idle pool connection costs one 268-byte ping
and one pong about every 5 s.

``first_frame_within`` lets a server demand the first frame sooner
(:data:`FIRST_FRAME_WITHIN`, 5 s): its first ping goes out with the
ServerHello (:meth:`Liveness.ping_sent`) and a genuine client answers it at
once, while a replayed hello can never answer (the replayer has no keys), so
such a connection ends after that many seconds instead of
:data:`DEAD_AFTER`.

The machine is pure: no clock, no reactor. ``now`` is any monotonic time in
seconds supplied by the caller (``reactor.seconds()`` or a test ``Clock``).
"""

from __future__ import annotations

import enum
from typing import Optional

__all__ = ["PING_INTERVAL", "MISSED_INTERVALS", "DEAD_AFTER",
           "FIRST_FRAME_WITHIN", "Action", "Liveness"]

#: Seconds of silence from the peer before we ping it.
PING_INTERVAL = 5.0
#: Intervals without any authenticated frame after which the peer is dead.
MISSED_INTERVALS = 3
#: Seconds of silence after which the pool connection is dead (15 s).
DEAD_AFTER = PING_INTERVAL * MISSED_INTERVALS
#: Seconds within which a server expects a version-2 client's first
#: authenticated frame (the pong to the ping sent with the ServerHello).
FIRST_FRAME_WITHIN = PING_INTERVAL


class Action(enum.Enum):
    """What :meth:`Liveness.tick` asks the caller to do."""

    SEND_PING = "send ping"
    DEAD = "dead"


class Liveness:
    """Liveness of one pool connection, fed with frame arrivals and ticks.

    :ivar dead: :attr:`Action.DEAD` has been reported; the machine does
        nothing more.
    """

    def __init__(self, now: float, interval: float = PING_INTERVAL,
                 misses: int = MISSED_INTERVALS,
                 first_frame_within: Optional[float] = None) -> None:
        """
        :param now: the time the pool connection became established.
        :param interval: seconds of silence before a ping.
        :param misses: intervals of silence after which the peer is dead.
        :param first_frame_within: if given, seconds within which the
            peer's first authenticated frame must arrive (at most
            ``interval * misses``).
        :raises ValueError: a non-positive interval, fewer than 2 misses
            (the peer must get at least one ping to answer), or a bad
            ``first_frame_within``.
        """
        if not interval > 0:
            raise ValueError(f"ping interval must be positive, not {interval!r}")
        if misses < 2:
            raise ValueError(f"misses must be at least 2, not {misses!r}")
        dead_after = interval * misses
        if first_frame_within is not None and not 0 < first_frame_within <= dead_after:
            raise ValueError(f"first_frame_within must be in (0, {dead_after}], "
                             f"not {first_frame_within!r}")
        self.interval = interval
        self.dead_after = dead_after
        self._first_deadline = (None if first_frame_within is None
                                else now + first_frame_within)
        self._heard = now
        self._pinged: Optional[float] = None
        self.dead = False

    def frame_received(self, now: float) -> None:
        """Record an authenticated frame from the peer (any kind)."""
        if now > self._heard:
            self._heard = now
        self._first_deadline = None

    def ping_sent(self, now: float) -> None:
        """Record a ping sent outside :meth:`tick` (a server's first ping)."""
        if self._pinged is None or now > self._pinged:
            self._pinged = now

    def _silent_since(self) -> float:
        """When the quiet period that a ping would end began."""
        if self._pinged is not None and self._pinged > self._heard:
            return self._pinged
        return self._heard

    def next_deadline(self) -> Optional[float]:
        """The time at which :meth:`tick` next has something to say.

        :returns: that time, or ``None`` once the peer is dead.
        """
        if self.dead:
            return None
        dead_at = self._heard + self.dead_after
        if self._first_deadline is not None:
            dead_at = min(dead_at, self._first_deadline)
        return min(dead_at, self._silent_since() + self.interval)

    def tick(self, now: float) -> Optional[Action]:
        """Check the time.

        :returns: :attr:`Action.DEAD` once (the first tick at or after the
            deadline), :attr:`Action.SEND_PING` when a ping is due (the
            machine counts it as sent at ``now``), else ``None``.
        """
        if self.dead:
            return None
        # The same sums as next_deadline, so that a tick at that deadline
        # acts on it (30.4 + 5 == 35.4, but 35.4 - 30.4 < 5).
        if (now >= self._heard + self.dead_after
                or (self._first_deadline is not None and now >= self._first_deadline)):
            self.dead = True
            return Action.DEAD
        if now >= self._silent_since() + self.interval:
            self._pinged = now
            return Action.SEND_PING
        return None
