"""TB headers built from TigerBeetle's struct layout, and what the trace summaries state.

The header builders lay fields out in the order and sizes of the ``extern
struct``s of TigerBeetle 0.17.8 ``src/vsr/message_header.zig`` and compute
the offsets themselves, so tests compare :mod:`tigertunnel.wire.tbheader`'s
offsets with an independent derivation. :func:`summary` reads the counts that
``tests/traces/*.summary.md`` (copies of ``shared/traces``, written by the
recording relay) state for each trace; :func:`trace_records` reads the
relay's own decoded fields of each frame.
"""

import base64
import gzip
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from tigertunnel.tools.traces import DATA

HERE = os.path.dirname(os.path.abspath(__file__))

Fields = Sequence[Tuple[str, int]]

#: ``Header``: the 128 bytes every command shares (sizes in bytes).
COMMON: Fields = (
    ("checksum", 16), ("checksum_padding", 16), ("checksum_body", 16),
    ("checksum_body_padding", 16), ("nonce_reserved", 16), ("cluster", 16),
    ("size", 4), ("epoch", 4), ("view", 4), ("release", 4), ("protocol", 2),
    ("command", 1), ("replica", 1), ("reserved_frame", 12))
#: ``Header.Request``.
REQUEST: Fields = tuple(COMMON) + (
    ("parent", 16), ("parent_padding", 16), ("client", 16), ("session", 8),
    ("timestamp", 8), ("request", 4), ("operation", 1),
    ("previous_request_latency_padding", 3), ("previous_request_latency", 4),
    ("reserved", 52))
#: ``Header.Reply``.
REPLY: Fields = tuple(COMMON) + (
    ("request_checksum", 16), ("request_checksum_padding", 16), ("context", 16),
    ("context_padding", 16), ("client", 16), ("op", 8), ("commit", 8),
    ("timestamp", 8), ("request", 4), ("operation", 1), ("reserved", 19))
#: ``Header.Eviction``.
EVICTION: Fields = tuple(COMMON) + (("client", 16), ("reserved", 111), ("reason", 1))

#: ``Header.Commit``.
COMMIT: Fields = tuple(COMMON) + (
    ("commit_checksum", 16), ("commit_checksum_padding", 16),
    ("checkpoint_id", 16), ("checkpoint_op", 8), ("commit", 8),
    ("timestamp_monotonic", 8), ("reserved", 56))

#: ``Command`` numbers used by the builders (``src/vsr.zig``).
COMMAND = {"ping": 1, "request": 5, "prepare": 6, "reply": 8, "commit": 9,
           "eviction": 18}


def build(fields: Fields, **values: int) -> bytes:
    """A 256-byte header with ``values`` (little-endian integers) at their fields' offsets."""
    out = bytearray()
    names = set()
    for name, size in fields:
        names.add(name)
        out += values.get(name, 0).to_bytes(size, "little")
    unknown = set(values) - names
    if unknown or len(out) != 256:
        raise ValueError(f"bad header fields {sorted(unknown)} / size {len(out)}")
    return bytes(out)


def request(client: int, number: int, operation: int, **more: int) -> bytes:
    """A ``request`` header of ``client`` with request ``number``."""
    values = dict(command=COMMAND["request"], size=256, client=client,
                  request=number, operation=operation)
    values.update(more)
    return build(REQUEST, **values)


def reply(client: int, number: int, operation: int, view: int = 0, **more: int) -> bytes:
    """A ``reply`` header to ``client``'s request ``number``."""
    values = dict(command=COMMAND["reply"], size=256, client=client,
                  request=number, operation=operation, view=view)
    values.update(more)
    return build(REPLY, **values)


def eviction(client: int, reason: int, replica: int = 0) -> bytes:
    """An ``eviction`` header for ``client``."""
    return build(EVICTION, command=COMMAND["eviction"], size=256, client=client,
                 reason=reason, replica=replica)


def offset(fields: Fields, name: str) -> int:
    """The offset of field ``name`` in ``fields``."""
    at = 0
    for field, size in fields:
        if field == name:
            return at
        at += size
    raise KeyError(name)


def summary(trace: str) -> Dict[str, Dict[Tuple[str, ...], int]]:
    """The count tables of ``tests/traces/<trace>.summary.md``.

    :returns: ``{"command": {(command,): frames}, "command/operation":
        {(command, operation): frames}, "link dir command": {(link, dir,
        command): frames}}``.
    """
    tables: Dict[str, Dict[Tuple[str, ...], int]] = {}
    name = ""
    with open(os.path.join(HERE, "traces", trace + ".summary.md")) as f:
        for line in f:
            if not line.startswith("|"):
                name = ""
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not name:
                name = cells[0]
                tables[name] = {}
            elif not set(cells[0]) <= {"-", ":"}:
                key = cells[0].replace("/", " ").split()
                tables[name][tuple(key)] = int(cells[1])
    return tables


def trace_records(trace: str) -> List[Dict[str, Any]]:
    """The ``frame`` records of a shipped trace as the relay wrote them (decoded fields, ``data``)."""
    records = []
    with gzip.open(os.path.join(DATA, trace + ".jsonl.gz"), "rt") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type") == "frame":
                rec["data"] = base64.b64decode(rec.pop("frame_b64"))
                records.append(rec)
    return records
