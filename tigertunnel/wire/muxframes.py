"""Sans-IO codec of the pool-connection byte stream (docs/protocol.rst §§7.1, 7.2, 8).

Every unit on a pool connection starts with a 12-byte mux header, always in
clear:

====== ====== =========================================================
offset length field
====== ====== =========================================================
0      4      magic, u32 LE ``0x5A4D5558`` (wire bytes ``XUMZ``)
4      4      stream_id, u32 LE
8      1      frame_type: 0 = data, 1 = stream_open, 2 = stream_close;
              version 2 only: 3 = sealed stream_open, 4 = ping, 5 = pong
9      3      reserved: sent as zero, not checked (but part of the AD)
====== ====== =========================================================

What follows the header depends on the type and on the mode:

============ =========================================== ==================
type         encrypted mode                              plaintext mode
============ =========================================== ==================
stream_open  nothing                                     nothing
data         encrypted TB frame; total ``size`` as u32   plain TB frame;
             LE at payload offset 16, in clear           ``size`` at 96
stream_close 256-byte encrypted pseudo TB header         nothing
3, 4, 5      256-byte encrypted pseudo TB header         (not allowed)
============ =========================================== ==================

In both modes a data payload is ``size`` bytes long, with ``size`` in
256 ... 1 MiB.  :class:`MuxDecoder` rejects a bad magic, a type it was not
told to accept or a bad size as soon as the offending byte has arrived,
before the payload is buffered.  The 12 header bytes are kept exactly as
received in :attr:`MuxFrame.header`, because they are the AEAD associated
data of the payload (section 6.4).

The encrypted stream_close payload is a 256-byte all-zero TB header with
``size`` = 256, the stream id (u32 LE) at offset 116 and the byte 2 at
offset 120 (:func:`build_close_plaintext`); the server honours the close only
if it authenticates and :func:`is_valid_close` holds.

The version-2 control frames (docs/protocol.rst §12), which only
travel between two of our ends and never to or from the Zig implementation,
use the same pseudo header (:func:`build_control_plaintext`): ``size`` = 256
at offset 96, the mux header's stream id at offset 116, the frame type at
offset 120, a u64 LE ``value`` at offset 128 (the ping sequence number,
echoed by the pong; 0 for a sealed stream_open), every other byte zero.
:func:`parse_control` accepts exactly that layout and nothing else.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import List, Optional

from tigertunnel.crypto.layout import MUX_HEADER_SIZE
from tigertunnel.errors import MuxError
from tigertunnel.crypto.layout import MAX_U64
from tigertunnel.wire.frames import (
    MAX_CHUNKS,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    SIZE_OFFSET,
    merge_chunks,
)

__all__ = [
    "MUX_HEADER_SIZE", "MAGIC", "CLOSE_PAYLOAD_SIZE", "CONTROL_PAYLOAD_SIZE",
    "FrameType", "CONTROL_TYPES", "MuxFrame", "encode_header", "MuxDecoder",
    "build_close_plaintext", "is_valid_close", "build_control_plaintext",
    "parse_control",
]

# Wire facts, source of truth: docs/protocol.rst §§6.2, 7.1 and 7.2 (the
# header's size, which the AEAD needs too, is in tigertunnel.crypto.layout).
MAGIC = b"XUMZ"  # u32 LE 0x5A4D5558
CLOSE_PAYLOAD_SIZE = 256
#: Offset of the clear ``size`` field inside an encrypted TB frame.
ENCRYPTED_SIZE_OFFSET = 16
#: Offsets of the stream id and marker inside a stream_close pseudo header.
CLOSE_STREAM_ID_OFFSET = 116
CLOSE_MARKER_OFFSET = 120
CLOSE_MARKER = 2
#: Payload size of the version-2 control frames, and where their value sits.
CONTROL_PAYLOAD_SIZE = 256
CONTROL_VALUE_OFFSET = 128

_MAX_STREAM_ID = (1 << 32) - 1
_HEADER = struct.Struct("<4sIB3x")
_u32_from = struct.Struct("<I").unpack_from


class FrameType(enum.IntEnum):
    """The ``frame_type`` byte of a mux header."""

    DATA = 0
    OPEN = 1
    CLOSE = 2
    #: Version 2 only (docs/protocol.rst §12).
    SEALED_OPEN = 3
    PING = 4
    PONG = 5


_TYPES = tuple(FrameType)
#: The version-2 frame types: each carries a sealed control pseudo header.
CONTROL_TYPES = (FrameType.SEALED_OPEN, FrameType.PING, FrameType.PONG)
_REFERENCE_MAX_TYPE = int(FrameType.CLOSE)
_EXTENDED_MAX_TYPE = int(FrameType.PONG)


@dataclass(frozen=True)
class MuxFrame:
    """One decoded mux frame.

    :ivar stream_id: the stream (session) it belongs to.
    :ivar frame_type: data, stream_open or stream_close.
    :ivar header: the 12 header bytes exactly as received (the AEAD
        associated data of ``payload``).
    :ivar payload: the bytes after the header: an encrypted or plain TB frame
        for data, the 256-byte encrypted pseudo header for an encrypted
        stream_close, otherwise empty.
    """

    stream_id: int
    frame_type: FrameType
    header: bytes
    payload: "bytes | bytearray"


def encode_header(stream_id: int, frame_type: FrameType) -> bytes:
    """Return the 12-byte mux header for ``stream_id`` and ``frame_type``.

    The reserved bytes are zero.

    :raises ValueError: if ``stream_id`` is not a u32.
    """
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream_id {stream_id} is not a u32")
    return _HEADER.pack(MAGIC, stream_id, int(frame_type))


def build_close_plaintext(stream_id: int) -> bytes:
    """Return the 256-byte pseudo TB header of an encrypted stream_close.

    All zero except ``size`` = 256 at offset 96, ``stream_id`` (u32 LE) at
    offset 116 and the byte 2 at offset 120.  Seal it with the next c2s
    counter and the stream_close mux header as AD.

    :raises ValueError: if ``stream_id`` is not a u32.
    """
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream_id {stream_id} is not a u32")
    out = bytearray(CLOSE_PAYLOAD_SIZE)
    struct.pack_into("<I", out, SIZE_OFFSET, CLOSE_PAYLOAD_SIZE)
    struct.pack_into("<I", out, CLOSE_STREAM_ID_OFFSET, stream_id)
    out[CLOSE_MARKER_OFFSET] = CLOSE_MARKER
    return bytes(out)


def is_valid_close(frame: bytes, stream_id: int) -> bool:
    """Tell whether a decrypted stream_close payload closes ``stream_id``.

    :param frame: the authenticated, decrypted payload (a TB header).
    :returns: ``True`` if its u32 at offset 116 equals ``stream_id`` and its
        byte at offset 120 is 2 (the reference's only checks).
    """
    if len(frame) <= CLOSE_MARKER_OFFSET:
        return False
    return (_u32_from(frame, CLOSE_STREAM_ID_OFFSET)[0] == stream_id
            and frame[CLOSE_MARKER_OFFSET] == CLOSE_MARKER)


def build_control_plaintext(frame_type: FrameType, stream_id: int,
                            value: int = 0) -> bytes:
    """Return the 256-byte pseudo TB header of a version-2 control frame.

    All zero except ``size`` = 256 at offset 96, ``stream_id`` (u32 LE) at
    offset 116, ``frame_type`` at offset 120 and ``value`` (u64 LE) at offset
    128.  Seal it with the sender's next counter and the frame's mux header
    as AD.

    :param frame_type: one of :data:`CONTROL_TYPES`.
    :param value: the ping sequence number (echoed by the pong); 0 for a
        sealed stream_open.
    :raises ValueError: an unknown control type, or a field out of range.
    """
    if frame_type not in CONTROL_TYPES:
        raise ValueError(f"frame type {int(frame_type)} is not a control type")
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream_id {stream_id} is not a u32")
    if not 0 <= value <= MAX_U64:
        raise ValueError(f"control value {value} is not a u64")
    out = bytearray(CONTROL_PAYLOAD_SIZE)
    struct.pack_into("<I", out, SIZE_OFFSET, CONTROL_PAYLOAD_SIZE)
    struct.pack_into("<I", out, CLOSE_STREAM_ID_OFFSET, stream_id)
    out[CLOSE_MARKER_OFFSET] = int(frame_type)
    struct.pack_into("<Q", out, CONTROL_VALUE_OFFSET, value)
    return bytes(out)


def parse_control(frame: "bytes | bytearray", frame_type: FrameType,
                  stream_id: int) -> Optional[int]:
    """Check a decrypted control payload and return its value.

    :param frame: the authenticated, decrypted payload, as the receiver
        rebuilt it (a TB header whose cluster field holds the receiver's
        own cluster id; that field is not transmitted and not checked).
    :returns: the u64 value if ``frame`` is exactly what
        :func:`build_control_plaintext` makes for ``frame_type`` and
        ``stream_id``, else ``None``.
    """
    if len(frame) != CONTROL_PAYLOAD_SIZE or frame_type not in CONTROL_TYPES:
        return None
    value = struct.unpack_from("<Q", frame, CONTROL_VALUE_OFFSET)[0]
    expected = build_control_plaintext(frame_type, stream_id, value)
    # Bytes 80..96 (cluster) are written by the receiver, not sent.
    if frame[:80] != expected[:80] or frame[96:] != expected[96:]:
        return None
    return int(value)


class MuxDecoder:
    """Cut a pool-connection byte stream into :class:`MuxFrame` (sans-IO).

    Feed it the bytes received after the handshake (or from the start in
    plaintext mode).  It returns the frames that are complete and keeps the
    rest.  After an error the decoder is dead: every later :meth:`feed`
    raises :class:`~tigertunnel.errors.MuxError`.  Frames that precede the error in the same
    :meth:`feed` call are not returned.
    """

    def __init__(self, encrypted: bool, extended: bool = False) -> None:
        """
        :param encrypted: ``True`` after a handshake (data payloads carry
            their size at offset 16, stream_close carries 256 bytes),
            ``False`` in plaintext mode (size at offset 96, empty close).
        :param extended: also accept the version-2 frame types 3, 4 and 5
            (encrypted mode only; ignored in plaintext mode).
        """
        self._encrypted = encrypted
        self._max_type = (_EXTENDED_MAX_TYPE if encrypted and extended
                          else _REFERENCE_MAX_TYPE)
        close_size = CLOSE_PAYLOAD_SIZE if encrypted else 0
        #: Payload size by frame type, for every type but data.
        self._sizes = (0, 0, close_size) + (CONTROL_PAYLOAD_SIZE,) * 3
        self._size_end = MUX_HEADER_SIZE + (
            ENCRYPTED_SIZE_OFFSET + 4 if encrypted else SIZE_OFFSET + 4)
        self._size_at = self._size_end - 4
        # The incomplete tail, as received; see FrameParser for why it is a
        # list of chunks rather than one growing buffer.
        self._chunks: List["bytes | bytearray | memoryview"] = []
        self._have = 0
        self._need = 0
        self._large = False  # the pending frame is a data frame of known size
        self._error: Optional[MuxError] = None

    def buffered(self) -> int:
        """Return how many bytes of an incomplete mux frame are held."""
        return self._have

    def _fail(self, message: str) -> MuxError:
        self._error = MuxError(message)
        self._chunks = []
        self._have = self._need = 0
        return self._error

    def feed(self, data: bytes) -> List[MuxFrame]:
        """Add ``data`` and return every mux frame it completed, in order.

        :raises MuxError: on a bad magic, a frame type not accepted, a data size
            outside 256 ... 1 MiB, or if the decoder already failed.
        """
        if self._error is not None:
            raise MuxError(f"mux decoder already failed: {self._error}")
        if not data:
            return []
        frames: List[MuxFrame] = []
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if len(self._chunks) > MAX_CHUNKS:
                self._chunks = merge_chunks(self._chunks)
            if self._have < self._need:
                # Still incomplete; only a short tail may still be invalid.
                if self._have < self._size_end:
                    joined = b"".join(self._chunks)
                    self._chunks = [joined]
                    self._scan(joined, frames)
                    self._set_need(joined, 0)
                return frames
            if self._large:
                data = self._complete_large(frames)
            else:
                data = b"".join(self._chunks)
                self._chunks = []
                self._have = 0
        elif type(data) is not bytes:
            data = bytes(data)
        end = self._scan(data, frames)
        left = len(data) - end
        if left:
            self._chunks = [memoryview(data)[end:]]
            self._have = left
            self._set_need(data, end)
        return frames

    def _set_need(self, src: "bytes | memoryview", off: int) -> None:
        """Work out how many bytes the frame starting at ``off`` needs."""
        left = len(src) - off
        self._large = False
        if left <= 8 or src[off + 8] != FrameType.DATA:
            # The type byte was checked by _scan or _check_partial_header.
            self._need = MUX_HEADER_SIZE + (
                self._sizes[src[off + 8]] if left > 8 else 0)
            if left < MUX_HEADER_SIZE:
                self._need = MUX_HEADER_SIZE
        elif left < self._size_end:
            self._need = self._size_end
        else:
            self._need = MUX_HEADER_SIZE + _u32_from(src, off + self._size_at)[0]
            self._large = True

    def _complete_large(self, frames: List[MuxFrame]) -> bytes:
        """Build the pending data frame from its chunks (one copy); return the rest.

        The frame's magic, type and size were checked when its first
        ``size_end`` bytes arrived.
        """
        chunks, need = self._chunks, self._need
        self._chunks = []
        self._have = 0
        first = bytes(chunks[0][:MUX_HEADER_SIZE]) if len(chunks[0]) >= MUX_HEADER_SIZE \
            else bytes(b"".join(chunks)[:MUX_HEADER_SIZE])
        # Memoryview slices and bytearray.join: each payload byte is copied
        # exactly once, into a buffer that is not zero-filled first.
        parts: List[memoryview] = []
        pos = 0  # position in the stream of the frame
        rest: "bytes | memoryview" = b""
        for chunk in chunks:
            n = len(chunk)
            lo = max(0, MUX_HEADER_SIZE - pos)
            hi = min(n, need - pos)
            view = memoryview(chunk)
            if hi > lo:
                parts.append(view[lo:hi])
            if pos + n > need:
                rest = view[need - pos:]
            pos += n
        payload = bytearray().join(parts)
        frames.append(MuxFrame(_u32_from(first, 4)[0], FrameType.DATA, first,
                               payload))
        return bytes(rest)

    def _scan(self, src: "bytes | memoryview", frames: List[MuxFrame]) -> int:
        """Append the complete frames of ``src`` and return where they end."""
        avail = len(src)
        view = memoryview(src)  # slices of it are not copies
        max_type, sizes = self._max_type, self._sizes
        off = 0
        while True:
            left = avail - off
            if left < MUX_HEADER_SIZE:
                if left:
                    self._check_partial_header(src, off, left)
                return off
            if src[off:off + 4] != MAGIC:
                raise self._fail(f"bad mux magic {bytes(src[off:off + 4]).hex()}")
            type_byte = src[off + 8]
            if type_byte > max_type:
                raise self._fail(f"bad mux frame type {type_byte}")
            frame_type = _TYPES[type_byte]
            if frame_type is FrameType.DATA:
                if left < self._size_end:
                    return off
                size = _u32_from(src, off + self._size_at)[0]
                if size < MIN_FRAME_SIZE or size > MAX_FRAME_SIZE:
                    raise self._fail(
                        f"data frame size {size} outside {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}")
            else:
                size = sizes[type_byte]
            end = off + MUX_HEADER_SIZE + size
            if end > avail:
                return off
            # A data payload is handed out as a bytearray: the receiver
            # decrypts it in place instead of copying it once more.
            payload_type = bytearray if frame_type is FrameType.DATA else bytes
            frames.append(MuxFrame(
                _u32_from(src, off + 4)[0], frame_type,
                bytes(view[off:off + MUX_HEADER_SIZE]),
                payload_type(view[off + MUX_HEADER_SIZE:end])))
            off = end

    def _check_partial_header(self, src: "bytes | memoryview", off: int,
                              left: int) -> None:
        """Reject an incomplete header whose magic or type is already wrong."""
        n = min(left, 4)
        if src[off:off + n] != MAGIC[:n]:
            raise self._fail(f"bad mux magic {bytes(src[off:off + n]).hex()}")
        if left > 8 and src[off + 8] > self._max_type:
            raise self._fail(f"bad mux frame type {src[off + 8]}")
