"""Fair admission of pending handshakes under a flood of connects.

A tunnel server holds every accepted TCP connection until its ClientHello
has arrived and been checked (or the handshake deadline passes). A real
client sends its whole hello in one write as soon as it is connected, so a
connection that has not completed its hello is either a client whose
hello is on its way, or an attacker: silent connects cost nothing, and a
connection that sends one byte and stalls costs hardly more.

:class:`Admission` keeps the pending handshakes of one listener, grouped by
*source group* (:func:`source_group`: an IPv4 address; an IPv6 /64, with
IPv4-mapped IPv6 addresses taken as IPv4), and says which to close when a
cap is exceeded:

* **per group**: a group holds at most ``per_group`` pending handshakes; one
  more closes one of that group's;
* **in total**: past ``max_pending``, one is closed from all groups.

Which one: the pending handshake that made the least progress toward a
complete hello, in two tiers, the first tier first:

1. *stale*: no complete hello ``grace`` seconds after the connect (silent or
   partial): fewest bytes first, then the oldest;
2. *fresh*: under the total cap from the group holding most; then fewest
   bytes first (silent before partial), then the oldest.

Sending a byte buys a connection at most ``grace`` seconds, not immunity:
once stale, a staller goes before any fresh connection, from any group.
A complete hello is never pending (the handshake runs as soon as it is
read). The caller reads a connection's waiting bytes before closing it
(:class:`~tigertunnel.net.multiplexer.ServerMultiplexer` does), so a
client whose hello has arrived but not yet been read is not the one
closed: its hello is handled there and then, and the policy is asked
again. What remains possible: a client whose hello has not arrived yet
when it is picked (16 more connects from its group were accepted first)
is closed and reconnects after its backoff, and a partial hello that
takes longer than ``grace`` is ranked with the stallers.

The class is bookkeeping only: no reactor, no transport; time comes from the
injected ``now`` (the reactor's clock in the server, a test's ``Clock``).
The caller passes opaque keys and closes what it is told to evict.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Dict, Generic, Hashable, Optional, Tuple, TypeVar

__all__ = ["Admission", "DEFAULT_GRACE", "DEFAULT_MAX_PENDING",
           "DEFAULT_PER_GROUP", "source_group"]

#: Pending handshakes per proxy pair.
DEFAULT_MAX_PENDING = 64
#: Pending handshakes per source group: a client opens its ``-n`` pool
#: connections at once (4 by default), several clients may share a NAT.
DEFAULT_PER_GROUP = 16
#: Seconds after its connect during which a connection ranks as fresh (a
#: real client's hello, even split over two TCP segments with one of them
#: retransmitted, arrives well within it).
DEFAULT_GRACE = 1.0
#: Prefix length that makes one IPv6 source group: a /64 is the smallest
#: network an IPv6 site is given, so one host may use any address in it.
IPV6_GROUP_PREFIX = 64

#: What identifies a pending handshake.
K = TypeVar("K", bound=Hashable)


def source_group(host: Optional[str]) -> Hashable:
    """The source group of a peer address: the IPv4 address itself, the /64
    of an IPv6 address (its zone dropped), the IPv4 address of an
    IPv4-mapped IPv6 one; anything that is not an IP address (a UNIX
    socket, ``None``) is its own group."""
    if host is None:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
        return ipaddress.IPv6Network((address, IPV6_GROUP_PREFIX), strict=False)
    return address


class _Pending:
    """One pending handshake: its group, arrival and progress."""

    __slots__ = ("group", "serial", "since", "received")

    def __init__(self, group: Hashable, serial: int, since: float) -> None:
        self.group = group
        self.serial = serial
        self.since = since
        #: Bytes of its hello received so far.
        self.received = 0


class Admission(Generic[K]):
    """Pending handshakes of one listener, and which to evict on overflow.

    Each key is one pending connection; keys must be hashable and unique
    while pending. Use: :meth:`connection_made` for each new connection,
    then close :meth:`victim` (after :meth:`evict`) until it is ``None``;
    :meth:`data_received` as hello bytes arrive; :meth:`connection_done`
    when the handshake ended.
    """

    def __init__(self, now: Callable[[], float],
                 max_pending: int = DEFAULT_MAX_PENDING,
                 per_group: int = DEFAULT_PER_GROUP,
                 grace: float = DEFAULT_GRACE) -> None:
        """
        :param now: the current time in seconds (the reactor's ``seconds``).
        :param max_pending: pending handshakes held at most in all.
        :param per_group: pending handshakes held at most per source group.
        :param grace: seconds a fresh connection is ranked as fresh (see
            the module).
        :raises ValueError: a limit below 1, ``per_group`` above
            ``max_pending``, or a negative ``grace``.
        """
        if max_pending < 1 or per_group < 1:
            raise ValueError(f"limits must be at least 1, not "
                             f"max_pending={max_pending!r}, per_group={per_group!r}")
        if per_group > max_pending:
            raise ValueError(f"per_group ({per_group}) cannot exceed "
                             f"max_pending ({max_pending})")
        if not grace >= 0:
            raise ValueError(f"grace must be at least 0 seconds, not {grace!r}")
        self.max_pending = max_pending
        self.per_group = per_group
        self.grace = grace
        self._now = now
        self._pending: Dict[K, _Pending] = {}
        self._groups: Dict[Hashable, Dict[K, None]] = {}
        self._serial = 0
        #: The group that grew last (the per-group cap is checked there).
        self._last_group: Hashable = None
        #: Evictions made so far, for metrics.
        self.evictions = 0

    def __len__(self) -> int:
        """The number of pending handshakes."""
        return len(self._pending)

    def __contains__(self, key: object) -> bool:
        return key in self._pending

    def pending_from(self, source: Optional[str]) -> int:
        """The number of pending handshakes from ``source``'s group."""
        return len(self._groups.get(source_group(source), ()))

    def connection_made(self, key: K, source: Optional[str]) -> None:
        """Admit a new connection from address ``source``; then ask
        :meth:`victim` which to close.

        :raises ValueError: ``key`` is already pending.
        """
        if key in self._pending:
            raise ValueError(f"connection {key!r} is already pending")
        group = source_group(source)
        self._serial += 1
        self._pending[key] = _Pending(group, self._serial, self._now())
        self._groups.setdefault(group, {})[key] = None
        self._last_group = group

    def data_received(self, key: K, count: int = 1) -> None:
        """Record ``count`` more hello bytes from ``key`` (unknown keys are ignored)."""
        entry = self._pending.get(key)
        if entry is not None:
            entry.received += count

    def connection_done(self, key: K) -> None:
        """Forget ``key``: its handshake ended or it closed (unknown keys are ignored)."""
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        members = self._groups[entry.group]
        del members[key]
        if not members:
            del self._groups[entry.group]

    def evict(self, key: K) -> None:
        """Forget ``key`` as evicted (counted in :attr:`evictions`)."""
        if key in self._pending:
            self.connection_done(key)
            self.evictions += 1

    def received(self, key: K) -> Optional[int]:
        """The hello bytes ``key`` sent so far (``None`` if not pending)."""
        entry = self._pending.get(key)
        return None if entry is None else entry.received

    def victim(self) -> Optional[K]:
        """The pending handshake to close now, or ``None`` while within both caps.

        The per-group cap is checked for the group that grew last, then
        the total cap.
        """
        members = self._groups.get(self._last_group)
        now = self._now()
        if members is not None and len(members) > self.per_group:
            return self._lowest(members, now, spread=False)
        if len(self._pending) > self.max_pending:
            return self._lowest(self._pending, now, spread=True)
        return None

    def _lowest(self, keys: "Dict[K, _Pending] | Dict[K, None]", now: float,
                spread: bool) -> K:
        """The key among ``keys`` that ranks first for eviction."""
        best: Optional[Tuple[Tuple[int, int, int, int], K]] = None
        pending = self._pending
        groups = self._groups
        grace = self.grace
        for key in keys:
            entry = pending[key]
            size = len(groups[entry.group]) if spread else 0
            if now - entry.since >= grace:
                rank = (0, 0, entry.received, entry.serial)
            else:
                rank = (1, -size, entry.received, entry.serial)
            if best is None or rank < best[0]:
                best = (rank, key)
        assert best is not None  # keys is never empty
        return best[1]
