"""Tests for :mod:`tigertunnel.net.admission` (fair pending-handshake admission)."""

import ipaddress
from typing import Dict, List, Tuple

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.net import admission
from tigertunnel.net.admission import Admission, source_group


class Model:
    """Drive an Admission as the server does and keep the connections still pending."""

    def __init__(self, max_pending: int, per_group: int, grace: float = 1.0) -> None:
        self.clock = Clock()
        self.adm: Admission[int] = Admission(self.clock.seconds, max_pending,
                                             per_group, grace)
        self.next = 0
        self.pending: Dict[int, str] = {}
        self.evicted: List[int] = []

    def connect(self, source: str) -> int:
        """A new connection from ``source``; evict until within the caps; return its key."""
        key = self.next
        self.next += 1
        self.pending[key] = source
        self.adm.connection_made(key, source)
        victim = self.adm.victim()
        while victim is not None:
            self.adm.evict(victim)
            self.evicted.append(victim)
            del self.pending[victim]
            victim = self.adm.victim()
        return key

    def done(self, key: int) -> None:
        """The handshake of ``key`` ended."""
        self.adm.connection_done(key)
        del self.pending[key]


class PolicyTests(SynchronousTestCase):
    """The eviction rules, case by case."""

    def test_defaults(self) -> None:
        """64 pending handshakes per listener, 16 per source group, 1 s grace for a partial hello."""
        adm: Admission[int] = Admission(Clock().seconds)
        self.assertEqual((adm.max_pending, adm.per_group, adm.grace), (64, 16, 1.0))
        self.assertEqual((admission.DEFAULT_MAX_PENDING, admission.DEFAULT_PER_GROUP,
                          admission.DEFAULT_GRACE), (64, 16, 1.0))

    def test_under_limits_nothing_evicted(self) -> None:
        """Below both caps every connection is admitted."""
        m = Model(10, 4)
        for n in "aabbccdd":
            m.connect(f"10.0.0.{ord(n)}")
        self.assertEqual(m.evicted, [])
        self.assertEqual(len(m.adm), 8)

    def test_per_group_cap_evicts_least_progress(self) -> None:
        """A group at its cap loses its oldest silent connection, before one that sent bytes."""
        m = Model(100, 3)
        first, second, third = (m.connect("10.0.0.1") for _ in range(3))
        m.adm.data_received(first, 30)
        fourth = m.connect("10.0.0.1")
        self.assertEqual(m.evicted, [second])
        self.assertEqual(set(m.pending), {first, third, fourth})
        self.assertEqual(m.adm.pending_from("10.0.0.1"), 3)

    def test_fewest_bytes_first(self) -> None:
        """Among fresh partial hellos, the one with fewest bytes goes, then the oldest."""
        m = Model(3, 3)
        keys = [m.connect("10.0.0.1") for _ in range(3)]
        for key, count in zip(keys, (40, 1, 1)):
            m.adm.data_received(key, count)
        m.connect("10.0.0.2")
        self.assertEqual(m.evicted, [keys[1]])

    def test_stale_staller_goes_before_a_newcomer(self) -> None:
        """A connection that sent one byte and stalled past the grace is evicted before a silent newcomer: a byte buys no immunity."""
        m = Model(100, 2)
        stallers = [m.connect("10.0.0.1") for _ in range(2)]
        for key in stallers:
            m.adm.data_received(key, 1)
        m.clock.advance(1.0)
        newcomer = m.connect("10.0.0.1")
        self.assertEqual(m.evicted, [stallers[0]])
        self.assertIn(newcomer, m.pending)

    def test_fresh_staller_kept_within_grace(self) -> None:
        """Within the grace, a partial hello is kept and a silent connection goes instead (the newcomer itself when all others spoke)."""
        m = Model(100, 2)
        keys = [m.connect("10.0.0.1") for _ in range(2)]
        for key in keys:
            m.adm.data_received(key, 1)
        m.clock.advance(0.9)
        newcomer = m.connect("10.0.0.1")
        self.assertEqual(m.evicted, [newcomer])

    def test_stale_order(self) -> None:
        """Among stale connections the fewest bytes go first, then the oldest, whatever their group."""
        m = Model(4, 4)
        a = m.connect("10.0.0.1")
        b = m.connect("10.0.0.2")
        c = m.connect("10.0.0.2")
        d = m.connect("10.0.0.3")
        m.adm.data_received(a, 5)
        m.adm.data_received(b, 2)
        m.adm.data_received(c, 2)
        m.adm.data_received(d, 9)
        m.clock.advance(2.0)
        m.connect("10.0.0.4")
        m.connect("10.0.0.4")
        self.assertEqual(m.evicted, [b, c])

    def test_total_cap_fresh_from_the_largest_group(self) -> None:
        """Past the total cap a fresh connection goes from the group holding most, before a smaller group's silent newcomer."""
        m = Model(6, 6)
        big = [m.connect("10.0.0.1") for _ in range(4)]
        for key in big:
            m.adm.data_received(key, 1)
        small = m.connect("10.0.0.2")
        newcomer = m.connect("10.0.0.3")
        m.connect("10.0.0.3")
        self.assertEqual(m.evicted, [big[0]])
        self.assertIn(small, m.pending)
        self.assertIn(newcomer, m.pending)

    def test_done_and_unknown(self) -> None:
        """connection_done frees the slot; unknown keys are ignored; duplicates are refused."""
        adm: Admission[str] = Admission(Clock().seconds, 2, 2)
        adm.connection_made("x", "10.0.0.1")
        self.assertIsNone(adm.victim())
        self.assertRaises(ValueError, adm.connection_made, "x", "10.0.0.1")
        adm.connection_done("x")
        adm.connection_done("x")
        adm.data_received("nobody")
        adm.evict("nobody")
        self.assertEqual((len(adm), adm.evictions), (0, 0))
        self.assertEqual(adm.pending_from("10.0.0.1"), 0)
        self.assertIsNone(adm.received("x"))
        self.assertIsNone(adm.victim())

    def test_received_counts(self) -> None:
        """received() adds up the hello bytes of a pending connection."""
        adm: Admission[str] = Admission(Clock().seconds, 2, 2)
        adm.connection_made("x", "10.0.0.1")
        self.assertEqual(adm.received("x"), 0)
        adm.data_received("x", 30)
        adm.data_received("x", 36)
        self.assertEqual(adm.received("x"), 66)

    def test_bad_limits(self) -> None:
        """Limits below 1, a per-group cap above the total, or a negative grace are refused, naming the value."""
        now = Clock().seconds
        self.assertRaises(ValueError, Admission, now, 0, 1)
        self.assertRaises(ValueError, Admission, now, 4, 0)
        self.assertRaises(ValueError, Admission, now, 4, 5)
        error = self.assertRaises(ValueError, Admission, now, 4, 4, -1.0)
        self.assertIn("-1.0", str(error))

    def test_eviction_count(self) -> None:
        """evictions counts every connection evicted."""
        m = Model(2, 2)
        for _ in range(7):
            m.connect("10.0.0.1")
        self.assertEqual(m.adm.evictions, 5)
        self.assertEqual(len(m.evicted), 5)

    def test_ipv6_prefix_is_one_group(self) -> None:
        """Connections from 100 addresses of one IPv6 /64 share one per-group cap; another /64 is not touched."""
        m = Model(64, 16)
        other = m.connect("2001:db8:0:2::1")
        flood = [m.connect(f"2001:db8:0:1::{n:x}") for n in range(1, 101)]
        self.assertEqual(sum(key in m.pending for key in flood), 16)
        self.assertIn(other, m.pending)
        self.assertEqual(m.adm.pending_from("2001:db8:0:1::ffff"), 16)


class SourceGroupTests(SynchronousTestCase):
    """Which addresses share a source group."""

    def test_examples(self) -> None:
        """IPv4 by address; IPv6 by /64, zone dropped; IPv4-mapped IPv6 as IPv4; other names as themselves."""
        self.assertEqual(source_group("192.0.2.1"), ipaddress.ip_address("192.0.2.1"))
        self.assertNotEqual(source_group("192.0.2.1"), source_group("192.0.2.2"))
        self.assertEqual(source_group("2001:db8::1"), source_group("2001:db8::ffff:1:2"))
        self.assertEqual(source_group("fe80::1%eth0"), source_group("fe80::2"))
        self.assertNotEqual(source_group("2001:db8::1"), source_group("2001:db8:0:1::1"))
        self.assertEqual(source_group("::ffff:192.0.2.1"), source_group("192.0.2.1"))
        self.assertEqual(source_group("/run/tt.sock"), "/run/tt.sock")
        self.assertIsNone(source_group(None))

    @given(st.integers(0, 2**128 - 1), st.integers(0, 2**128 - 1))
    def test_ipv6_same_group_iff_same_64(self, a: int, b: int) -> None:
        """Two IPv6 addresses (not IPv4-mapped) share a group exactly when their first 64 bits are equal."""
        x, y = ipaddress.IPv6Address(a), ipaddress.IPv6Address(b)
        if x.ipv4_mapped is not None or y.ipv4_mapped is not None:
            return
        self.assertEqual(source_group(str(x)) == source_group(str(y)), a >> 64 == b >> 64)

    @given(st.integers(0, 2**32 - 1))
    def test_mapped_is_ipv4(self, value: int) -> None:
        """An IPv4-mapped IPv6 address is in the group of its IPv4 address."""
        v4 = ipaddress.IPv4Address(value)
        self.assertEqual(source_group(f"::ffff:{v4}"), source_group(str(v4)))


Op = Tuple[str, int, int]


class PropertyTests(SynchronousTestCase):
    """Invariants under arbitrary traffic and floods."""

    @given(st.integers(1, 30), st.integers(1, 30),
           st.lists(st.tuples(st.sampled_from(["connect", "speak", "done", "wait"]),
                              st.integers(0, 7), st.integers(0, 1000)), max_size=200))
    def test_caps_always_hold(self, max_pending: int, per_group: int,
                              ops: List[Op]) -> None:
        """The total and per-group counts never exceed their caps, and bookkeeping matches a model."""
        per_group = min(per_group, max_pending)
        m = Model(max_pending, per_group)
        for kind, src, pick in ops:
            source = f"10.0.0.{src}"
            if kind == "connect":
                m.connect(source)
            elif kind == "wait":
                m.clock.advance(pick / 500)
            elif m.pending:
                key = sorted(m.pending)[pick % len(m.pending)]
                if kind == "speak":
                    m.adm.data_received(key, 1 + pick % 3)
                else:
                    m.done(key)
            self.assertLessEqual(len(m.adm), max_pending)
            self.assertEqual(len(m.adm), len(m.pending))
            counts: Dict[str, int] = {}
            for key, s in m.pending.items():
                self.assertIn(key, m.adm)
                counts[s] = counts.get(s, 0) + 1
            for s, n in counts.items():
                self.assertLessEqual(n, per_group)
                self.assertEqual(m.adm.pending_from(s), n)

    @given(st.integers(2, 40), st.integers(1, 40), st.integers(1, 300),
           st.integers(0, 20))
    def test_silent_flood_never_evicts_another_groups_partial_hello(
            self, max_pending: int, per_group: int, burst: int, early: int) -> None:
        """A burst of silent connects from one group never evicts another group's fresh connection that sent bytes."""
        per_group = min(per_group, max_pending)
        m = Model(max_pending, per_group)
        for n in range(min(early, max_pending)):
            m.connect(f"198.51.100.{n}")
        for key in list(m.pending):
            m.adm.data_received(key, 30)
        spoke = set(m.pending)
        for _ in range(burst):
            m.connect("203.0.113.66")
        self.assertEqual(set(m.evicted) & spoke, set())
        self.assertLessEqual(m.adm.pending_from("203.0.113.66"), per_group)

    @given(st.integers(1, 4), st.integers(1, 64), st.floats(0.0, 5.0),
           st.sampled_from(["10.0.1.0", "192.0.2.9"]))
    def test_renewed_stallers_yield_to_a_newcomer_after_the_grace(
            self, groups: int, per_group: int, age: float, source: str) -> None:
        """However many one-byte stallers fill the table from however many groups, once they are older than the grace a newcomer from any group is admitted and a staller goes instead."""
        max_pending = groups * per_group
        m = Model(max_pending, per_group)
        stallers = [m.connect(f"10.0.1.{n % groups}") for n in range(max_pending)]
        for key in stallers:
            m.adm.data_received(key, 1)
        m.clock.advance(1.0 + age)
        newcomer = m.connect(source)
        self.assertIn(newcomer, m.pending)
        self.assertEqual(len(m.evicted), 1)
        self.assertIn(m.evicted[0], stallers)
