"""What a proxy pair reports about itself: a typed, frozen snapshot.

:meth:`~tigertunnel.net.pairmux.SessionMultiplexer.snapshot` fills a
:class:`PairStatus`; :mod:`tigertunnel.ops.figures` renders it as the
``/status`` document and :mod:`tigertunnel.ops.metrics` as metrics, without
reading the multiplexer's insides or asking which role it plays.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

from tigertunnel.config.model import Role
from tigertunnel.stats import Reachability, Stats


@dataclass(frozen=True)
class PoolConnectionStatus:
    """One established pool connection.

    :ivar state: ``"healthy"``, or ``"draining"`` once a key reload retired
        its key (also while it then closes).
    """

    name: str
    key_id: Optional[int]
    sessions: int
    state: str


@dataclass(frozen=True)
class PairStatus:
    """A proxy pair's figures at one moment.

    :ivar label: what the pair reaches (the metrics' ``pair`` label).
    :ivar healthy: client: a pool connection is up; server: listening and
        the backend took the last connect (or none was tried yet).
    :ivar pool_size: client: ``-n``; server: ``None``.
    :ivar handshaking: pool connections in their handshake.
    :ivar pool_connections: the established pool connections.
    :ivar stats: the pair's counters (live: read them at once).
    :ivar backend: server: the last backend connect; client: ``None``.
    """

    role: Role
    name: str
    label: str
    listen: str
    target: str
    healthy: bool
    stopping: bool
    pool_size: Optional[int]
    handshaking: int
    pool_connections: Tuple[PoolConnectionStatus, ...]
    sessions: int
    stats: Stats
    backend: Optional[Reachability]

    @property
    def draining(self) -> int:
        """Established pool connections draining."""
        return sum(1 for c in self.pool_connections if c.state == "draining")
