"""AEGIS-128X2 encryption of TB frames on a pool connection (docs/protocol.rst §6).

AEAD: AEGIS-128X2 with a 16-byte key, a 16-byte nonce and a **16-byte tag**
(pyaegis' default of 32 bytes would not interoperate).

A plaintext TB frame ``H`` (256-byte header) + ``B`` (body), ``size`` bytes in
all, travels as exactly ``size`` bytes after its 12-byte mux header::

    offset 0   16 bytes   AEAD tag
    offset 16   4 bytes   size, u32 LE, in clear (not in the AD)
    offset 20  size - 20  AEAD ciphertext of P

    P = H[0:64] || H[100:256] || H[240:256] || B

so ``nonce_reserved`` and ``cluster`` are not transmitted and the last 16
header bytes are encrypted twice.  The associated data is the 12-byte mux
header exactly as sent.  The nonce of a frame is the direction's base nonce
with bytes 0..7 XORed with ``LE64(counter)``; each direction of a pool
connection has its own key, base nonce and counter, starting at 0.

* The sender refuses a frame whose ``checksum_padding`` or
  ``checksum_body_padding`` is not zero (``InvalidPadding``) without
  consuming a counter value.
* The receiver advances its counter only when the tag verifies; it rebuilds
  the header with ``nonce_reserved`` zeroed, its own cluster id, and the
  clear size, discards the duplicated 16 bytes, and only then checks the
  padding fields (so a bad padding consumes a counter value, as in the
  reference).

Layout trick used by the sender to save copies: the body sits at offset 256
of the TB frame, at offset 236 of ``P`` and so at offset ``20 + 236 = 256``
of the encrypted frame.  The sender copies ``mux header || frame`` once into
a ``bytearray``, rewrites the 256 header bytes and encrypts in place.
"""

from __future__ import annotations

import struct
from typing import List, Protocol

import pyaegis

from tigertunnel.crypto.layout import (
    CHECKSUM_BODY_PADDING,
    CHECKSUM_PADDING,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    MUX_HEADER_SIZE,
    SIZE_OFFSET,
)
from tigertunnel.errors import AuthenticationError, FrameError, TunnelError

__all__ = ["KEY_SIZE", "NONCE_SIZE", "TAG_SIZE", "CLEAR_SIZE_OFFSET",
           "CIPHERTEXT_OFFSET", "Sealer", "Opener", "FrameSealer", "FrameOpener",
           "frame_nonce"]

# Wire facts, source of truth: docs/protocol.rst §§1 and 6.
KEY_SIZE = 16
NONCE_SIZE = 16
TAG_SIZE = 16
#: Offset of the clear size field, and of the ciphertext, in an encrypted frame.
CLEAR_SIZE_OFFSET = TAG_SIZE
CIPHERTEXT_OFFSET = TAG_SIZE + 4
#: Length of the part of P that comes from the header (64 + 156 + 16).
P_HEADER_SIZE = HEADER_SIZE - CIPHERTEXT_OFFSET

_COUNTER_LIMIT = 1 << 64
_ZERO16 = bytes(16)
_u32_from = struct.Struct("<I").unpack_from
_AEAD = pyaegis.Aegis128X2(tag_size=TAG_SIZE)


def frame_nonce(base_nonce: bytes, counter: int) -> bytes:
    """Return the nonce for ``counter``: ``base_nonce`` with bytes 0..7 XOR LE64(counter).

    :raises ValueError: if ``counter`` is not a u64 or ``base_nonce`` is not
        16 bytes.
    """
    if len(base_nonce) != NONCE_SIZE:
        raise ValueError(f"base nonce must be {NONCE_SIZE} bytes")
    if not 0 <= counter < _COUNTER_LIMIT:
        raise ValueError(f"counter {counter} is not a u64")
    low = int.from_bytes(base_nonce[:8], "little") ^ counter
    return low.to_bytes(8, "little") + bytes(base_nonce[8:])


class _Keys:
    """Key and base nonce of one direction of a pool connection."""

    __slots__ = ("key", "nonce_low", "nonce_high")

    def __init__(self, key: bytes, base_nonce: bytes, counter: int) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
        if len(base_nonce) != NONCE_SIZE:
            raise ValueError(f"base nonce must be {NONCE_SIZE} bytes, got {len(base_nonce)}")
        if not 0 <= counter < _COUNTER_LIMIT:
            raise ValueError(f"counter {counter} is not a u64")
        self.key = bytes(key)
        self.nonce_low = int.from_bytes(base_nonce[:8], "little")
        self.nonce_high = bytes(base_nonce[8:])

    def nonce(self, counter: int) -> bytes:
        """Return the nonce for ``counter`` (which must be below 2**64)."""
        return (self.nonce_low ^ counter).to_bytes(8, "little") + self.nonce_high


class Sealer(Protocol):
    """What the data path uses of a sealer: :class:`FrameSealer` or its
    compiled twin (:mod:`tigertunnel.wire.implementation`)."""

    @property
    def counter(self) -> int:
        """The counter value the next sealed frame uses."""

    def seal_buffer(self, mux_header: bytes, frame: bytes, /) -> bytearray:
        """The wire bytes of ``frame`` sealed behind ``mux_header`` (see :meth:`FrameSealer.seal_buffer`)."""

    def seal(self, mux_header: bytes, frame: bytes, /) -> List[bytes]:
        """Like :meth:`seal_buffer`, as ``[bytes]``."""


class Opener(Protocol):
    """What the data path uses of an opener: :class:`FrameOpener` or its
    compiled twin (:mod:`tigertunnel.wire.implementation`)."""

    @property
    def counter(self) -> int:
        """The counter value the next frame must have been sealed with."""

    def open_buffer(self, mux_header: bytes, payload: "bytes | bytearray", /) -> bytearray:
        """The TB frame of one encrypted frame (see :meth:`FrameOpener.open_buffer`)."""


def _check_ad(mux_header: bytes) -> None:
    if len(mux_header) != MUX_HEADER_SIZE:
        raise FrameError(f"associated data must be the {MUX_HEADER_SIZE}-byte mux header")


class FrameSealer:
    """Encrypt the TB frames one end sends on a pool connection.

    :ivar counter: the counter value the next sealed frame uses.
    """

    def __init__(self, key: bytes, base_nonce: bytes, counter: int = 0) -> None:
        """
        :param key: the direction's 16-byte session key (``c2s_key`` on the
            client, ``s2c_key`` on the server).
        :param base_nonce: the direction's 16-byte base nonce.
        :param counter: the first counter value (0 after a handshake).
        :raises ValueError: on a wrong key or nonce length or a counter
            outside u64.
        """
        self._keys = _Keys(key, base_nonce, counter)
        self.counter = counter

    def seal_buffer(self, mux_header: bytes, frame: bytes) -> bytearray:
        """Encrypt ``frame`` behind ``mux_header`` with the next counter.

        :param mux_header: the 12-byte mux header sent before the frame; it
            is the associated data.
        :param frame: a complete plaintext TB frame (or the 256-byte
            stream_close pseudo header).
        :returns: the wire bytes (``mux_header`` followed by the encrypted
            frame, ``12 + size`` bytes in all) in one new ``bytearray``.
        :raises FrameError: the frame's padding is not zero, its length is
            outside 256 ... 1 MiB or differs from its size field, or the
            header is not 12 bytes. No counter value is consumed.
        :raises TunnelError: the u64 counter is exhausted.
        """
        if type(frame) is not bytes:
            frame = bytes(frame)
        if type(mux_header) is not bytes:
            mux_header = bytes(mux_header)
        size = len(frame)
        if not MIN_FRAME_SIZE <= size <= MAX_FRAME_SIZE:
            raise FrameError(f"TB frame of {size} bytes outside {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}")
        if _u32_from(frame, SIZE_OFFSET)[0] != size:
            raise FrameError(f"TB frame of {size} bytes has size field "
                             f"{_u32_from(frame, SIZE_OFFSET)[0]}")
        if frame[CHECKSUM_PADDING] != _ZERO16 or frame[CHECKSUM_BODY_PADDING] != _ZERO16:
            raise FrameError("InvalidPadding: a checksum padding field is not zero")
        _check_ad(mux_header)
        counter = self.counter
        if counter >= _COUNTER_LIMIT:
            raise TunnelError("frame counter exhausted: the pool connection needs new keys")
        keys = self._keys
        nonce = keys.nonce(counter)
        # out = mux header || H || B; the body is already where the
        # ciphertext of B belongs (offset 12 + 256).
        out = bytearray(mux_header) + frame
        out[MUX_HEADER_SIZE + CLEAR_SIZE_OFFSET:MUX_HEADER_SIZE + HEADER_SIZE] = (
            frame[96:100] + frame[0:64] + frame[100:256] + frame[240:256])
        try:
            with memoryview(out) as view:
                tag = _AEAD.encrypt_inplace(
                    keys.key, nonce, view[MUX_HEADER_SIZE + CIPHERTEXT_OFFSET:],
                    mux_header)
        except (pyaegis.AegisError, ValueError, TypeError) as e:
            raise FrameError(f"frame encryption failed: {e}") from None
        out[MUX_HEADER_SIZE:MUX_HEADER_SIZE + TAG_SIZE] = tag
        self.counter = counter + 1
        return out


    def seal(self, mux_header: bytes, frame: bytes) -> List[bytes]:
        """Like :meth:`seal_buffer`, but return ``[bytes]`` for ``writeSequence``."""
        return [bytes(self.seal_buffer(mux_header, frame))]


class FrameOpener:
    """Authenticate and decrypt the TB frames one end receives on a pool connection.

    :ivar counter: the counter value the next frame must have been sealed with.
    """

    def __init__(self, key: bytes, base_nonce: bytes, cluster_id: int = 0,
                 counter: int = 0) -> None:
        """
        :param key: the direction's 16-byte session key (``s2c_key`` on the
            client, ``c2s_key`` on the server).
        :param base_nonce: the direction's 16-byte base nonce.
        :param cluster_id: this end's configured cluster id (0 if none); it is
            written into every rebuilt header.
        :param counter: the first counter value (0 after a handshake).
        :raises ValueError: on a wrong key or nonce length, a counter outside
            u64 or a cluster id outside u128.
        """
        if not 0 <= cluster_id < 1 << 128:
            raise ValueError(f"cluster id {cluster_id} is not a u128")
        self._keys = _Keys(key, base_nonce, counter)
        self._cluster = cluster_id.to_bytes(16, "little")
        self.counter = counter

    def open_buffer(self, mux_header: bytes, payload: "bytes | bytearray") -> bytearray:
        """Authenticate and decrypt one encrypted frame; rebuild its TB frame.

        :param mux_header: the 12 mux header bytes exactly as received (AD).
        :param payload: the encrypted frame (tag, clear size, ciphertext).
        :returns: the TB frame in a ``bytearray``: ``nonce_reserved`` zeroed,
            ``cluster`` set to this end's cluster id, ``size`` restored. A
            ``bytearray`` payload is decrypted in place and returned (it is
            consumed); ``bytes`` are copied once.
        :raises FrameError: before any decryption, if ``payload`` is outside
            256 ... 1 MiB, its clear size field differs from its length, or
            ``mux_header`` is not 12 bytes (counter unchanged); after a good
            tag, if a padding field is not zero (counter already advanced).
        :raises AuthenticationError: the tag does not verify (counter
            unchanged).
        """
        size = len(payload)
        if not MIN_FRAME_SIZE <= size <= MAX_FRAME_SIZE:
            raise FrameError(f"encrypted frame of {size} bytes outside "
                             f"{MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}")
        clear_size = _u32_from(payload, CLEAR_SIZE_OFFSET)[0]
        if clear_size != size:
            raise FrameError(f"encrypted frame of {size} bytes has size field "
                             f"{clear_size}")
        if type(mux_header) is not bytes:
            mux_header = bytes(mux_header)
        _check_ad(mux_header)
        counter = self.counter
        if counter >= _COUNTER_LIMIT:
            raise AuthenticationError("frame counter exhausted: the pool connection needs new keys")
        keys = self._keys
        out = payload if type(payload) is bytearray else bytearray(payload)
        tag = bytes(out[:TAG_SIZE])
        # In place: P lands at out[20:], so the body B (P[236:]) is already
        # at offset 256 where the TB frame wants it. A failed tag makes
        # pyaegis zero the buffer, which costs at most one frame per pool
        # connection (that connection is closed on the failure).
        # The error is raised outside the ``except`` clause so that it keeps
        # no reference (``__context__``) to pyaegis' frames, which hold a
        # cffi view of ``out``.
        failure = ""
        try:
            _AEAD.decrypt_inplace(keys.key, keys.nonce(counter),
                                  memoryview(out)[CIPHERTEXT_OFFSET:], tag,
                                  mux_header)
        except pyaegis.DecryptionError:
            failure = f"frame with counter {counter} failed to authenticate"
        except (pyaegis.AegisError, ValueError, TypeError) as e:
            failure = f"frame decryption failed: {e}"
        if failure:
            raise AuthenticationError(failure)
        self.counter = counter + 1
        # P[0:64] at out[20:84], P[64:220] at out[84:240].
        head = bytes(out[CIPHERTEXT_OFFSET:CIPHERTEXT_OFFSET + 64])
        if head[CHECKSUM_PADDING] != _ZERO16 or head[CHECKSUM_BODY_PADDING] != _ZERO16:
            raise FrameError("InvalidPadding: a decrypted padding field is not zero")
        out[100:256] = out[CIPHERTEXT_OFFSET + 64:CIPHERTEXT_OFFSET + 220]
        out[0:100] = (head[0:16] + _ZERO16 + head[32:48] + _ZERO16 + _ZERO16
                      + self._cluster + size.to_bytes(4, "little"))
        return out
