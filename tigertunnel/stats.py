"""The counters of a proxy pair, typed: what :mod:`tigertunnel.ops.metrics` reads.

One :class:`Stats` per multiplexer, shared by its sessions and pool
connections. Every counter only grows. The reasons of failed handshakes and
refused sessions are enums whose values are the metric labels.
"""

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from tigertunnel.config.model import Role
from tigertunnel.wire.handshake import RejectKind, Status


class HandshakeFailure(enum.Enum):
    """Why a pool connection's handshake failed (label ``reason``)."""

    #: No hello or ServerHello within the handshake timeout (either end).
    TIMEOUT = "timeout"
    # Tunnel client: how the server answered.
    SERVER_AUTH = "server_auth"
    INVALID_STATUS = "invalid_status"
    REJECTED_UNKNOWN_KEY = "rejected_unknown_key"
    REJECTED_SERVER_ERROR = "rejected_server_error"
    REJECTED_UNKNOWN_KEM_KEY = "rejected_unknown_kem_key"
    REJECTED_CLIENT_AUTH_FAILED = "rejected_client_auth_failed"
    REJECTED_TIMESTAMP_INVALID = "rejected_timestamp_invalid"
    # Tunnel server: why it rejected the ClientHello (RejectKind).
    BAD_VERSION = "bad_version"
    BAD_OPERATION = "bad_operation"
    UNKNOWN_KEY = "unknown_key"
    BAD_HASH = "bad_hash"
    TIMESTAMP = "timestamp"
    REPLAY = "replay"
    REPLAY_CACHE_FULL = "replay_cache_full"
    REPLAY_CACHE_ERROR = "replay_cache_error"
    KEM_REQUIRED = "kem_required"
    KEM = "kem"

    @classmethod
    def rejected(cls, kind: RejectKind) -> "HandshakeFailure":
        """The failure of a ClientHello the server rejected for ``kind``."""
        return _BY_REJECTION[kind]

    @classmethod
    def refused(cls, status: Optional[int]) -> "HandshakeFailure":
        """The failure the client saw: the server's status byte, or
        ``None`` when the ServerHello did not authenticate."""
        if status is None:
            return cls.SERVER_AUTH
        return _BY_STATUS.get(status, cls.INVALID_STATUS)


_BY_REJECTION = {kind: HandshakeFailure[kind.name] for kind in RejectKind}
_BY_STATUS = {int(status): HandshakeFailure[f"REJECTED_{status.name}"]
              for status in Status if status is not Status.OK}


class Refusal(enum.Enum):
    """Why a new session (tunnel client) or stream (server) was refused."""

    #: The tunnel end is shutting down.
    STOPPING = "stopping"
    #: Tunnel client: no established pool connection.
    NO_POOL = "no_pool"
    #: ``-m`` sessions already open on the pair.
    MAX_SESSIONS = "max_sessions"


def handshake_reasons(role: Role) -> "tuple[HandshakeFailure, ...]":
    """Every reason a handshake of a ``role`` tunnel end can fail for."""
    if role is Role.CLIENT:
        found = [HandshakeFailure.TIMEOUT, HandshakeFailure.SERVER_AUTH,
                 HandshakeFailure.INVALID_STATUS, *_BY_STATUS.values()]
    else:
        found = [HandshakeFailure.TIMEOUT, *_BY_REJECTION.values()]
    return tuple(dict.fromkeys(found))


def refusal_reasons(role: Role) -> "tuple[Refusal, ...]":
    """Every reason a ``role`` tunnel end can refuse a session or stream for."""
    if role is Role.CLIENT:
        return tuple(Refusal)
    return (Refusal.STOPPING, Refusal.MAX_SESSIONS)


@dataclass(slots=True, eq=False)
class Stats:
    """Monotonic counters of one proxy pair.

    ``to_tunnel`` counts TB frames read from the TB side and sent into the
    tunnel, ``from_tunnel`` the frames written to the TB side.
    """

    frames_to_tunnel: int = 0
    bytes_to_tunnel: int = 0
    frames_from_tunnel: int = 0
    bytes_from_tunnel: int = 0
    #: Sessions (streams) opened.
    sessions_opened: int = 0
    #: Sessions closed because their TB peer stopped reading.
    sessions_overflowed: int = 0
    #: Pool connections established (handshake completed).
    pool_connects: int = 0
    #: Pool connections re-established by a slot that was up before.
    pool_reconnects: int = 0
    #: Established pool connections lost.
    pool_losses: int = 0
    #: Pool connections closed for a protocol or authentication error.
    pool_failures: int = 0
    #: Pool connections closed because the peer fell silent (heartbeat).
    pool_timeouts: int = 0
    #: Pending handshakes dropped because too many were pending.
    handshake_evictions: int = 0
    #: Backend (replica) connections that could not be made.
    backend_connect_failures: int = 0
    handshake_failures: "Counter[HandshakeFailure]" = field(default_factory=Counter)
    sessions_refused: "Counter[Refusal]" = field(default_factory=Counter)


@dataclass(slots=True, eq=False)
class Reachability:
    """Whether a tunnel server pair's backend (its replica) took the last connect.

    Written by the pair's sessions (each connects the backend) and by the
    periodic probe of :mod:`tigertunnel.ops.backend`; read by ``/metrics``
    and ``/status``.

    :ivar reachable: the last connect's outcome, ``None`` before the first.
    :ivar checked: when it ended (the reactor's seconds), ``None`` before.
    :ivar error: why it failed (empty when it succeeded).
    """

    reachable: Optional[bool] = None
    checked: Optional[float] = None
    error: str = ""

    def record(self, ok: bool, now: float, error: str = "") -> None:
        """Keep the outcome of a backend connect that ended at ``now``."""
        self.reachable = ok
        self.checked = now
        self.error = "" if ok else error
