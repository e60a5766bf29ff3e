"""The replay window: which accepted ClientHellos must be remembered, and the table that holds them.

A tunnel server accepts a ClientHello only within a tolerance of its
timestamp (``TIMESTAMP_TOLERANCE``, docs/protocol.rst §3.3, defined in
:mod:`tigertunnel.wire.handshake`), so a hello must be remembered, to
refuse its replay, until its timestamp is more than the tolerance in the
past, and may be forgotten afterwards. :func:`oldest_live` is that rule, the
only place it is written; :class:`ReplayTable` applies it to every cache of
the package: the in-memory one of a single process
(:class:`~tigertunnel.wire.handshake.ReplayCache`) and the file or shared
memory every process of a tunnel end uses
(:class:`~tigertunnel.ops.replayfile.FileReplayCache`).

The table is a fixed number of *buckets* of *slots*; a slot is one record::

    record   40 bytes  hello hash (32) | hello timestamp, u64 little-endian (8)

A hash goes to the bucket named by its first four bytes (the hash is a
keyed hash of the hello, so nobody without the PSK can aim at one bucket;
only hellos whose hash verified are recorded). A slot whose timestamp has
left the window (or is 0, never written) is free. Recording a hello reads
its bucket, answers :attr:`Verdict.REPLAYED` if a live slot holds the hash,
else writes the record into a free slot (:attr:`Verdict.FRESH`). A bucket
with no free slot answers :attr:`Verdict.FULL`: the hello is refused rather
than an unexpired one forgotten (forgetting it would let that one be
replayed). Nothing ever has to be compacted: expired slots are reused in
place.

Capacity. With :data:`DEFAULT_BUCKETS` buckets of
:data:`~tigertunnel.wire.replaywindow.DEFAULT_SLOTS`
slots (262,144 slots, 10 MiB as a file) the hashes fall into the buckets
like a Poisson process: the chance that one of 60,000 hellos in the window
found its bucket full is 3 in 100 million, of 80,000 3 in 100,000, of
100,000 0.5 %; from about 130,000 on, some hellos are refused. A hello stays
in the window for at most two hours (its timestamp may be an hour ahead of
the server clock), so a tunnel end refuses nothing below about 8 accepted
hellos a second sustained for two hours (30,000 an hour; a pool connection
makes one per connect).

The storage is a seam (:class:`Buckets`): a bucket is read whole and a
record written in place, so the same table runs over a dictionary
(:class:`MemoryBuckets`) or a file read and written by offset
(:mod:`tigertunnel.ops.replayfile`), laid out as (integers little-endian)::

    header   32 bytes  b"TTREPLAY" | u32 version (2) | u32 record size (40)
                       | u32 slots per bucket | u32 buckets | 8 zero bytes
    buckets  buckets x slots x 40 bytes, records as above

(:func:`pack_header`, :func:`parse_header`). Version 1 was an append log:
a 16-byte header (:func:`is_version_1`) then records.
"""

from __future__ import annotations

import enum
import struct
from typing import Dict, Iterator, Protocol, Tuple

from tigertunnel.errors import ReplayCacheError
from tigertunnel.crypto.layout import MAX_U64

__all__ = ["Verdict", "oldest_live", "ReplayTable", "Buckets", "MemoryBuckets",
           "RECORD", "RECORD_SIZE", "DIGEST_SIZE", "DEFAULT_BUCKETS",
           "DEFAULT_SLOTS", "MAGIC", "VERSION", "HEADER_SIZE", "VERSION_1_HEADER",
           "table_size", "pack_header", "parse_header", "is_version_1"]

DIGEST_SIZE = 32
#: One slot: the hello hash and the hello timestamp.
RECORD = struct.Struct("<32sQ")
RECORD_SIZE = RECORD.size
#: Just the timestamps of a bucket's records.
_TIMESTAMPS = struct.Struct("<32xQ")
#: Buckets and slots per bucket of a cache made with the defaults (see
#: "Capacity" above).
DEFAULT_BUCKETS = 8192
#: Slots per bucket of a cache made with the defaults.
DEFAULT_SLOTS = 32
_EMPTY = bytes(DIGEST_SIZE)
MAGIC = b"TTREPLAY"
VERSION = 2
_HEADER = struct.Struct("<8sIIII8x")
HEADER_SIZE = _HEADER.size
#: The header of version 1, an append log of records.
VERSION_1_HEADER = struct.Struct("<8sII")
#: Largest shape a header may claim (a damaged header is refused).
_MAX_SLOTS = 4096
_MAX_BUCKETS = 1 << 24


class Verdict(enum.Enum):
    """What a replay cache says of a ClientHello it was asked to record."""

    #: Not seen inside the window; now recorded: accept the hello.
    FRESH = "fresh"
    #: Seen before inside the window: a replay, refuse it.
    REPLAYED = "replayed"
    #: No room without forgetting an unexpired hello: refuse it.
    FULL = "full"
    #: It could not be recorded (an I/O error): refuse it.
    FAILED = "failed"


def oldest_live(now: float, tolerance: int) -> int:
    """The oldest hello timestamp that must still be remembered at ``now``.

    A hello is accepted while ``|timestamp - int(now)| <= tolerance``; one
    more second covers a server whose clock reading for the handshake and
    for the cache differ by a fraction of a second.
    """
    return int(now) - tolerance - 1


class Buckets(Protocol):
    """Where a :class:`ReplayTable` keeps its buckets."""

    def read_bucket(self, index: int) -> bytes:
        """Bucket ``index``: its slots' records, end to end (zeros when
        never written).

        :raises OSError: it cannot be read.
        """

    def write_record(self, index: int, slot: int, record: bytes) -> None:
        """Write one record into slot ``slot`` of bucket ``index``.

        :raises OSError: it cannot be written.
        """


class MemoryBuckets:
    """Buckets in this process's memory, made when first written."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._buckets: Dict[int, bytearray] = {}

    def read_bucket(self, index: int) -> bytes:
        bucket = self._buckets.get(index)
        return bytes(self.slots * RECORD_SIZE) if bucket is None else bytes(bucket)

    def write_record(self, index: int, slot: int, record: bytes) -> None:
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = bytearray(self.slots * RECORD_SIZE)
        bucket[slot * RECORD_SIZE:(slot + 1) * RECORD_SIZE] = record

    def written(self) -> Iterator[Tuple[int, bytes]]:
        """Each bucket ever written, with its records (the others are empty)."""
        for index, bucket in sorted(self._buckets.items()):
            yield index, bytes(bucket)


class ReplayTable:
    """The accepted ClientHellos of a tunnel end, for as long as they can be replayed.

    :param buckets: where the buckets are kept.
    :param bucket_count: number of buckets.
    :param slots: slots per bucket.
    :param tolerance: the handshake's timestamp tolerance, in seconds.
    :raises ValueError: a count below 1.
    """

    def __init__(self, buckets: Buckets, bucket_count: int, slots: int,
                 tolerance: int) -> None:
        if bucket_count < 1 or slots < 1:
            raise ValueError(f"a replay table needs at least one bucket and one "
                             f"slot, not {bucket_count} x {slots}")
        self.buckets = buckets
        self.bucket_count = bucket_count
        self.slots = slots
        self.tolerance = tolerance

    @property
    def capacity(self) -> int:
        """Slots in all."""
        return self.bucket_count * self.slots

    def bucket_of(self, digest: bytes) -> int:
        """The bucket a hello hash goes to."""
        return int.from_bytes(digest[:4], "little") % self.bucket_count

    def check_and_add(self, digest: bytes, timestamp: int, now: float) -> Verdict:
        """Record a hello by its hash (see :class:`Verdict`).

        :param digest: the 32-byte ClientHello hash.
        :param timestamp: the hello's timestamp (Unix seconds).
        :param now: the server's clock (Unix seconds).
        :raises ValueError: a hash that is not 32 bytes or a timestamp
            outside u64.
        :raises OSError: the storage failed (nothing was recorded).
        """
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"hello hash must be {DIGEST_SIZE} bytes, got {len(digest)}")
        if not 0 <= timestamp <= MAX_U64:
            raise ValueError(f"timestamp {timestamp} is not a u64")
        digest = bytes(digest)
        index = self.bucket_of(digest)
        data = self.buckets.read_bucket(index)
        oldest = oldest_live(now, self.tolerance)
        at = data.find(digest)
        while at >= 0:
            if at % RECORD_SIZE == 0 and _live(data, at, oldest):
                return Verdict.REPLAYED
            at = data.find(digest, at + 1)
        for slot in range(len(data) // RECORD_SIZE):
            if not _live(data, slot * RECORD_SIZE, oldest):
                self.buckets.write_record(index, slot, RECORD.pack(digest, timestamp))
                return Verdict.FRESH
        return Verdict.FULL

    def live_in(self, data: bytes, now: float) -> int:
        """How many records of ``data`` (whole records) are in the window."""
        oldest = oldest_live(now, self.tolerance)
        return sum(1 for at in range(0, len(data) - RECORD_SIZE + 1, RECORD_SIZE)
                   if _live(data, at, oldest))


def _live(data: bytes, at: int, oldest: int) -> bool:
    """Whether the record at ``at`` holds a hello still in the window (a
    record never written is all zeros)."""
    stamp: int = _TIMESTAMPS.unpack_from(data, at)[0]
    return stamp >= oldest and (stamp != 0 or data[at:at + DIGEST_SIZE] != _EMPTY)


def table_size(buckets: int, slots: int) -> int:
    """Bytes of a stored table of this shape, header included."""
    return HEADER_SIZE + buckets * slots * RECORD_SIZE


def pack_header(buckets: int, slots: int) -> bytes:
    """The header of a stored table of this shape."""
    return _HEADER.pack(MAGIC, VERSION, RECORD_SIZE, slots, buckets)


def parse_header(header: bytes, size: int, name: str) -> Tuple[int, int]:
    """The shape ``(buckets, slots)`` of a stored table of ``size`` bytes
    whose first bytes are ``header``.

    :param name: the file, for the message.
    :raises ReplayCacheError: not a replay table of this version, or
        shorter than its header says (one line naming ``name``).
    """
    if len(header) < HEADER_SIZE or header[:8] != MAGIC:
        raise ReplayCacheError(f"{name}: not a tigertunnel replay cache (bad "
                               f"header); move it away or use another path")
    _, version, record, slots, buckets = _HEADER.unpack_from(header)
    if version != VERSION or record != RECORD_SIZE:
        raise ReplayCacheError(
            f"{name}: replay cache version {version} (record size {record}) is "
            f"not {VERSION} ({RECORD_SIZE}); move it away or use another path")
    if (not 1 <= slots <= _MAX_SLOTS or not 1 <= buckets <= _MAX_BUCKETS
            or size < table_size(buckets, slots)):
        raise ReplayCacheError(
            f"{name}: replay cache is damaged ({size} bytes for {buckets} "
            f"buckets of {slots}); move it away or use another path")
    return buckets, slots


def is_version_1(header: bytes) -> bool:
    """Whether ``header`` starts a stored table of version 1 (an append log)."""
    if len(header) < VERSION_1_HEADER.size:
        return False
    magic, version, record = VERSION_1_HEADER.unpack_from(header)
    return bool(magic == MAGIC and version == 1 and record == RECORD_SIZE)
