"""The parts of a TigerBeetle (TB) message header that observability needs (sans-IO).

Every TB frame starts with a 256-byte little-endian header. The first 128
bytes are the same for every command; the last 128 depend on the command.
Source of truth: ``src/vsr/message_header.zig`` (``Header``, ``Request``,
``Reply``, ``Eviction``), ``src/vsr.zig`` (``Command``, the VSR-reserved
``Operation`` values) and ``src/tigerbeetle.zig`` (the state machine's
``Operation`` values) of TigerBeetle at tag 0.17.8. The offsets, command
numbers, operation numbers and eviction reasons below are identical in every
release from 0.17.0 to 0.17.8 (and on ``main`` up to 0.17.7-141); the command
names are those of 0.17.5 and later (0.17.0 to 0.17.4 called ``get_view``,
``get_headers`` ... ``request_view``, ``request_headers`` ...). Releases before
0.17.0 number the state machine's operations differently (0.16 has
``create_accounts`` = 138, which 0.17 uses for a deprecated variant), so
operation names are right for 0.17 clients only. The layout was checked
against the frames of the shipped 0.17.8 traces (``tools/traces.py``).

Common part (every command):

====== ====== ============================================================
offset length field
====== ====== ============================================================
80     16     ``cluster`` (u128)
96     4      ``size`` (u32: header + body)
104    4      ``view`` (u32)
114    1      ``command`` (u8, :data:`COMMAND_NAMES`)
115    1      ``replica`` (u8: the replica that authored the message)
====== ====== ============================================================

Per command (only the fields used here):

=========  ===============================================================
command    fields
=========  ===============================================================
request    ``client`` u128 @160, ``request`` u32 @192, ``operation`` u8 @196
reply      ``client`` u128 @192, ``request`` u32 @232, ``operation`` u8 @236
eviction   ``client`` u128 @128, ``reason`` u8 @255
=========  ===============================================================

A client has at most one request in flight; the reply to it carries the
same client id and request number. ``register`` is request number 0.

:func:`parse_header` returns a :class:`TBHeader` (for tools and tests);
the per-frame path (:mod:`tigertunnel.wire.tbwatch`) uses the precompiled
``struct`` readers and the name tables directly, which never allocate a
name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from tigertunnel.errors import FrameError

__all__ = [
    "HEADER_SIZE", "COMMAND_OFFSET", "REQUEST", "REPLY", "EVICTION",
    "read_request", "read_reply", "read_eviction",
    "COMMANDS", "OPERATIONS", "EVICTION_REASONS",
    "COMMAND_NAMES", "OPERATION_NAMES", "EVICTION_REASON_NAMES",
    "command_name", "operation_name", "eviction_reason_name",
    "TBHeader", "parse_header",
]

# Wire facts, source of truth: TigerBeetle 0.17.8 src/vsr/message_header.zig.
HEADER_SIZE = 256
CLUSTER_OFFSET = 80
SIZE_OFFSET = 96
VIEW_OFFSET = 104
COMMAND_OFFSET = 114
REPLICA_OFFSET = 115
#: ``Request``: client u128 @160, session u64, timestamp u64, request u32
#: @192, operation u8 @196.
REQUEST_CLIENT_OFFSET = 160
#: ``Reply``: client u128 @192, op u64, commit u64, timestamp u64, request
#: u32 @232, operation u8 @236.
REPLY_CLIENT_OFFSET = 192
#: ``Eviction``: client u128 @128, reserved [111]u8, reason u8 @255.
EVICTION_CLIENT_OFFSET = 128
EVICTION_REASON_OFFSET = 255

#: Command numbers of ``src/vsr.zig`` ``Command`` (0.17.5+ names).
COMMANDS: Dict[str, int] = {
    "reserved": 0, "ping": 1, "pong": 2, "ping_client": 3, "pong_client": 4,
    "request": 5, "prepare": 6, "prepare_ok": 7, "reply": 8, "commit": 9,
    "exit_view": 10, "join_view": 11, "deprecated_12": 12, "get_view": 13,
    "get_headers": 14, "get_prepare": 15, "get_reply": 16, "headers": 17,
    "eviction": 18, "get_blocks": 19, "block": 20, "deprecated_21": 21,
    "deprecated_22": 22, "deprecated_23": 23, "view": 24,
}
REQUEST = COMMANDS["request"]
REPLY = COMMANDS["reply"]
EVICTION = COMMANDS["eviction"]

#: Operation names by number: ``src/vsr.zig`` ``Operation`` (below 128,
#: reserved by VSR) and ``src/tigerbeetle.zig`` ``Operation`` (128 and up).
#: Both enums have a ``pulse`` (4 and 128); TB names both "pulse".
OPERATIONS: Dict[int, str] = {
    0: "reserved", 1: "root", 2: "register", 3: "reconfigure", 4: "pulse",
    5: "upgrade", 6: "noop",
    128: "pulse",
    129: "deprecated_create_accounts_unbatched",
    130: "deprecated_create_transfers_unbatched",
    131: "deprecated_lookup_accounts_unbatched",
    132: "deprecated_lookup_transfers_unbatched",
    133: "deprecated_get_account_transfers_unbatched",
    134: "deprecated_get_account_balances_unbatched",
    135: "deprecated_query_accounts_unbatched",
    136: "deprecated_query_transfers_unbatched",
    137: "get_change_events",
    138: "deprecated_create_accounts_sparse",
    139: "deprecated_create_transfers_sparse",
    140: "lookup_accounts", 141: "lookup_transfers",
    142: "get_account_transfers", 143: "get_account_balances",
    144: "query_accounts", 145: "query_transfers",
    146: "create_accounts", 147: "create_transfers",
}

#: ``Header.Eviction.Reason`` of ``src/vsr/message_header.zig``.
EVICTION_REASONS: Dict[str, int] = {
    "reserved": 0, "no_session": 1, "client_release_too_low": 2,
    "client_release_too_high": 3, "invalid_request_operation": 4,
    "invalid_request_body": 5, "invalid_request_body_size": 6,
    "session_too_low": 7, "session_release_mismatch": 8,
}


def _table(known: Dict[int, str], prefix: str) -> Tuple[str, ...]:
    return tuple(known.get(n, f"{prefix}{n}") for n in range(256))


#: Name of every u8 value: known names, else ``cmd_<n>`` / ``op_<n>`` /
#: ``reason_<n>``.
COMMAND_NAMES = _table({v: k for k, v in COMMANDS.items()}, "cmd_")
OPERATION_NAMES = _table(OPERATIONS, "op_")
EVICTION_REASON_NAMES = _table({v: k for k, v in EVICTION_REASONS.items()}, "reason_")


def command_name(command: int) -> str:
    """Return TB's name of ``command`` (``cmd_<n>`` when unknown).

    :raises FrameError: if ``command`` is not a u8.
    """
    return _name(COMMAND_NAMES, command, "command")


def operation_name(operation: int) -> str:
    """Return TB 0.17's name of ``operation`` (``op_<n>`` when unknown).

    :raises FrameError: if ``operation`` is not a u8.
    """
    return _name(OPERATION_NAMES, operation, "operation")


def eviction_reason_name(reason: int) -> str:
    """Return TB's name of eviction ``reason`` (``reason_<n>`` when unknown).

    :raises FrameError: if ``reason`` is not a u8.
    """
    return _name(EVICTION_REASON_NAMES, reason, "eviction reason")


def _name(table: Tuple[str, ...], value: int, what: str) -> str:
    if not 0 <= value <= 255:
        raise FrameError(f"TB {what} {value} is not a u8")
    return table[value]


# Precompiled readers; a u128 client id comes as (low u64, high u64).
#: From @160 of a request: client (2 x u64), session, timestamp (skipped),
#: request, operation.
read_request = struct.Struct("<QQ16xIB").unpack_from
#: From @104 of a reply: view, then client @192 (2 x u64), op, commit and
#: timestamp (skipped), request @232, operation @236.
read_reply = struct.Struct("<I84xQQ24xIB").unpack_from
#: From @128 of an eviction: client (2 x u64), reserved, reason @255.
read_eviction = struct.Struct("<QQ111xB").unpack_from
#: From @80: cluster (2 x u64), size, view, command, replica (epoch,
#: release and protocol skipped).
_read_common = struct.Struct("<QQI4xI4x2xBB").unpack_from


@dataclass(frozen=True)
class TBHeader:
    """The fields of one TB header that tigertunnel reports.

    ``client``, ``request`` and ``operation`` are set for ``request`` and
    ``reply``; ``client`` and ``reason`` for ``eviction``; they are ``None``
    for other commands.
    """

    command: int
    cluster: int
    size: int
    view: int
    replica: int
    client: Optional[int] = None
    request: Optional[int] = None
    operation: Optional[int] = None
    reason: Optional[int] = None

    @property
    def command_name(self) -> str:
        """TB's name of the command (``cmd_<n>`` when unknown)."""
        return COMMAND_NAMES[self.command]

    @property
    def operation_name(self) -> Optional[str]:
        """TB 0.17's name of the operation, or ``None`` without one."""
        return None if self.operation is None else OPERATION_NAMES[self.operation]

    @property
    def reason_name(self) -> Optional[str]:
        """TB's name of the eviction reason, or ``None`` without one."""
        return None if self.reason is None else EVICTION_REASON_NAMES[self.reason]


def parse_header(header: "bytes | bytearray | memoryview") -> TBHeader:
    """Read the reported fields of the TB header at the start of ``header``.

    Nothing is validated beyond the length: a TB frame has already passed
    :class:`tigertunnel.wire.frames.FrameParser` when it gets here, and
    unknown commands, operations and reasons are reported by number.

    :param header: a TB frame, or at least its 256-byte header.
    :raises FrameError: if ``header`` is shorter than 256 bytes.
    """
    if len(header) < HEADER_SIZE:
        raise FrameError(f"TB header too short ({len(header)} bytes, need {HEADER_SIZE})")
    lo, hi, size, view, command, replica = _read_common(header, CLUSTER_OFFSET)
    cluster = lo | hi << 64
    if command == REQUEST:
        clo, chi, request, operation = read_request(header, REQUEST_CLIENT_OFFSET)
        return TBHeader(command, cluster, size, view, replica, clo | chi << 64,
                        request, operation)
    if command == REPLY:
        _, clo, chi, request, operation = read_reply(header, VIEW_OFFSET)
        return TBHeader(command, cluster, size, view, replica, clo | chi << 64,
                        request, operation)
    if command == EVICTION:
        clo, chi, reason = read_eviction(header, EVICTION_CLIENT_OFFSET)
        return TBHeader(command, cluster, size, view, replica, clo | chi << 64,
                        reason=reason)
    return TBHeader(command, cluster, size, view, replica)
