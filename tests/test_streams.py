"""Tests for :mod:`tigertunnel.net.streams` (the stream table of a pool connection)."""

from typing import List, Tuple

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.interfaces import PoolConnection
from tigertunnel.net.streams import (
    MAX_UNPROVEN_STREAMS,
    StreamInUseError,
    StreamRefused,
    StreamTable,
)


class FakeSession:
    """A session that records what its pool connection tells it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stream_id = -1
        self.events: List[str] = []

    def attached(self, connection: PoolConnection, stream_id: int) -> None:
        self.stream_id = stream_id

    def deliver(self, frame: "bytes | bytearray") -> None:
        self.events.append("deliver")

    def close_by_peer(self, abort: bool = False) -> None:
        self.events.append("close")

    def pause_reading(self) -> None:
        self.events.append("pause")

    def resume_reading(self) -> None:
        self.events.append("resume")

    def __repr__(self) -> str:
        return f"<FakeSession {self.name}>"


class OpenTests(SynchronousTestCase):
    """The tunnel client numbers the streams it opens."""

    def test_ids_count_up_from_one(self) -> None:
        """Streams opened on a new table get ids 1, 2, 3 and can be looked up by them."""
        table = StreamTable()
        sessions = [FakeSession(str(i)) for i in range(3)]
        self.assertEqual([table.open(s) for s in sessions], [1, 2, 3])
        self.assertEqual([table.lookup(i) for i in (1, 2, 3)], sessions)
        self.assertEqual(len(table), 3)

    def test_ids_not_reused_while_open(self) -> None:
        """After a wrap at 2**32 the id 0 and ids still open are skipped."""
        table = StreamTable()
        first = FakeSession("first")
        self.assertEqual(table.open(first), 1)
        table._next_id = 0xFFFFFFFF
        self.assertEqual(table.open(FakeSession("last")), 0xFFFFFFFF)
        self.assertEqual(table.open(FakeSession("after wrap")), 2)
        self.assertIs(table.lookup(1), first)

    def test_closed_ids_are_not_reused_at_once(self) -> None:
        """A closed stream's id is not handed out again before the counter wraps."""
        table = StreamTable()
        table.open(FakeSession("a"))
        table.remove(1)
        self.assertEqual(table.open(FakeSession("b")), 2)

    @given(st.lists(st.booleans(), max_size=60))
    def test_open_ids_unique(self, closes: List[bool]) -> None:
        """Whatever streams are opened and closed, open streams never share an id."""
        table = StreamTable()
        open_ids: List[int] = []
        for close in closes:
            if close and open_ids:
                table.remove(open_ids.pop(0))
            else:
                open_ids.append(table.open(FakeSession("s")))
        self.assertEqual(len(set(open_ids)), len(open_ids))
        self.assertEqual(sorted(open_ids), sorted(i for i in open_ids if i in table))
        self.assertNotIn(0, open_ids)


class AttachTests(SynchronousTestCase):
    """The tunnel server records the ids the client chose."""

    def test_attach_and_lookup(self) -> None:
        """An attached stream is found under the peer's id; unknown ids find nothing."""
        table = StreamTable()
        session = FakeSession("s")
        table.attach(70000, session)
        self.assertIs(table.lookup(70000), session)
        self.assertIsNone(table.lookup(1))
        self.assertIn(70000, table)

    def test_attach_in_use_refused(self) -> None:
        """Attaching an id that is open raises StreamInUseError naming it and keeps the first session."""
        table = StreamTable()
        first = FakeSession("first")
        table.attach(5, first)
        with self.assertRaises(StreamInUseError) as caught:
            table.attach(5, FakeSession("second"))
        self.assertEqual(str(caught.exception), "stream 5 is already open")
        self.assertIs(table.lookup(5), first)


class RemoveDrainTests(SynchronousTestCase):
    """Streams leave the table one by one or all at once."""

    def test_remove_returns_session(self) -> None:
        """remove forgets a stream and returns its session; removing it again returns None."""
        table = StreamTable()
        session = FakeSession("s")
        stream_id = table.open(session)
        self.assertIs(table.remove(stream_id), session)
        self.assertIsNone(table.remove(stream_id))
        self.assertIsNone(table.lookup(stream_id))

    def test_remove_checks_owner(self) -> None:
        """remove with a session only forgets the stream if that session owns it."""
        table = StreamTable()
        owner, other = FakeSession("owner"), FakeSession("other")
        table.attach(3, owner)
        self.assertIsNone(table.remove(3, other))
        self.assertIs(table.lookup(3), owner)
        self.assertIs(table.remove(3, owner), owner)
        self.assertEqual(len(table), 0)

    def test_drain(self) -> None:
        """drain returns every session and leaves the table empty, with lookup still working."""
        table = StreamTable()
        sessions = [FakeSession(str(i)) for i in range(4)]
        for session in sessions:
            table.open(session)
        self.assertEqual(table.drain(), sessions)
        self.assertEqual(len(table), 0)
        self.assertIsNone(table.lookup(1))
        late = FakeSession("late")
        table.attach(1, late)
        self.assertIs(table.lookup(1), late)

    def test_iteration_is_a_snapshot(self) -> None:
        """Sessions may leave the table while it is iterated."""
        table = StreamTable()
        sessions = [FakeSession(str(i)) for i in range(3)]
        for session in sessions:
            table.open(session)
        seen = []
        for session in table:
            seen.append(session)
            table.drain()
        self.assertEqual(seen, sessions)
        self.assertEqual(len(table), 0)


class UnprovenPolicyTests(SynchronousTestCase):
    """The server's policy for bare stream_opens lives in the table (sans-IO)."""

    def test_proven_open_opens_at_once(self) -> None:
        """A sealed (or plaintext) stream_open says: open the backend now; nothing is held."""
        table = StreamTable()
        self.assertTrue(table.peer_opened(5, proven=True))
        self.assertEqual(table.unproven, set())

    def test_bare_open_waits_for_data(self) -> None:
        """A bare stream_open is held until prove() sees its first data frame, once."""
        table = StreamTable()
        self.assertFalse(table.peer_opened(5, proven=False))
        self.assertEqual(table.unproven, {5})
        self.assertTrue(table.prove(5))
        self.assertFalse(table.prove(5))
        self.assertEqual(table.unproven, set())

    def test_open_of_an_id_in_use_refused(self) -> None:
        """Opening an id that is open or waiting is refused, naming the stream."""
        table = StreamTable()
        table.attach(3, FakeSession("a"))
        table.peer_opened(4, proven=False)
        for stream_id in (3, 4):
            for proven in (True, False):
                with self.assertRaises(StreamRefused) as e:
                    table.peer_opened(stream_id, proven)
                self.assertIn(f"stream {stream_id}", str(e.exception))

    def test_limit(self) -> None:
        """MAX_UNPROVEN_STREAMS wait; one more is refused; a proven open still passes."""
        table = StreamTable()
        for n in range(1, MAX_UNPROVEN_STREAMS + 1):
            self.assertFalse(table.peer_opened(n, proven=False))
        with self.assertRaises(StreamRefused) as e:
            table.peer_opened(MAX_UNPROVEN_STREAMS + 1, proven=False)
        self.assertIn(str(MAX_UNPROVEN_STREAMS), str(e.exception))
        self.assertTrue(table.peer_opened(MAX_UNPROVEN_STREAMS + 1, proven=True))

    def test_peer_close_forgets_either_kind(self) -> None:
        """A stream_close returns an open stream's session, or forgets an unproven id."""
        table = StreamTable()
        session = FakeSession("a")
        table.attach(1, session)
        table.peer_opened(2, proven=False)
        self.assertIs(table.peer_closed(1), session)
        self.assertIsNone(table.peer_closed(2))
        self.assertEqual((len(table), table.unproven), (0, set()))
        self.assertFalse(table.prove(2))

    def test_drain_forgets_unproven(self) -> None:
        """drain() (the pool connection is gone) forgets the waiting ids too."""
        table = StreamTable()
        table.peer_opened(2, proven=False)
        table.drain()
        self.assertEqual(table.unproven, set())

    @given(st.lists(st.tuples(st.sampled_from(["open", "bare", "data", "close"]),
                              st.integers(1, 8)), max_size=80))
    def test_never_more_than_the_limit_and_never_both(self, ops: List[Tuple[str, int]]) -> None:
        """Whatever the peer sends, an id is never both open and unproven, and at most
        MAX_UNPROVEN_STREAMS wait."""
        table = StreamTable()
        for op, stream_id in ops:
            try:
                if op in ("open", "bare"):
                    if table.peer_opened(stream_id, op == "open"):
                        table.attach(stream_id, FakeSession(str(stream_id)))
                elif op == "data":
                    if table.prove(stream_id):
                        table.attach(stream_id, FakeSession(str(stream_id)))
                else:
                    table.peer_closed(stream_id)
            except StreamRefused:
                pass
            self.assertFalse(any(i in table for i in table.unproven))
            self.assertLessEqual(len(table.unproven), MAX_UNPROVEN_STREAMS)
