"""The data path of a pool connection, one call per read (sans-IO).

Forwarding a TB frame is the tunnel's whole job, and a small frame's cost is
mostly per-call overhead, so the data path has two objects that take a
whole read at a time:

* :class:`FrameEncoder`, one per session: the bytes read from the session's
  TB peer in, the bytes to write on its pool connection out. It cuts them
  into TB frames (docs/protocol.rst §6.1), applies the tunnel's frame checks,
  puts a data mux header before each frame (7.1) and seals it with the pool
  connection's sender (6.2, 6.3); in plaintext mode it only adds the
  headers.
* :class:`MuxReceiver`, one per pool connection: the bytes read from the
  pool connection in, ``(stream_id, frame_type, payload)`` triples out, in
  wire order. Data payloads come out as rebuilt TB frames (6.5), an
  encrypted stream_close's payload opened; a stream_open has an empty
  payload. What a frame type means (who may send it, what a close must
  contain) is the caller's business (:mod:`tigertunnel.wire.codec`).

Errors. Every frame of a read is checked before any is sealed, and every
mux header of a read before anything is opened. A read that holds a bad
frame therefore sends nothing and costs no counter value; the encoder (or
receiver) then stays dead and its session (or pool connection) is closed
by the caller. A frame that fails to authenticate leaves the receive
counter where it was.

Each class has a compiled twin in :mod:`tigertunnel.wire._hotpath` with the
same API and results; the classes here are the pure-Python reference, and
:mod:`tigertunnel.wire.implementation` picks which set the program uses.
An encoder takes any :class:`~tigertunnel.crypto.aead.Sealer` and a
receiver any :class:`~tigertunnel.crypto.aead.Opener` here; the compiled
twins take only the compiled sealer and opener.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

from tigertunnel.crypto.aead import Opener, Sealer
from tigertunnel.errors import FrameError, MuxError, TunnelError
from tigertunnel.wire.frames import (
    CHECKSUM_BODY_PADDING,
    CHECKSUM_PADDING,
    HEADER_SIZE,
    FrameParser,
    check_frame,
)
from tigertunnel.wire.muxframes import FrameType, MuxDecoder, encode_header

__all__ = ["FrameEncoder", "MuxReceiver", "Item"]

_ZERO16 = bytes(16)
_COUNTER_LIMIT = 1 << 64

#: One item :meth:`MuxReceiver.feed` returns: stream id, frame type, payload.
Item = Tuple[int, int, Union[bytes, bytearray]]


class FrameEncoder:
    """Turn the bytes a session's TB peer sent into pool-connection wire bytes.

    :param stream_id: the session's stream id (a u32).
    :param sealer: the pool connection's sending
        :class:`~tigertunnel.crypto.aead.Sealer`, or ``None`` in plaintext
        mode.
    :param check: apply :func:`~tigertunnel.wire.frames.check_frame` to
        every frame (padding, ``nonce_reserved``, cluster); the tunnel does
        whenever it encrypts or a cluster id is configured. Without it an
        encrypting encoder still refuses non-zero padding, as the sealer
        does.
    :param cluster_id: the cluster a checked frame must carry (``None``:
        0, no ``-c`` configured).
    :param watch: called with the 256-byte TB header of every frame of a
        read once the whole read passed its checks, in order, before any is
        sealed (the TB-aware accounting); an exception from it fails the
        encoder like a bad frame.
    :raises ValueError: ``stream_id`` is not a u32 or ``cluster_id`` not a
        u128.
    :raises TypeError: ``watch`` is not callable.

    :ivar last_frames: how many TB frames the last :meth:`encode` call
        completed (0 after a failure); the TB bytes among its output are
        ``len(output) - 12 * last_frames``.
    """

    def __init__(self, stream_id: int, sealer: Optional[Sealer], check: bool,
                 cluster_id: Optional[int] = None,
                 watch: "Optional[Callable[[bytes], object]]" = None) -> None:
        self._header = encode_header(stream_id, FrameType.DATA)
        if cluster_id is not None and not 0 <= cluster_id < 1 << 128:
            raise ValueError(f"cluster id {cluster_id} is not a u128")
        if watch is not None and not callable(watch):
            raise TypeError(f"watch must be callable or None, not {type(watch).__name__}")
        self._watch = watch
        self.last_frames = 0
        self._sealer = sealer
        self._check = bool(check)
        self._cluster_id = cluster_id
        self._parser = FrameParser()
        self._error: Optional[Exception] = None

    def buffered(self) -> int:
        """Return how many bytes of an incomplete TB frame are held (none once failed)."""
        return 0 if self._error is not None else self._parser.buffered()

    def encode(self, data: bytes) -> "bytes | bytearray":
        """Return the wire bytes of every TB frame ``data`` completed (maybe none).

        :raises FrameError: a TB frame's size is outside 256 ... 1 MiB, or
            (checked) a padding field or ``nonce_reserved`` is not zero, or
            the encoder already failed.
        :raises ClusterMismatchError: (checked) a frame's cluster is not the
            configured one.
        :raises TunnelError: the sender's u64 counter would run out.
        """
        self.last_frames = 0
        if self._error is not None:
            raise FrameError(f"frame encoder already failed: {self._error}")
        try:
            return self._encode(data)
        except Exception as e:  # a bad frame, or the watch failed
            self._error = e
            self._parser = FrameParser()  # what it held is never used
            raise

    def _encode(self, data: bytes) -> "bytes | bytearray":
        complete = self._parser.feed(data)
        if not complete:
            return b""
        if self._check:
            for frame in complete:
                check_frame(frame, self._cluster_id)
        header, sealer = self._header, self._sealer
        if sealer is None:
            self._watched(complete)
            return b"".join([part for frame in complete for part in (header, frame)])
        for frame in complete:
            if frame[CHECKSUM_PADDING] != _ZERO16 or frame[CHECKSUM_BODY_PADDING] != _ZERO16:
                raise FrameError("InvalidPadding: a checksum padding field is not zero")
        if sealer.counter + len(complete) > _COUNTER_LIMIT:
            raise TunnelError("frame counter exhausted: the pool connection needs new keys")
        self._watched(complete)
        if len(complete) == 1:
            return sealer.seal_buffer(header, complete[0])
        return b"".join([sealer.seal_buffer(header, frame) for frame in complete])

    def _watched(self, complete: List[bytes]) -> None:
        """Show every checked frame's header to the watch; count the frames."""
        watch = self._watch
        if watch is not None:
            for frame in complete:
                watch(bytes(frame[:HEADER_SIZE]))
        self.last_frames = len(complete)


class MuxReceiver:
    """Turn the bytes read from a pool connection into opened mux frames.

    :param opener: the pool connection's receiving
        :class:`~tigertunnel.crypto.aead.Opener`, or ``None`` in plaintext
        mode.
    :param extended: also accept the version-2 frame types (sealed
        ``stream_open`` 3, ping 4, pong 5; encrypted mode only), whose
        256-byte payloads come out opened like a ``stream_close``'s.
    """

    def __init__(self, opener: Optional[Opener], extended: bool = False) -> None:
        self._extended = opener is not None and bool(extended)
        self._decoder = MuxDecoder(encrypted=opener is not None, extended=self._extended)
        self._opener = opener
        self._error: Optional[TunnelError] = None

    def buffered(self) -> int:
        """Return how many bytes of an incomplete mux frame are held (none once failed)."""
        return 0 if self._error is not None else self._decoder.buffered()

    def feed(self, data: bytes) -> List[Item]:
        """Return ``(stream_id, frame_type, payload)`` for every mux frame ``data`` completed.

        ``payload`` is the rebuilt TB frame of a data frame, the opened
        pseudo header of an encrypted stream_close, the plain payload in
        plaintext mode, and empty for a stream_open.

        :raises MuxError: bad magic, frame type or data size, or the
            receiver already failed.
        :raises AuthenticationError: a sealed payload failed to
            authenticate (the counter stays).
        :raises FrameError: a sealed payload's clear size field is wrong,
            or an authenticated one has non-zero padding.
        """
        if self._error is not None:
            raise MuxError(f"mux receiver already failed: {self._error}")
        try:
            items: List[Item] = []
            opener = self._opener
            for frame in self._decoder.feed(data):
                payload: "bytes | bytearray" = frame.payload
                if opener is not None and payload:
                    payload = opener.open_buffer(frame.header, payload)
                items.append((frame.stream_id, int(frame.frame_type), payload))
        except TunnelError as e:
            self._error = e
            self._decoder = MuxDecoder(encrypted=self._opener is not None,
                                       extended=self._extended)  # never used again
            raise
        return items

