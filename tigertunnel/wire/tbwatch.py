"""What a proxy pair sees of TigerBeetle: request latency, commands, evictions, views (sans-IO).

A :class:`TBWatch` is fed the header of every TB frame a proxy pair forwards,
with its direction and the current time, and

* counts frames by command and direction (:attr:`TBWatch.frames`), and
  ``request`` frames by operation (:attr:`TBWatch.requests`);
* pairs each ``request`` with its ``reply``: a TB client has at most one
  request in flight, and the reply carries the client id and request number
  of the request. The round trip runs from the first time the request was
  seen (a client resends a request, and in a cluster sends it to the
  primary and to a backup, on other connections) to the first reply; it is
  reported once, through :meth:`TBEvents.request_done`, to the watch that
  saw that reply. Later copies of the reply are only counted as frames;
* reports ``eviction`` frames (:meth:`TBEvents.evicted`), every rise of
  the highest view seen in replies (:meth:`TBEvents.view_changed`: a new
  primary, as the clients see it), and the cluster mismatches its caller
  finds (:meth:`TBWatch.cluster_mismatch`).

Requests wait in an :class:`InFlight` table keyed by client id. Share one
table between the watches of every proxy pair of a tunnel end, so that a
request sent through one pair and answered through another (a client talks
to every replica of its cluster) is paired once. The table holds at most one
request per client and at most ``limit`` clients (the oldest goes first);
requests forwarded between replicas, which get no reply on that link, are
replaced by their client's next request.

Per frame the cost is a byte read and a list increment, plus one
``struct`` read and a dict lookup for a request or reply: no name is built
and nothing is logged here (names are in :mod:`tigertunnel.wire.tbheader`).
"""

from __future__ import annotations

from typing import Dict, List, Protocol, Tuple

from tigertunnel.errors import FrameError
from tigertunnel.wire.tbheader import (
    COMMAND_OFFSET, EVICTION, EVICTION_CLIENT_OFFSET, HEADER_SIZE,
    REPLICA_OFFSET, REPLY, REQUEST, REQUEST_CLIENT_OFFSET, VIEW_OFFSET,
    read_eviction, read_reply, read_request)

__all__ = ["TO_TUNNEL", "FROM_TUNNEL", "DIRECTIONS", "TBEvents", "InFlight",
           "TBWatch"]

#: Directions, as in the tunnel's other counters: ``to_tunnel`` = read from
#: the TB side and sent into the tunnel, ``from_tunnel`` = the reverse.
TO_TUNNEL = 0
#: Read from the tunnel and written to the TB side.
FROM_TUNNEL = 1
DIRECTIONS = ("to_tunnel", "from_tunnel")

#: Default bound of an :class:`InFlight` table. A TB cluster serves at most
#: ``clients_max`` clients (64 by default in 0.17).
DEFAULT_LIMIT = 4096

# A waiting request: (client high u64, request number, operation, first seen).
_Entry = Tuple[int, int, int, float]


class TBEvents(Protocol):
    """Where a :class:`TBWatch` reports what it pairs and spots."""

    def request_done(self, operation: int, seconds: float) -> None:
        """A request of ``operation`` got its reply ``seconds`` after it was first seen."""

    def evicted(self, client: int, reason: int, replica: int) -> None:
        """Replica ``replica`` evicted ``client`` for ``reason`` (an eviction frame)."""

    def view_changed(self, old: int, new: int) -> None:
        """The highest view in replies rose from ``old`` (-1: none seen yet) to ``new``."""

    def cluster_mismatch(self, expected: int, got: int) -> None:
        """A frame carried cluster ``got`` where ``expected`` is configured."""


class InFlight:
    """Requests awaiting their reply, one per client id (see the module docstring).

    :ivar dropped: requests forgotten because ``limit`` clients were waiting.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        """
        :param limit: most clients with a request waiting.
        :raises ValueError: if ``limit`` is below 1.
        """
        if limit < 1:
            raise ValueError(f"in-flight limit must be at least 1, not {limit}")
        self.limit = limit
        # Keyed by the client id's low 64 bits (ids are random u128); the
        # high half is checked in the entry.
        self.waiting: Dict[int, _Entry] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.waiting)

    def make_room(self) -> None:
        """Forget the oldest request if the table is full."""
        if len(self.waiting) >= self.limit:
            del self.waiting[next(iter(self.waiting))]
            self.dropped += 1


class TBWatch:
    """The TB-aware counters of one proxy pair, fed one frame header at a time.

    :ivar frames: frames by ``command * 2 + direction``
        (:data:`TO_TUNNEL`/:data:`~tigertunnel.wire.tbwatch.FROM_TUNNEL`), 512 counters.
    :ivar requests: ``request`` frames by operation number, 256 counters
        (resent and hedged copies included).
    :ivar view: the highest view seen in a reply, -1 before the first.
    """

    __slots__ = ("frames", "requests", "view", "events", "in_flight", "_waiting")

    def __init__(self, events: TBEvents, in_flight: "InFlight | None" = None) -> None:
        """
        :param events: receives completed requests, evictions, view changes.
        :param in_flight: the table of waiting requests, shared by the
            watches of one tunnel end; a private one if ``None``.
        """
        self.frames: List[int] = [0] * 512
        self.requests: List[int] = [0] * 256
        self.view = -1
        self.events = events
        self.in_flight = in_flight if in_flight is not None else InFlight()
        self._waiting = self.in_flight.waiting

    def frame(self, direction: int, header: "bytes | bytearray | memoryview",
              now: float) -> None:
        """Account for one TB frame.

        :param direction: :data:`TO_TUNNEL` or :data:`~tigertunnel.wire.tbwatch.FROM_TUNNEL`.
        :param header: the frame, or at least its 256-byte header.
        :param now: the current time in seconds (any monotonic clock).
        :raises FrameError: if ``header`` is shorter than a TB header.
        """
        if len(header) < HEADER_SIZE:
            raise FrameError(f"TB header too short ({len(header)} bytes, "
                             f"need {HEADER_SIZE})")
        # One method for the whole path: a call costs as much as the work.
        command = header[COMMAND_OFFSET]
        self.frames[command * 2 + direction] += 1
        if command == REQUEST:
            lo, hi, request, operation = read_request(header, REQUEST_CLIENT_OFFSET)
            self.requests[operation] += 1
            if not (lo or hi):
                return  # pulse and upgrade come from no client session
            waiting = self._waiting
            entry = waiting.get(lo)
            if entry is None:
                self.in_flight.make_room()
            elif entry[1] == request and entry[0] == hi:
                return  # a resent or hedged copy: the first one counts
            waiting[lo] = (hi, request, operation, now)
        elif command == REPLY:
            view, lo, hi, request, _ = read_reply(header, VIEW_OFFSET)
            if view > self.view:
                old, self.view = self.view, view
                self.events.view_changed(old, view)
            entry = self._waiting.get(lo)
            if entry is not None and entry[1] == request and entry[0] == hi:
                del self._waiting[lo]
                self.events.request_done(entry[2], now - entry[3])
        elif command == EVICTION:
            lo, hi, reason = read_eviction(header, EVICTION_CLIENT_OFFSET)
            self.events.evicted(lo | hi << 64, reason, header[REPLICA_OFFSET])

    def cluster_mismatch(self, expected: int, got: int) -> None:
        """Report a frame whose cluster is not the configured one.

        The tunnel client's frame checks (:func:`tigertunnel.wire.frames.check_frame`)
        find these; this passes them on to the events.
        """
        self.events.cluster_mismatch(expected, got)
