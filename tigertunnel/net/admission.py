"""Fair admission of pending handshakes under a flood of connects.

A tunnel server holds every accepted TCP connection until its ClientHello
has arrived and been checked (or the handshake deadline passes). Twisted
accepts a hundred or more connections per accept pass, so with a single
"evict the oldest pending handshake" rule a burst of silent connects from
one address pushes a real client out before its hello is even read.

:class:`Admission` decides instead, knowing for each pending handshake its
source address and whether it has sent any byte yet. Only *silent*
connections (no byte received yet) are ever evicted:

* **per source**: a source may hold at most ``per_source`` pending
  handshakes; its next connect evicts its own oldest silent connection
  (which is the newcomer itself when all the others have spoken);
* **in total**: past ``max_pending``, the oldest silent connection of the
  source holding the most pending handshakes goes (ties: the source whose
  oldest silent connection is older).

A newcomer is always silent, so there is always someone to evict. Silence
goes first because a silent connect costs an attacker nothing and proves
nothing, while a client that sent its hello has done what a real client
does at once; a connection that has spoken is only ended by its handshake
(success, failure or the handshake deadline). Consequence, checked by a
property test: a burst of silent connects from one address never evicts a
connection that has sent bytes, from any address. What remains possible:
many addresses that each send a byte and then stall can fill the table for
one handshake deadline; the per-source cap makes that take at least
``max_pending / per_source`` addresses (4 with the defaults), and while it
lasts new connects are refused, never established ones.

The class is pure bookkeeping (no reactor, no transport, no clock): the
caller passes opaque keys and closes what it is told to evict.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Generic, Hashable, List, Optional, Set, Tuple, TypeVar

__all__ = ["Admission", "DEFAULT_MAX_PENDING", "DEFAULT_PER_SOURCE"]

#: Pending handshakes per proxy pair (the server's previous single limit).
DEFAULT_MAX_PENDING = 64
#: Pending handshakes per source address: a client opens its ``-n`` pool
#: connections at once (4 by default), several clients may share a NAT.
DEFAULT_PER_SOURCE = 16

K = TypeVar("K", bound=Hashable)


class _Source(Generic[K]):
    """The pending handshakes of one source address."""

    __slots__ = ("silent", "spoke")

    def __init__(self) -> None:
        #: Silent connection -> arrival serial; insertion order is arrival order.
        self.silent: "OrderedDict[K, int]" = OrderedDict()
        #: Connections that have sent bytes.
        self.spoke: Set[K] = set()

    def __len__(self) -> int:
        return len(self.silent) + len(self.spoke)

    def oldest_silent(self) -> Tuple[K, int]:
        """The oldest silent connection and its serial (there must be one)."""
        return next(iter(self.silent.items()))


class Admission(Generic[K]):
    """Pending handshakes of one listener, and which to evict on overflow.

    Each key is one pending connection; keys must be hashable and unique
    while pending.
    """

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING,
                 per_source: int = DEFAULT_PER_SOURCE) -> None:
        """
        :param max_pending: pending handshakes held at most in all.
        :param per_source: pending handshakes held at most per source.
        :raises ValueError: a limit below 1, or ``per_source`` above
            ``max_pending``.
        """
        if max_pending < 1 or per_source < 1:
            raise ValueError(f"limits must be at least 1, not "
                             f"max_pending={max_pending!r}, per_source={per_source!r}")
        if per_source > max_pending:
            raise ValueError(f"per_source ({per_source}) cannot exceed "
                             f"max_pending ({max_pending})")
        self.max_pending = max_pending
        self.per_source = per_source
        self._sources: Dict[Hashable, _Source[K]] = {}
        self._where: Dict[K, Hashable] = {}
        self._serial = 0
        #: Evictions made so far, for metrics.
        self.evictions = 0

    def __len__(self) -> int:
        """The number of pending handshakes."""
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def pending_from(self, source: Hashable) -> int:
        """The number of pending handshakes from ``source``."""
        entry = self._sources.get(source)
        return len(entry) if entry is not None else 0

    def connection_made(self, key: K, source: Hashable) -> List[K]:
        """Admit a new connection; return the pending ones to close now, in order.

        The list may contain ``key`` itself (a source at its cap whose other
        connections have all spoken, or the largest source being the
        newcomer's). Evicted keys are forgotten: do not call
        :meth:`connection_done` for them.

        :raises ValueError: ``key`` is already pending.
        """
        if key in self._where:
            raise ValueError(f"connection {key!r} is already pending")
        entry = self._sources.get(source)
        if entry is None:
            entry = self._sources[source] = _Source()
        self._serial += 1
        entry.silent[key] = self._serial
        self._where[key] = source
        evicted: List[K] = []
        if len(entry) > self.per_source:
            # One over: the newcomer is silent, so there is a victim here.
            evicted.append(self._evict(entry.oldest_silent()[0]))
        if len(self._where) > self.max_pending:
            evicted.append(self._evict(self._victim()))
        return evicted

    def data_received(self, key: K) -> None:
        """Record that ``key`` sent bytes (idempotent; unknown keys are ignored)."""
        source = self._where.get(key)
        if source is None:
            return
        entry = self._sources[source]
        if entry.silent.pop(key, None) is not None:
            entry.spoke.add(key)

    def connection_done(self, key: K) -> None:
        """Forget ``key``: its handshake ended or it closed (unknown keys are ignored)."""
        source = self._where.pop(key, None)
        if source is None:
            return
        entry = self._sources[source]
        entry.silent.pop(key, None)
        entry.spoke.discard(key)
        if not entry:
            del self._sources[source]

    def silent(self, key: K) -> Optional[bool]:
        """Whether pending ``key`` has sent nothing yet (``None`` if not pending)."""
        source = self._where.get(key)
        if source is None:
            return None
        return key in self._sources[source].silent

    def _victim(self) -> K:
        """The silent connection to evict when the total cap is exceeded."""
        best: Optional[Tuple[int, int, K]] = None
        for entry in self._sources.values():
            if not entry.silent:
                continue
            key, serial = entry.oldest_silent()
            # The largest source first, then the oldest.
            if best is None or (len(entry), -serial) > best[:2]:
                best = (len(entry), -serial, key)
        assert best is not None  # the newcomer is silent
        return best[2]

    def _evict(self, key: K) -> K:
        self.connection_done(key)
        self.evictions += 1
        return key
