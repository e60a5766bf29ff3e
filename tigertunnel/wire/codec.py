"""The sans-IO codec of one established pool connection (PROTOCOL.md section 7).

After the handshake a pool connection carries mux frames: a 12-byte mux
header (magic ``XUMZ``, stream id, frame type) followed by a payload.

* ``stream_open`` (client to server): no payload, not authenticated.
* ``data`` (both ways): one TB frame, AEGIS-128X2 encrypted with the sending
  direction's keys and the next counter; AD = the mux header.
* ``stream_close``: client to server, a 256-byte encrypted pseudo-frame. Our
  extension (README.rst, "Protocol extension"): a client that sent version
  byte 2 in its ClientHello also accepts a ``stream_close`` from the server,
  encrypted the same way with the s2c keys, meaning "the backend of this
  stream is gone or was refused". A server never sends one to a version-1
  (reference) client.

In plaintext mode (no ``-k``) payloads are plain TB frames and a
``stream_close`` has no payload.

:class:`LinkCodec` turns received bytes into :class:`StreamOpened`,
:class:`StreamData` and :class:`StreamClosed` events and encodes outgoing
frames; it keeps the two AEAD counters in step with the wire. Any
authentication or framing failure raises and leaves the codec dead: the
caller closes the pool connection and every session on it, so nothing after
a bad frame is ever delivered.
"""

from dataclasses import dataclass
from typing import List, Optional, Union

from tigertunnel.crypto.aead import FrameOpener, FrameSealer
from tigertunnel.crypto.kdf import SessionKeys
from tigertunnel.errors import MuxError, TunnelError
from tigertunnel.wire.muxframes import (
    FrameType,
    MuxDecoder,
    build_close_plaintext,
    encode_header,
    is_valid_close,
)

CLIENT = "client"
SERVER = "server"


@dataclass(frozen=True)
class StreamOpened:
    """The client opened stream ``stream_id`` (seen by the server only)."""

    stream_id: int


@dataclass(frozen=True)
class StreamData:
    """One complete, authenticated TB frame for stream ``stream_id``."""

    stream_id: int
    frame: "bytes | bytearray"


@dataclass(frozen=True)
class StreamClosed:
    """The peer closed stream ``stream_id``."""

    stream_id: int


Event = Union[StreamOpened, StreamData, StreamClosed]


class LinkCodec:
    """Encode and decode the mux frames of one pool connection.

    :param role: ``"client"`` or ``"server"``: which end of the pool
        connection this codec runs on.
    :param keys: the session keys from the handshake, or ``None`` in
        plaintext mode.
    :param cluster_id: the cluster id written into received TB headers
        (encrypted mode only; plaintext frames pass unchanged).
    :param peer_extended: server side: the client announced version 2 and
        accepts server-sent ``stream_close``. Client side: ``True`` (we
        always announce version 2 and accept them).
    """

    def __init__(self, role: str, keys: Optional[SessionKeys],
                 cluster_id: int = 0, peer_extended: bool = True) -> None:
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be client or server, not {role!r}")
        self.role = role
        self.encrypted = keys is not None
        self._decoder = MuxDecoder(encrypted=self.encrypted)
        self._dead = False
        self.peer_extended = peer_extended
        self._sealer: Optional[FrameSealer] = None
        self._opener: Optional[FrameOpener] = None
        if keys is not None:
            if role == CLIENT:
                self._sealer = FrameSealer(keys.c2s_key, keys.c2s_nonce)
                self._opener = FrameOpener(keys.s2c_key, keys.s2c_nonce,
                                           cluster_id)
            else:
                self._sealer = FrameSealer(keys.s2c_key, keys.s2c_nonce)
                self._opener = FrameOpener(keys.c2s_key, keys.c2s_nonce,
                                           cluster_id)

    @property
    def can_send_close(self) -> bool:
        """Whether this end may send ``stream_close`` frames to the peer."""
        if self.role == CLIENT:
            return True
        return self.encrypted and self.peer_extended

    # -- receiving ---------------------------------------------------------

    def feed(self, data: bytes) -> List[Event]:
        """Decode received bytes into events, in wire order.

        :raises MuxError: malformed framing, or a frame type the peer may
            not send.
        :raises AuthenticationError: a frame failed to authenticate.
        :raises FrameError: an authenticated frame has non-zero padding.
        """
        if self._dead:
            raise MuxError("pool connection codec already failed")
        events: List[Event] = []
        try:
            for frame in self._decoder.feed(data):
                events.append(self._event(frame.stream_id, frame.frame_type,
                                          frame.header, frame.payload))
        except TunnelError:
            self._dead = True
            raise
        return events

    def _event(self, stream_id: int, frame_type: FrameType, header: bytes,
               payload: "bytes | bytearray") -> Event:
        if frame_type == FrameType.DATA:
            if self._opener is not None:
                return StreamData(stream_id,
                                  self._opener.open_buffer(header, payload))
            return StreamData(stream_id, payload)
        if frame_type == FrameType.OPEN:
            if self.role == CLIENT:
                raise MuxError("server sent stream_open")
            return StreamOpened(stream_id)
        # stream_close
        if self.role == CLIENT and not self.encrypted:
            raise MuxError("server sent stream_close in plaintext mode")
        if self._opener is not None:
            plain = self._opener.open(header, payload)
            if not is_valid_close(plain, stream_id):
                raise MuxError(f"malformed stream_close for stream {stream_id}")
        return StreamClosed(stream_id)

    # -- sending -----------------------------------------------------------

    def encode_open(self, stream_id: int) -> List[bytes]:
        """Return the wire bytes of a ``stream_open`` (client only)."""
        if self.role != CLIENT:
            raise MuxError("only the client opens streams")
        return [encode_header(stream_id, FrameType.OPEN)]

    def encode_data(self, stream_id: int, frame: bytes) -> "List[bytes | bytearray]":
        """Return the wire bytes carrying TB frame ``frame`` on ``stream_id``.

        :raises FrameError: the frame has non-zero padding (encrypted mode);
            no counter value is consumed.
        """
        header = encode_header(stream_id, FrameType.DATA)
        if self._sealer is not None:
            return [self._sealer.seal_buffer(header, frame)]
        return [header, frame]

    def encode_close(self, stream_id: int) -> List[bytes]:
        """Return the wire bytes of a ``stream_close`` for ``stream_id``.

        :raises MuxError: this end may not send ``stream_close`` to this
            peer (see :attr:`can_send_close`).
        """
        if not self.can_send_close:
            raise MuxError("peer does not accept stream_close")
        header = encode_header(stream_id, FrameType.CLOSE)
        if self._sealer is not None:
            return self._sealer.seal(header, build_close_plaintext(stream_id))
        return [header]
