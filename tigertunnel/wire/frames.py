"""Sans-IO parsing of TigerBeetle (TB) frames (docs/protocol.rst §§6.1 and 7.7).

A TB frame is a 256-byte header followed by a body; the header's ``size``
field (u32 little-endian at offset 96) is the total length, header included,
and must lie in 256 ... 1 MiB.  The tunnel never looks at checksums or
commands: the only header fields it uses are

====== ====== =====================================================
offset length field
====== ====== =====================================================
16     16     ``checksum_padding`` (must be zero)
48     16     ``checksum_body_padding`` (must be zero)
64     16     ``nonce_reserved`` (zeroed in transit when encrypted)
80     16     ``cluster`` (u128 LE; checked by the tunnel client)
96     4      ``size`` (u32 LE, header + body)
====== ====== =====================================================

:class:`FrameParser` cuts a byte stream from a TB peer (a TB client or a
backend replica) into frames, whatever the chunking of the bytes, and rejects
a bad ``size`` as soon as its four bytes are readable, before any of the body
has to be buffered.  :func:`check_frame` applies the padding and cluster rules
the tunnel client enforces on frames read from a TB client.
"""

from __future__ import annotations

import struct
from typing import List, Optional

from tigertunnel.crypto.layout import (
    CHECKSUM_BODY_PADDING,
    CHECKSUM_PADDING,
    CLUSTER_OFFSET,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    NONCE_RESERVED,
    SIZE_END,
    SIZE_OFFSET,
)
from tigertunnel.errors import ClusterMismatchError, FrameError

__all__ = [
    "HEADER_SIZE", "MIN_FRAME_SIZE", "MAX_FRAME_SIZE", "SIZE_OFFSET",
    "CLUSTER_OFFSET", "CHECKSUM_PADDING", "CHECKSUM_BODY_PADDING",
    "frame_size", "frame_cluster", "check_padding", "check_frame",
    "FrameParser",
]

# The TB header's wire facts (docs/protocol.rst §6.1) are defined in
# tigertunnel.crypto.layout, below the AEAD that moves them, and used here.

_ZERO16 = bytes(16)
_u32_from = struct.Struct("<I").unpack_from


def frame_size(header: bytes) -> int:
    """Return the ``size`` field (u32 LE at offset 96) of a TB header.

    :param header: at least the first 100 bytes of a TB frame.
    :raises FrameError: if ``header`` is shorter than 100 bytes.
    """
    if len(header) < SIZE_END:
        raise FrameError(f"TB header too short to hold a size ({len(header)} bytes)")
    return int(_u32_from(header, SIZE_OFFSET)[0])


def frame_cluster(frame: bytes) -> int:
    """Return the ``cluster`` field (u128 LE at offset 80) of a TB header.

    :param frame: at least the first 96 bytes of a TB frame.
    :raises FrameError: if ``frame`` is shorter than 96 bytes.
    """
    if len(frame) < CLUSTER_OFFSET + 16:
        raise FrameError(f"TB header too short to hold a cluster ({len(frame)} bytes)")
    return int.from_bytes(frame[CLUSTER_OFFSET:CLUSTER_OFFSET + 16], "little")


def check_padding(frame: bytes) -> None:
    """Check that both padding fields of a TB header are zero.

    This is the reference's ``InvalidPadding`` rule (docs/protocol.rst §6.2).

    :param frame: a TB frame (at least its 256-byte header).
    :raises FrameError: if ``checksum_padding`` or ``checksum_body_padding``
        holds a non-zero byte, or the header is incomplete.
    """
    if len(frame) < HEADER_SIZE:
        raise FrameError(f"TB frame shorter than its header ({len(frame)} bytes)")
    if frame[CHECKSUM_PADDING] != _ZERO16:
        raise FrameError("InvalidPadding: checksum_padding is not zero")
    if frame[CHECKSUM_BODY_PADDING] != _ZERO16:
        raise FrameError("InvalidPadding: checksum_body_padding is not zero")


def check_frame(frame: bytes, cluster_id: Optional[int]) -> None:
    """Apply the tunnel client's rules to a frame read from a TB client.

    :param frame: a complete TB frame.
    :param cluster_id: the configured cluster id (``-c``), or ``None`` when
        none is configured, in which case the frame's cluster must be 0.
    :raises FrameError: if a padding field or ``nonce_reserved`` is not zero.
    :raises ClusterMismatchError: if the frame's cluster differs from
        ``cluster_id`` (``expected`` is 0 when ``cluster_id`` is ``None``).
    """
    check_padding(frame)
    if frame[NONCE_RESERVED] != _ZERO16:
        # Not carried by the encrypted format: the receiver would zero it
        # and TB would drop the frame on its checksum. Fail closed instead.
        raise FrameError("nonce_reserved is not zero (the tunnel cannot carry it)")
    expected = 0 if cluster_id is None else cluster_id
    got = frame_cluster(frame)
    if got != expected:
        raise ClusterMismatchError(expected, got)


#: More pending chunks than this are merged (see FrameParser._merge_chunks).
MAX_CHUNKS = 64


def merge_chunks(chunks: "List[bytes | bytearray | memoryview]") -> "List[bytes | bytearray | memoryview]":
    """Fold pending chunks into one growing buffer (a one-element list).

    A peer dripping a frame one byte per read would otherwise cost a Python
    object per byte (about 45 bytes each); folding whenever more than
    :data:`MAX_CHUNKS` are pending keeps the overhead linear and small.
    """
    head = chunks[0]
    if type(head) is not bytearray:
        head = bytearray(head)
    head += b"".join(chunks[1:])
    return [head]


class FrameParser:
    """Cut a byte stream into complete TB frames (sans-IO).

    Feed it whatever the transport delivered; it returns the frames that are
    complete and keeps the rest.  A ``size`` outside ``256 ... max_size`` is
    an error as soon as the four size bytes have arrived.  After an error the
    parser is dead: every later :meth:`feed` raises :class:`~tigertunnel.errors.FrameError`.

    Frames that precede a bad header in the same :meth:`feed` call are not
    returned (the caller ends the session on the error anyway).
    """

    def __init__(self, max_size: int = MAX_FRAME_SIZE) -> None:
        """
        :param max_size: the largest acceptable frame, header included.
        :raises ValueError: if ``max_size`` is below 256 or above 1 MiB.
        """
        if not MIN_FRAME_SIZE <= max_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_size must be in {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}")
        self._max_size = max_size
        # The incomplete tail: chunks as received, joined once when the
        # frame they start is complete (a 1 MiB frame arrives in many reads;
        # growing one bytearray per read costs far more than one join).
        self._chunks: List["bytes | bytearray | memoryview"] = []
        self._have = 0
        self._need = 0
        self._error: Optional[FrameError] = None

    def buffered(self) -> int:
        """Return how many bytes of an incomplete frame are held."""
        return self._have

    def _fail(self, message: str) -> FrameError:
        self._error = FrameError(message)
        self._chunks = []
        self._have = self._need = 0
        return self._error

    def feed(self, data: bytes) -> List[bytes]:
        """Add ``data`` and return every frame it completed, in order.

        :returns: complete frames, each a ``bytes`` of exactly ``size`` bytes.
        :raises FrameError: if a frame's size is out of range, or the parser
            already failed.
        """
        if self._error is not None:
            raise FrameError(f"frame parser already failed: {self._error}")
        if not data:
            return []
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if len(self._chunks) > MAX_CHUNKS:
                self._chunks = merge_chunks(self._chunks)
            if self._have < self._need:
                return []
            data = b"".join(self._chunks)
            self._chunks = []
            self._have = 0
        elif type(data) is not bytes:
            data = bytes(data)
        frames: List[bytes] = []
        end = self._scan(data, frames)
        left = len(data) - end
        if left:
            self._chunks = [memoryview(data)[end:]]
            self._have = left
            self._need = (_u32_from(data, end + SIZE_OFFSET)[0]
                          if left >= SIZE_END else SIZE_END)
        return frames

    def _scan(self, src: "bytes | memoryview", frames: List[bytes]) -> int:
        """Append the complete frames of ``src`` and return where they end."""
        limit = self._max_size
        avail = len(src)
        off = 0
        while avail - off >= SIZE_END:
            size = _u32_from(src, off + SIZE_OFFSET)[0]
            if size < MIN_FRAME_SIZE or size > limit:
                raise self._fail(
                    f"TB frame size {size} outside {MIN_FRAME_SIZE}..{limit}")
            if avail - off < size:
                break
            frames.append(bytes(src[off:off + size]))
            off += size
        return off

