"""Tests for :mod:`tigertunnel.wire.replaywindow` (the replay window and its table)."""

import hashlib
from typing import Dict, List, Tuple

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.errors import ReplayCacheError
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


class HeaderTests(SynchronousTestCase):
    """The header of a stored table."""

    def test_round_trip(self) -> None:
        """A packed header parses back to its shape; the size covers the buckets."""
        header = replaywindow.pack_header(8192, 32)
        self.assertEqual(len(header), replaywindow.HEADER_SIZE)
        size = replaywindow.table_size(8192, 32)
        self.assertEqual(size, 32 + 8192 * 32 * 40)
        self.assertEqual(replaywindow.parse_header(header, size, "f"), (8192, 32))

    def test_refused(self) -> None:
        """A foreign header, another version, an absurd shape or a short table is refused in one line naming the file."""
        good = replaywindow.pack_header(4, 4)
        size = replaywindow.table_size(4, 4)
        for header, length, text in (
                (b"something else entirely, 32 byt", size, "not a tigertunnel replay cache"),
                (good[:8] + (3).to_bytes(4, "little") + good[12:], size, "version 3"),
                (replaywindow.pack_header(0, 4), size, "damaged"),
                (good, size - 1, "damaged")):
            with self.assertRaises(ReplayCacheError) as ctx:
                replaywindow.parse_header(header, length, "/run/x.replay")
            self.assertIn(text, str(ctx.exception))
            self.assertIn("/run/x.replay", str(ctx.exception))
            self.assertNotIn("\n", str(ctx.exception))

    def test_version_1(self) -> None:
        """The append log of version 1 is recognised by its 16-byte header."""
        self.assertTrue(replaywindow.is_version_1(b"TTREPLAY" + bytes([1, 0, 0, 0, 40, 0, 0, 0])))
        self.assertFalse(replaywindow.is_version_1(replaywindow.pack_header(4, 4)))
        self.assertFalse(replaywindow.is_version_1(b"TTREPLAY"))
