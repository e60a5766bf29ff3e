"""Tests for :mod:`tigertunnel.wire.replaywindow` (the replay window and its table)."""

import hashlib
from typing import Dict, List, Tuple

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.wire import replaywindow
from tigertunnel.wire.handshake import TIMESTAMP_TOLERANCE, ReplayCache
from tigertunnel.wire.replaywindow import (
    MemoryBuckets,
    ReplayTable,
    Verdict,
    oldest_live,
)

NOW = 1_750_000_000


def digest(n: int) -> bytes:
    """A distinct 32-byte hello hash."""
    return hashlib.sha256(n.to_bytes(8, "little")).digest()


def table(buckets: int = 1, slots: int = 4) -> ReplayTable:
    """A small in-memory table with the handshake's tolerance."""
    return ReplayTable(MemoryBuckets(slots), buckets, slots, TIMESTAMP_TOLERANCE)


class WindowTests(SynchronousTestCase):
    """The window rule: remembered while it could be accepted, then forgotten."""

    def test_oldest_live(self) -> None:
        """A hello is remembered while its timestamp is at most the tolerance (plus one second) in the past."""
        self.assertEqual(oldest_live(NOW + 0.9, 3600), NOW - 3601)

    def test_edge_of_the_window(self) -> None:
        """A hello is refused as a replay up to tolerance + 1 s after its timestamp and forgotten one second later."""
        t = table()
        self.assertIs(t.check_and_add(digest(1), NOW, NOW), Verdict.FRESH)
        edge = NOW + TIMESTAMP_TOLERANCE + 1
        self.assertIs(t.check_and_add(digest(1), NOW, edge), Verdict.REPLAYED)
        self.assertIs(t.check_and_add(digest(1), NOW, edge + 1), Verdict.FRESH)

    def test_small_clock(self) -> None:
        """Slots never written are free even when the clock reads less than the tolerance."""
        t = table(slots=2)
        self.assertIs(t.check_and_add(b"a" * 32, 1000, 1000.0), Verdict.FRESH)
        self.assertIs(t.check_and_add(b"b" * 32, 1000, 1000.0), Verdict.FRESH)
        self.assertIs(t.check_and_add(b"a" * 32, 1000, 1000.0), Verdict.REPLAYED)

    def test_bad_arguments(self) -> None:
        """A hash of the wrong size, a timestamp outside u64 or an empty shape are programming errors."""
        t = table()
        self.assertRaises(ValueError, t.check_and_add, b"short", NOW, NOW)
        self.assertRaises(ValueError, t.check_and_add, digest(1), -1, NOW)
        self.assertRaises(ValueError, t.check_and_add, digest(1), 1 << 64, NOW)
        self.assertRaises(ValueError, ReplayTable, MemoryBuckets(1), 0, 1, 3600)


class CapacityTests(SynchronousTestCase):
    """A full table refuses new hellos; it never forgets an unexpired one."""

    def test_full_refuses_rather_than_forgets(self) -> None:
        """With every slot holding an unexpired hello, a new one is refused (FULL) and every recorded one is still refused as a replay."""
        t = table(slots=4)
        for n in range(4):
            self.assertIs(t.check_and_add(digest(n), NOW, NOW), Verdict.FRESH)
        self.assertIs(t.check_and_add(digest(4), NOW, NOW), Verdict.FULL)
        for n in range(4):
            self.assertIs(t.check_and_add(digest(n), NOW, NOW + 3000), Verdict.REPLAYED)
        self.assertIs(t.check_and_add(digest(4), NOW, NOW + 3000), Verdict.FULL)

    def test_room_again_once_expired(self) -> None:
        """Once a recorded hello leaves the window its slot takes a new one."""
        t = table(slots=2)
        t.check_and_add(digest(0), NOW - 3000, NOW)
        t.check_and_add(digest(1), NOW, NOW)
        self.assertIs(t.check_and_add(digest(2), NOW, NOW), Verdict.FULL)
        self.assertIs(t.check_and_add(digest(2), NOW + 700, NOW + 700), Verdict.FRESH)
        self.assertIs(t.check_and_add(digest(1), NOW, NOW + 700), Verdict.REPLAYED)

    def test_in_memory_cache_full(self) -> None:
        """The in-memory ReplayCache of one process refuses rather than forgets too."""
        cache = ReplayCache(buckets=1, slots=3, now=lambda: NOW)
        for n in range(3):
            self.assertIs(cache.check_and_add(digest(n), NOW), Verdict.FRESH)
        self.assertIs(cache.check_and_add(digest(3), NOW), Verdict.FULL)
        self.assertIs(cache.check_and_add(digest(0), NOW), Verdict.REPLAYED)
        self.assertEqual(len(cache), 3)

    def test_default_capacity_takes_normal_rates(self) -> None:
        """The default shape (262,144 slots) takes 60,000 hellos in one window without refusing any."""
        self.assertEqual(replaywindow.DEFAULT_BUCKETS * replaywindow.DEFAULT_SLOTS,
                         262_144)
        cache = ReplayCache(now=lambda: NOW)
        verdicts = {cache.check_and_add(digest(n), NOW - n % 3600) for n in range(60_000)}
        self.assertEqual(verdicts, {Verdict.FRESH})
        self.assertEqual(len(cache), 60_000)


class ModelTests(SynchronousTestCase):
    """The table answers as the window rule says, whatever the order of events."""

    @settings(max_examples=60)
    @given(st.lists(st.tuples(st.integers(0, 40), st.integers(-3700, 3700),
                              st.integers(0, 900)), max_size=80))
    def test_matches_the_rule(self, events: List[Tuple[int, int, int]]) -> None:
        """With room to spare, a hello is a replay exactly when the same hash
        was recorded before and its timestamp is still in the window."""
        t = table(buckets=2, slots=64)
        recorded: Dict[bytes, int] = {}
        now = NOW
        for n, offset, advance in events:
            now += advance
            d, stamp = digest(n), now + offset
            live = d in recorded and recorded[d] >= oldest_live(now, TIMESTAMP_TOLERANCE)
            verdict = t.check_and_add(d, stamp, now)
            if live:
                self.assertIs(verdict, Verdict.REPLAYED)
            else:
                self.assertIs(verdict, Verdict.FRESH)
                recorded[d] = stamp
