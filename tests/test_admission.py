"""Tests for :mod:`tigertunnel.net.admission` (fair pending-handshake admission)."""

from typing import Dict, List, Set, Tuple

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.net import admission
from tigertunnel.net.admission import Admission


class Model:
    """Drive an Admission and keep the set of connections still pending."""

    def __init__(self, max_pending: int, per_source: int) -> None:
        self.adm: Admission[int] = Admission(max_pending, per_source)
        self.next = 0
        self.pending: Dict[int, str] = {}
        self.evicted: List[int] = []

    def connect(self, source: str) -> int:
        """A new connection from ``source``; returns its key."""
        key = self.next
        self.next += 1
        self.pending[key] = source
        for victim in self.adm.connection_made(key, source):
            self.evicted.append(victim)
            del self.pending[victim]
        return key


class PolicyTests(SynchronousTestCase):
    """The eviction rules, case by case."""

    def test_defaults(self) -> None:
        """64 pending handshakes per listener, 16 per source address."""
        adm: Admission[int] = Admission()
        self.assertEqual((adm.max_pending, adm.per_source), (64, 16))
        self.assertEqual((admission.DEFAULT_MAX_PENDING, admission.DEFAULT_PER_SOURCE), (64, 16))

    def test_under_limits_nothing_evicted(self) -> None:
        """Below both caps every connection is admitted."""
        m = Model(10, 4)
        for source in "aabbccdd":
            m.connect(source)
        self.assertEqual(m.evicted, [])
        self.assertEqual(len(m.adm), 8)

    def test_per_source_cap_evicts_own_oldest_silent(self) -> None:
        """A source at its cap loses its own oldest silent connection, not one that spoke."""
        m = Model(100, 3)
        first, second, third = m.connect("a"), m.connect("a"), m.connect("a")
        m.adm.data_received(first)
        fourth = m.connect("a")
        self.assertEqual(m.evicted, [second])
        self.assertEqual(set(m.pending), {first, third, fourth})
        self.assertEqual(m.adm.pending_from("a"), 3)

    def test_per_source_cap_all_spoke(self) -> None:
        """When every other connection of the source spoke, the newcomer itself is refused."""
        m = Model(100, 2)
        keys = [m.connect("a"), m.connect("a")]
        for key in keys:
            m.adm.data_received(key)
        newcomer = m.connect("a")
        self.assertEqual(m.evicted, [newcomer])
        self.assertEqual(set(m.pending), set(keys))

    def test_total_cap_prefers_silent_of_largest_source(self) -> None:
        """Past the total cap the oldest silent connection of the largest source goes."""
        m = Model(6, 6)
        a = [m.connect("a") for _ in range(3)]
        b = [m.connect("b") for _ in range(2)]
        c = m.connect("c")
        m.adm.data_received(b[0])
        m.connect("c")
        self.assertEqual(m.evicted, [a[0]])
        m.connect("b")  # b now holds 3: b[0] (spoke), b[1], the newcomer
        self.assertEqual(m.evicted, [a[0], b[1]])
        self.assertIn(c, m.pending)
        self.assertIn(b[0], m.pending)

    def test_tie_goes_to_the_oldest(self) -> None:
        """Between two sources of equal size, the one with the older silent connection loses it."""
        m = Model(4, 4)
        a0, b0, a1, b1 = m.connect("a"), m.connect("b"), m.connect("a"), m.connect("b")
        m.adm.data_received(a0)
        m.connect("c")
        # a's oldest silent is a1 (newer than b0): b0 goes.
        self.assertEqual(m.evicted, [b0])
        self.assertEqual(set(m.pending) & {a0, a1, b1}, {a0, a1, b1})

    def test_silent_goes_before_spoken_of_larger_source(self) -> None:
        """A silent connection of a small source goes before spoken ones of a large source."""
        m = Model(4, 4)
        big = [m.connect("big") for _ in range(3)]
        for key in big:
            m.adm.data_received(key)
        small = m.connect("small")
        m.connect("small")
        self.assertEqual(m.evicted, [small])
        self.assertTrue(all(key in m.pending for key in big))

    def test_spoken_never_evicted(self) -> None:
        """A connection that sent bytes survives any number of connects from anywhere."""
        m = Model(4, 2)
        keys = [m.connect(s) for s in "abcd"]
        for key in keys:
            m.adm.data_received(key)
        for n in range(100):
            m.connect("xyz"[n % 3])
        self.assertTrue(all(key in m.pending for key in keys))
        self.assertEqual(len(m.evicted), 100)

    def test_done_and_unknown(self) -> None:
        """connection_done frees the slot; unknown keys are ignored; duplicates are refused."""
        adm: Admission[str] = Admission(2, 2)
        self.assertEqual(adm.connection_made("x", "a"), [])
        self.assertRaises(ValueError, adm.connection_made, "x", "a")
        adm.connection_done("x")
        adm.connection_done("x")
        adm.data_received("nobody")
        self.assertEqual(len(adm), 0)
        self.assertEqual(adm.pending_from("a"), 0)
        self.assertIsNone(adm.silent("x"))

    def test_silent_flag(self) -> None:
        """A connection is silent until data_received."""
        adm: Admission[str] = Admission(2, 2)
        adm.connection_made("x", "a")
        self.assertTrue(adm.silent("x"))
        adm.data_received("x")
        self.assertFalse(adm.silent("x"))

    def test_bad_limits(self) -> None:
        """Limits below 1, or a per-source cap above the total, are refused."""
        self.assertRaises(ValueError, Admission, 0, 1)
        self.assertRaises(ValueError, Admission, 4, 0)
        self.assertRaises(ValueError, Admission, 4, 5)

    def test_eviction_count(self) -> None:
        """evictions counts every connection evicted."""
        m = Model(2, 2)
        for _ in range(7):
            m.connect("a")
        self.assertEqual(m.adm.evictions, 5)
        self.assertEqual(len(m.evicted), 5)


Op = Tuple[str, int]


@st.composite
def floods(draw: st.DrawFn) -> Tuple[int, int, List[Op], int]:
    """Limits, some traffic from real clients, and the size of a silent burst from one address."""
    max_pending = draw(st.integers(2, 40))
    per_source = draw(st.integers(1, max_pending))
    ops = draw(st.lists(st.tuples(st.sampled_from(["connect", "speak", "done"]),
                                  st.integers(0, 5)), max_size=40))
    burst = draw(st.integers(1, 300))
    return max_pending, per_source, ops, burst


class PropertyTests(SynchronousTestCase):
    """Invariants under arbitrary traffic and floods."""

    @given(floods(), st.data())
    def test_silent_flood_never_evicts_a_client_that_spoke(
            self, flood: Tuple[int, int, List[Op], int], data: st.DataObject) -> None:
        """A burst of silent connects from one address never evicts another address's connection that sent bytes."""
        max_pending, per_source, ops, burst = flood
        m = Model(max_pending, per_source)
        clients = [f"10.0.0.{i}" for i in range(6)]
        mine: Dict[str, List[int]] = {c: [] for c in clients}
        for kind, i in ops:
            client = clients[i]
            if kind == "connect":
                mine[client].append(m.connect(client))
            elif mine[client]:
                key = data.draw(st.sampled_from(mine[client]))
                if kind == "speak":
                    m.adm.data_received(key)
                elif key in m.pending:
                    m.adm.connection_done(key)
                    del m.pending[key]
        spoke: Set[int] = {k for k in m.pending if m.adm.silent(k) is False}
        start = len(m.evicted)
        for _ in range(burst):
            m.connect("203.0.113.66")  # the flooder, silent
            lost = set(m.evicted[start:]) & spoke
            self.assertEqual(lost, set(), f"flood evicted clients that spoke: {lost}")
        self.assertLessEqual(m.adm.pending_from("203.0.113.66"), per_source)

    @given(floods())
    def test_client_arriving_during_flood_gets_its_turn(
            self, flood: Tuple[int, int, List[Op], int]) -> None:
        """A client connecting mid-flood from a fresh address is not pushed out by further silent connects."""
        max_pending, per_source, _, burst = flood
        per_source = max(2, per_source)
        max_pending = max(max_pending, per_source)
        m = Model(max_pending, per_source)
        for _ in range(max(2, burst)):
            m.connect("203.0.113.66")
        client = m.connect("198.51.100.7")
        for _ in range(burst):
            m.connect("203.0.113.66")
        self.assertIn(client, m.pending)

    @given(st.integers(1, 30), st.integers(1, 30),
           st.lists(st.tuples(st.sampled_from(["connect", "speak", "done"]),
                              st.integers(0, 7), st.integers(0, 1000)), max_size=200))
    def test_caps_always_hold(self, max_pending: int, per_source: int,
                              ops: List[Tuple[str, int, int]]) -> None:
        """The total and per-source counts never exceed their caps, and bookkeeping matches a model."""
        per_source = min(per_source, max_pending)
        m = Model(max_pending, per_source)
        for kind, src, pick in ops:
            source = f"s{src}"
            if kind == "connect":
                m.connect(source)
            elif m.pending:
                key = sorted(m.pending)[pick % len(m.pending)]
                if kind == "speak":
                    m.adm.data_received(key)
                else:
                    m.adm.connection_done(key)
                    del m.pending[key]
            self.assertLessEqual(len(m.adm), max_pending)
            self.assertEqual(len(m.adm), len(m.pending))
            counts: Dict[str, int] = {}
            for key, s in m.pending.items():
                self.assertIn(key, m.adm)
                counts[s] = counts.get(s, 0) + 1
            for s, n in counts.items():
                self.assertLessEqual(n, per_source)
                self.assertEqual(m.adm.pending_from(s), n)
