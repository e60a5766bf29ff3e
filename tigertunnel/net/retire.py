"""Retiring the pool connections of a pair after a key reload.

A key reload (:mod:`tigertunnel.ops.reload`) gives every multiplexer the new
:class:`~tigertunnel.keys.ring.KeyRing` through
:meth:`~tigertunnel.net.pairmux.SessionMultiplexer.retire_outdated`.
Each established pool connection whose
:class:`~tigertunnel.keys.ring.KeyUse` the ring no longer takes as
current moves to ``DRAINING`` (:data:`~tigertunnel.net.states.POOL_TRANSITIONS`)
with a deadline; one whose key became current again goes back to
``ESTABLISHED``. :class:`Retirements` keeps those deadlines for its pair and
decides when a draining connection is closed (see :meth:`Retirements.close_due`).
"""

from typing import Callable, Dict, Iterable, Optional
from weakref import WeakSet

from tigertunnel.logs import logger
from tigertunnel.net.states import PoolState
from tigertunnel.net.tunnel_protocol import TunnelProtocol

log = logger(__name__)

#: Seconds a tunnel client lets a draining pool connection finish its
#: sessions before closing it anyway.
DRAIN_TIMEOUT = 60.0
#: Seconds a tunnel server keeps a busy pool connection whose key was
#: removed before closing it.
RETIRE_GRACE = 60.0


class Retirements:
    """The draining pool connections of one pair and their deadlines.

    :param role: names the tunnel end in logs.
    :param pair: names the pair in logs.
    :param wait: seconds a retired connection may keep its streams.
    :param patient: tunnel client: until a connection with the current key
        is up, close only one idle retired connection at a time and keep
        the others even past their deadline (a key the servers do not
        accept yet cannot take the pool down); a server closes each one
        once idle or past its deadline.
    """

    def __init__(self, role: object, pair: str, wait: float, patient: bool) -> None:
        self.role = role
        self.pair = pair
        self.wait = wait
        self.patient = patient
        self._deadlines: Dict[TunnelProtocol, float] = {}
        self._warned: "WeakSet[TunnelProtocol]" = WeakSet()

    def __contains__(self, connection: object) -> bool:
        return connection in self._deadlines

    def __len__(self) -> int:
        return len(self._deadlines)

    def mark(self, connections: Iterable[TunnelProtocol],
             current: Callable[[TunnelProtocol], bool], now: float) -> None:
        """Retire the established ``connections`` that are not ``current``
        and renew the draining ones that are current again."""
        for connection in connections:
            state = connection.state
            if not current(connection):
                if state is PoolState.ESTABLISHED:
                    connection.retire()
                    self._deadlines[connection] = now + self.wait
                    log.info("{role} pool connection {pool_connection} uses retired "
                             "key id {key_id}; closing it when idle or "
                             "within {wait:.0f} s", role=self.role,
                             pool_connection=connection.name,
                             key_id=connection.key_id, wait=self.wait)
            elif state is PoolState.DRAINING:
                connection.renew()
                self._deadlines.pop(connection, None)

    def forget(self, connection: TunnelProtocol) -> None:
        """``connection`` is gone."""
        self._deadlines.pop(connection, None)

    def close_due(self, connections: Iterable[TunnelProtocol], now: float,
                  current_key: Optional[int]) -> bool:
        """Close the retired connections that may go now.

        :param connections: the pair's established pool connections.
        :param current_key: the key id a client should use (for the warning
            when none with it came up).
        :returns: whether retired connections remain (check again later).
        """
        live = list(connections)
        for gone in [c for c in self._deadlines if c not in live]:
            del self._deadlines[gone]
        healthy = any(c.state is PoolState.ESTABLISHED for c in live)
        pending = False
        for connection in sorted(self._deadlines, key=lambda c: len(c.streams)):
            pending = True
            if connection.state is not PoolState.DRAINING:
                continue  # closing: stays listed until it is gone
            if self._may_close(connection, now >= self._deadlines[connection],
                               healthy, current_key):
                log.info("{role} pool connection {pool_connection}: closing (retired "
                         "key id {key_id}, {count} sessions)",
                         role=self.role, pool_connection=connection.name,
                         key_id=connection.key_id, count=len(connection.streams))
                connection.close_gracefully()
        return pending

    def _may_close(self, connection: TunnelProtocol, expired: bool, healthy: bool,
                   current_key: Optional[int]) -> bool:
        idle = not connection.streams
        if not self.patient or healthy:
            return expired or idle
        if expired and connection not in self._warned:
            self._warned.add(connection)
            log.warn("{role} {pair}: no pool connection with the current key "
                     "came up; keeping {pool_connection} (retired key id {key_id}) "
                     "until one does; check that the servers accept key id "
                     "{current}", role=self.role, pair=self.pair,
                     pool_connection=connection.name, key_id=connection.key_id,
                     current=current_key)
        probing = any(c.state is PoolState.CLOSING for c in self._deadlines)
        return not probing and idle
