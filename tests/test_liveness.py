"""Tests for :mod:`tigertunnel.wire.liveness` (heartbeat timing of a pool connection)."""

from typing import List, Optional, Tuple

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.wire import liveness
from tigertunnel.wire.liveness import Action, Liveness


def run(machine: Liveness, until: float, step: float = 1.0,
        start: float = 0.0) -> List[Tuple[float, Action]]:
    """Tick ``machine`` every ``step`` seconds from ``start`` to ``until``; return what it said."""
    said = []
    t = start
    while t <= until:
        action = machine.tick(t)
        if action is not None:
            said.append((t, action))
        t += step
    return said


class ConstantsTests(SynchronousTestCase):
    """The documented numbers."""

    def test_values(self) -> None:
        """Ping after 5 s of silence, dead after 3 intervals (15 s), first frame within 5 s."""
        self.assertEqual(liveness.PING_INTERVAL, 5.0)
        self.assertEqual(liveness.MISSED_INTERVALS, 3)
        self.assertEqual(liveness.DEAD_AFTER, 15.0)
        self.assertEqual(liveness.FIRST_FRAME_WITHIN, 5.0)


class SilenceTests(SynchronousTestCase):
    """A silent peer is pinged, then declared dead."""

    def test_frozen_peer(self) -> None:
        """With no frame at all: pings at 5 s and 10 s, dead at 15 s, then nothing more."""
        machine = Liveness(0.0)
        self.assertEqual(run(machine, 40.0),
                         [(5.0, Action.SEND_PING), (10.0, Action.SEND_PING),
                          (15.0, Action.DEAD)])
        self.assertTrue(machine.dead)
        self.assertIsNone(machine.next_deadline())
        self.assertIsNone(machine.tick(100.0))

    def test_frozen_after_traffic(self) -> None:
        """A peer that stops at t=100 after steady traffic is dead at 115 s, within 20 s."""
        machine = Liveness(0.0)
        for t in range(0, 101, 2):
            machine.frame_received(float(t))
            self.assertIsNone(machine.tick(float(t)))
        said = run(machine, 130.0, start=101.0)
        self.assertEqual(said[-1], (115.0, Action.DEAD))
        self.assertLessEqual(said[-1][0] - 100.0, 20.0)

    def test_answered_pings_keep_it_alive(self) -> None:
        """A peer that answers every ping within a second is never declared dead."""
        machine = Liveness(0.0)
        pending: Optional[float] = None
        pings = 0
        for t in range(0, 3600):
            now = float(t)
            if pending is not None and now >= pending:
                machine.frame_received(now)
                pending = None
            action = machine.tick(now)
            self.assertNotEqual(action, Action.DEAD)
            if action is Action.SEND_PING:
                pings += 1
                pending = now + 1.0
        # Pings at 5, 11, 17 ...: an interval of silence after each answer.
        self.assertEqual(pings, len(range(5, 3600, 6)))

    def test_busy_peer_not_pinged(self) -> None:
        """Frames arriving more often than the interval mean no ping is ever sent."""
        machine = Liveness(0.0)
        for t in range(0, 1000):
            machine.frame_received(t * 0.9)
            self.assertIsNone(machine.tick(t * 0.9))

    def test_one_ping_per_interval(self) -> None:
        """While silent, a ping is asked for once per interval, not at every tick."""
        machine = Liveness(0.0, interval=2.0, misses=5)
        said = run(machine, 9.9, step=0.1)
        self.assertEqual([a for _, a in said], [Action.SEND_PING] * 4)

    def test_ping_sent(self) -> None:
        """A ping sent outside tick (the server's first) delays the next one by an interval."""
        machine = Liveness(0.0)
        machine.ping_sent(3.0)
        self.assertEqual(machine.next_deadline(), 8.0)
        self.assertIsNone(machine.tick(5.0))
        self.assertEqual(machine.tick(8.0), Action.SEND_PING)

    def test_tick_at_deadline_acts(self) -> None:
        """A tick at exactly next_deadline acts even where float subtraction rounds below the interval."""
        heard = 0.1 * 32  # 3.2000000000000006
        machine = Liveness(0.0)
        machine.frame_received(heard)
        deadline = machine.next_deadline()
        assert deadline is not None
        self.assertLess(deadline - heard, liveness.PING_INTERVAL)  # the rounding at stake
        self.assertEqual(machine.tick(deadline), Action.SEND_PING)
        self.assertEqual(machine.tick(heard + liveness.DEAD_AFTER), Action.DEAD)

    def test_time_going_backwards_is_ignored(self) -> None:
        """A frame time earlier than the last one does not move the deadline back."""
        machine = Liveness(0.0)
        machine.frame_received(10.0)
        machine.frame_received(4.0)
        self.assertEqual(machine.next_deadline(), 15.0)


class FirstFrameTests(SynchronousTestCase):
    """A server demands a version-2 client's first frame quickly."""

    def test_replayed_hello(self) -> None:
        """A peer that never sends an authenticated frame is dead at first_frame_within."""
        machine = Liveness(100.0, first_frame_within=liveness.FIRST_FRAME_WITHIN)
        machine.ping_sent(100.0)
        self.assertEqual(machine.next_deadline(), 105.0)
        self.assertEqual(run(machine, 120.0, start=100.0), [(105.0, Action.DEAD)])

    def test_answer_lifts_the_first_deadline(self) -> None:
        """Once a frame arrived, the usual interval and 15 s rule apply."""
        machine = Liveness(0.0, first_frame_within=2.0)
        machine.frame_received(1.0)
        self.assertEqual(run(machine, 30.0),
                         [(6.0, Action.SEND_PING), (11.0, Action.SEND_PING),
                          (16.0, Action.DEAD)])

    def test_bad_parameters(self) -> None:
        """Non-positive intervals, fewer than 2 misses and a first deadline past dead_after are refused."""
        self.assertRaises(ValueError, Liveness, 0.0, interval=0)
        self.assertRaises(ValueError, Liveness, 0.0, misses=1)
        self.assertRaises(ValueError, Liveness, 0.0, first_frame_within=0)
        self.assertRaises(ValueError, Liveness, 0.0, first_frame_within=15.5)


class PropertyTests(SynchronousTestCase):
    """Invariants over arbitrary arrival patterns."""

    @given(st.lists(st.floats(0.0, 4.99), max_size=60), st.floats(0.01, 1.0))
    def test_dead_exactly_when_silent_too_long(self, gaps: List[float], step: float) -> None:
        """DEAD is reported at the first tick 15 s after the last frame, never earlier."""
        machine = Liveness(0.0)
        t = 0.0
        for gap in gaps:
            t += gap
            machine.frame_received(t)
        last = t
        now = 0.0 if not gaps else t
        while True:
            action = machine.tick(now)
            if action is Action.DEAD:
                self.assertGreaterEqual(now, last + liveness.DEAD_AFTER)
                self.assertLess(now - last, liveness.DEAD_AFTER + step)
                return
            now += step

    @given(st.lists(st.tuples(st.booleans(), st.floats(0.0, 3.0)), max_size=80))
    def test_next_deadline_is_when_tick_speaks(self, steps: List[Tuple[bool, float]]) -> None:
        """tick is silent strictly before next_deadline and speaks at it."""
        machine = Liveness(0.0)
        now = 0.0
        for heard, gap in steps:
            if machine.dead:
                break
            deadline = machine.next_deadline()
            assert deadline is not None
            if now + gap < deadline:
                now += gap
                self.assertIsNone(machine.tick(now))
            else:
                now = deadline
                self.assertIsNotNone(machine.tick(now))
            if heard:
                machine.frame_received(now)
