"""Tests for :mod:`tigertunnel.wire.tbwatch` (request/reply pairing and TB frame counts)."""

from collections import Counter
from typing import Dict, List, Tuple

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests import tbdata
from tigertunnel.errors import FrameError
from tigertunnel.wire.tbheader import COMMAND_NAMES, OPERATION_NAMES
from tigertunnel.wire.tbwatch import (DIRECTIONS, FROM_TUNNEL, TO_TUNNEL, InFlight,
                                      TBWatch)

SINGLE = "tb-0.17.8-single"
CLUSTER3 = "tb-0.17.8-cluster3"
CLIENT = (7 << 64) | 42


class Events:
    """Keeps every event a watch reports, in order."""

    def __init__(self) -> None:
        self.done: List[Tuple[int, float]] = []
        self.evictions: List[Tuple[int, int, int]] = []
        self.views: List[Tuple[int, int]] = []
        self.mismatches: List[Tuple[int, int]] = []

    def request_done(self, operation: int, seconds: float) -> None:
        self.done.append((operation, seconds))

    def evicted(self, client: int, reason: int, replica: int) -> None:
        self.evictions.append((client, reason, replica))

    def view_changed(self, old: int, new: int) -> None:
        self.views.append((old, new))

    def cluster_mismatch(self, expected: int, got: int) -> None:
        self.mismatches.append((expected, got))


def direction(rec: Dict[str, object]) -> int:
    """A trace record's direction as a tunnel client next to the connecting side sees it."""
    return TO_TUNNEL if rec["dir"] == "up" else FROM_TUNNEL


def frame_counts(watch: TBWatch) -> Dict[Tuple[str, str], int]:
    """A watch's non-zero frame counters by (command name, direction name)."""
    return {(COMMAND_NAMES[i // 2], DIRECTIONS[i % 2]): n
            for i, n in enumerate(watch.frames) if n}


class SingleTraceTests(SynchronousTestCase):
    """One client session against one replica, as recorded from TB 0.17.8."""

    def setUp(self) -> None:
        self.records = tbdata.trace_records(SINGLE)
        self.events = Events()
        self.watch = TBWatch(self.events)
        for rec in self.records:
            self.watch.frame(direction(rec), rec["data"], rec["t"])

    def test_every_request_paired(self) -> None:
        """Every request of the trace is paired with its reply and nothing is left waiting."""
        stated = tbdata.summary(SINGLE)
        self.assertEqual(len(self.events.done), stated["command"][("request",)])
        self.assertEqual(len(self.events.done), stated["command"][("reply",)])
        self.assertEqual(len(self.watch.in_flight), 0)

    def test_requests_per_operation_match_the_summary(self) -> None:
        """Completed requests per operation equal the summary's replies per operation."""
        stated = {op: n for (command, op), n in tbdata.summary(SINGLE)["command/operation"].items()
                  if command == "reply"}
        done = Counter(OPERATION_NAMES[op] for op, _ in self.events.done)
        self.assertEqual(dict(done), stated)

    def test_durations(self) -> None:
        """Each round trip is the recorded time from a request to the next reply."""
        sent = [r["t"] for r in self.records if r["command_name"] == "request"]
        answered = [r["t"] for r in self.records if r["command_name"] == "reply"]
        expected = [b - a for a, b in zip(sent, answered)]
        self.assertEqual(len(expected), len(self.events.done))
        for (_, seconds), want in zip(self.events.done, expected):
            self.assertAlmostEqual(seconds, want, places=9)
            self.assertGreater(seconds, 0)

    def test_frame_counts(self) -> None:
        """Frames per command and direction equal the summary's per-direction counts."""
        stated = tbdata.summary(SINGLE)["link dir command"]
        expected = {(command, DIRECTIONS[0] if d == "up" else DIRECTIONS[1]): n
                    for (_, d, command), n in stated.items()}
        self.assertEqual(frame_counts(self.watch), expected)

    def test_view(self) -> None:
        """The view of the replies is reported once, as the first view seen."""
        views = {r["view"] for r in self.records if r["command_name"] == "reply"}
        self.assertEqual(self.events.views, [(-1, max(views))])
        self.assertEqual(self.watch.view, max(views))


class ClusterTraceTests(SynchronousTestCase):
    """Three replicas: the client talks to each, replicas forward requests.

    One watch per relayed link (as one tunnel end with one proxy pair per
    link would have), all sharing one in-flight table.
    """

    def setUp(self) -> None:
        self.records = tbdata.trace_records(CLUSTER3)
        self.table = InFlight()
        self.events: Dict[str, Events] = {}
        self.watches: Dict[str, TBWatch] = {}
        for rec in self.records:
            link = rec["link"]
            if link not in self.watches:
                self.events[link] = Events()
                self.watches[link] = TBWatch(self.events[link], self.table)
            self.watches[link].frame(direction(rec), rec["data"], rec["t"])

    def done(self) -> List[Tuple[int, float]]:
        return [d for events in self.events.values() for d in events.done]

    def test_every_request_paired_once(self) -> None:
        """Every request is paired once, however many links carried copies of it and its reply."""
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.table.dropped, 0)
        # The same client session as the single trace: one round trip per
        # distinct request (see shared/traces/README.md).
        session = {op: n for (command, op), n in tbdata.summary(SINGLE)["command/operation"].items()
                   if command == "reply"}
        self.assertEqual(dict(Counter(OPERATION_NAMES[op] for op, _ in self.done())), session)

    def test_paired_round_trips_start_at_first_copy(self) -> None:
        """Each round trip runs from the request's first copy to its reply's first copy."""
        first_sent: Dict[int, float] = {}
        first_answered: Dict[int, float] = {}
        for rec in self.records:
            header = rec["data"]
            number = int.from_bytes(header[192:196] if rec["command_name"] == "request"
                                    else header[232:236], "little")
            if rec["command_name"] == "request" and rec["link"].startswith("client"):
                first_sent.setdefault(number, rec["t"])
            elif rec["command_name"] == "reply":
                first_answered.setdefault(number, rec["t"])
        expected = sorted(first_answered[n] - first_sent[n] for n in first_sent)
        got = sorted(seconds for _, seconds in self.done())
        self.assertEqual(len(got), len(expected))
        for a, b in zip(got, expected):
            self.assertAlmostEqual(a, b, places=9)

    def test_request_frames_by_operation(self) -> None:
        """Request frames per operation, copies included, equal the summary's."""
        stated = {op: n for (command, op), n in tbdata.summary(CLUSTER3)["command/operation"].items()
                  if command == "request"}
        total: Counter[str] = Counter()
        for watch in self.watches.values():
            for op, n in enumerate(watch.requests):
                if n:
                    total[OPERATION_NAMES[op]] += n
        self.assertEqual(dict(total), stated)

    def test_frames_by_link(self) -> None:
        """Frames per link, command and direction equal the summary's, and so do the totals per command."""
        stated = tbdata.summary(CLUSTER3)
        got: Dict[Tuple[str, ...], int] = {}
        per_command: Counter[Tuple[str, ...]] = Counter()
        for link, watch in self.watches.items():
            for (command, d), n in frame_counts(watch).items():
                got[(link, "up" if d == DIRECTIONS[0] else "down", command)] = n
                per_command[(command,)] += n
        self.assertEqual(got, stated["link dir command"])
        self.assertEqual(dict(per_command), stated["command"])

    def test_view_per_link(self) -> None:
        """Links that carried replies saw their view once; replica links saw none."""
        for link, events in self.events.items():
            if link.startswith("client"):
                self.assertEqual(events.views, [(-1, 1)])
            else:
                self.assertEqual(events.views, [])
                self.assertEqual(self.watches[link].view, -1)


class PairingTests(SynchronousTestCase):
    """Request/reply pairing on hand-made headers."""

    def setUp(self) -> None:
        self.events = Events()
        self.watch = TBWatch(self.events)

    def test_resent_request_keeps_first_time(self) -> None:
        """A resent copy of a waiting request does not restart its clock."""
        self.watch.frame(TO_TUNNEL, tbdata.request(CLIENT, 3, 147), 10.0)
        self.watch.frame(TO_TUNNEL, tbdata.request(CLIENT, 3, 147), 12.0)
        self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 3, 147), 12.5)
        self.assertEqual(self.events.done, [(147, 2.5)])
        self.assertEqual(self.watch.requests[147], 2)

    def test_duplicate_reply_counted_once(self) -> None:
        """A second copy of a reply is a frame, not a second round trip."""
        self.watch.frame(TO_TUNNEL, tbdata.request(CLIENT, 1, 140), 1.0)
        self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 1, 140), 1.25)
        self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 1, 140), 1.5)
        self.assertEqual(self.events.done, [(140, 0.25)])
        self.assertEqual(self.watch.frames[8 * 2 + FROM_TUNNEL], 2)

    def test_reply_must_match_client_and_number(self) -> None:
        """Replies to another client, another request number, or a client equal in its low 64 bits only, pair nothing."""
        self.watch.frame(TO_TUNNEL, tbdata.request(CLIENT, 5, 146), 0.0)
        self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 4, 146), 1.0)
        self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT + 1, 5, 146), 1.0)
        self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT ^ (1 << 100), 5, 146), 1.0)
        self.assertEqual(self.events.done, [])
        self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 5, 146), 2.0)
        self.assertEqual(self.events.done, [(146, 2.0)])

    def test_next_request_replaces_unanswered(self) -> None:
        """A client's next request replaces one whose reply never came this way."""
        self.watch.frame(TO_TUNNEL, tbdata.request(CLIENT, 1, 147), 0.0)
        self.watch.frame(TO_TUNNEL, tbdata.request(CLIENT, 2, 141), 5.0)
        self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 1, 147), 6.0)
        self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 2, 141), 7.0)
        self.assertEqual(self.events.done, [(141, 2.0)])
        self.assertEqual(len(self.watch.in_flight), 0)

    def test_clients_paired_independently(self) -> None:
        """Requests of different clients in flight together pair with their own replies."""
        for client in range(1, 4):
            self.watch.frame(TO_TUNNEL, tbdata.request(client, 9, 140 + client), float(client))
        for client in (3, 1, 2):
            self.watch.frame(FROM_TUNNEL, tbdata.reply(client, 9, 140 + client), 10.0)
        self.assertEqual(self.events.done, [(143, 7.0), (141, 9.0), (142, 8.0)])

    def test_direction_does_not_matter(self) -> None:
        """A tunnel server sees requests leave the tunnel and replies enter it; they pair the same."""
        self.watch.frame(FROM_TUNNEL, tbdata.request(CLIENT, 0, 2), 0.5)
        self.watch.frame(TO_TUNNEL, tbdata.reply(CLIENT, 0, 2), 0.75)
        self.assertEqual(self.events.done, [(2, 0.25)])

    def test_pulse_not_waiting(self) -> None:
        """Requests without a client (pulse, upgrade) are counted but never wait for a reply."""
        self.watch.frame(TO_TUNNEL, tbdata.request(0, 0, 4), 0.0)
        self.assertEqual(self.watch.requests[4], 1)
        self.assertEqual(len(self.watch.in_flight), 0)

    def test_limit_drops_oldest(self) -> None:
        """A full in-flight table forgets its oldest request and counts it."""
        watch = TBWatch(self.events, InFlight(limit=2))
        for client in (1, 2, 3):
            watch.frame(TO_TUNNEL, tbdata.request(client, 1, 140), 0.0)
        self.assertEqual((len(watch.in_flight), watch.in_flight.dropped), (2, 1))
        for client in (1, 2, 3):
            watch.frame(FROM_TUNNEL, tbdata.reply(client, 1, 140), 1.0)
        self.assertEqual(len(self.events.done), 2)

    def test_bad_limit(self) -> None:
        """An in-flight limit below 1 is refused, naming it."""
        error = self.assertRaises(ValueError, InFlight, 0)
        self.assertIn("0", str(error))

    def test_shared_table_pairs_across_watches(self) -> None:
        """A request through one pair and its reply through another pair once, reported by the second."""
        table = InFlight()
        other = Events()
        first, second = TBWatch(self.events, table), TBWatch(other, table)
        first.frame(TO_TUNNEL, tbdata.request(CLIENT, 2, 147), 1.0)
        second.frame(TO_TUNNEL, tbdata.request(CLIENT, 2, 147), 1.5)
        second.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 2, 147), 3.0)
        first.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 2, 147), 3.5)
        self.assertEqual((self.events.done, other.done), ([], [(147, 2.0)]))


class EventTests(SynchronousTestCase):
    """Evictions, view changes and cluster mismatches reach the events."""

    def setUp(self) -> None:
        self.events = Events()
        self.watch = TBWatch(self.events)

    def test_eviction(self) -> None:
        """An eviction frame reports its client, reason and replica."""
        self.watch.frame(FROM_TUNNEL, tbdata.eviction(CLIENT, 1, replica=2), 0.0)
        self.assertEqual(self.events.evictions, [(CLIENT, 1, 2)])
        self.assertEqual(self.watch.frames[18 * 2 + FROM_TUNNEL], 1)

    def test_view_rises_only(self) -> None:
        """Only a rise of the highest view in replies is reported."""
        for view in (2, 2, 5, 3, 5, 6):
            self.watch.frame(FROM_TUNNEL, tbdata.reply(CLIENT, 1, 140, view=view), 0.0)
        self.assertEqual(self.events.views, [(-1, 2), (2, 5), (5, 6)])
        self.assertEqual(self.watch.view, 6)

    def test_view_of_other_commands_ignored(self) -> None:
        """Views of requests and other commands are not the view seen in replies."""
        self.watch.frame(TO_TUNNEL, tbdata.request(CLIENT, 1, 140, view=9), 0.0)
        self.watch.frame(TO_TUNNEL, tbdata.build(tbdata.COMMIT, command=9, view=9, size=256), 0.0)
        self.assertEqual((self.events.views, self.watch.view), ([], -1))

    def test_cluster_mismatch(self) -> None:
        """A mismatch found by the caller is passed on with both cluster ids."""
        self.watch.cluster_mismatch(0, 77)
        self.assertEqual(self.events.mismatches, [(0, 77)])


class FuzzTests(SynchronousTestCase):
    """Arbitrary headers never make the watch raise anything but our own errors."""

    @given(st.lists(st.tuples(st.sampled_from((TO_TUNNEL, FROM_TUNNEL)),
                              st.binary(min_size=256, max_size=300)), max_size=30))
    def test_any_headers(self, frames: List[Tuple[int, bytes]]) -> None:
        """Any 256-byte headers are counted, one frame each, without an exception."""
        watch = TBWatch(Events())
        for d, raw in frames:
            watch.frame(d, raw, 0.0)
        self.assertEqual(sum(watch.frames), len(frames))
        self.assertEqual(sum(watch.requests), sum(1 for _, raw in frames if raw[114] == 5))

    @given(st.sampled_from((5, 8, 18, 1)), st.integers(0, 255))
    def test_short_is_frame_error(self, command: int, length: int) -> None:
        """A header cut short is a FrameError naming its length, whatever its command."""
        raw = tbdata.build(tbdata.COMMIT, command=command, size=256)
        watch = TBWatch(Events())
        error = self.assertRaises(FrameError, watch.frame, TO_TUNNEL, bytes(raw[:length]), 0.0)
        self.assertIn(f"{length} bytes", str(error))
