"""The sans-IO codec of one established pool connection (docs/protocol.rst §7).

After the handshake a pool connection carries mux frames: a 12-byte mux
header (magic ``XUMZ``, stream id, frame type) followed by a payload.

* ``stream_open`` (client to server): no payload, not authenticated.
* ``data`` (both ways): one TB frame, AEGIS-128X2 encrypted with the sending
  direction's keys and the next counter; AD = the mux header.
* ``stream_close``: client to server, a 256-byte encrypted pseudo-frame.

Version 2 (docs/protocol.rst §12), only between two of our ends
and only in encrypted mode. A client that sent version byte 2 in its
ClientHello accepts from the server:

* ``stream_close``, sealed like a client's with the s2c keys, meaning "the
  backend of this stream is gone or was refused";
* ``ping`` (type 4) and ``pong`` (type 5): sealed control frames on stream 0
  carrying a u64 value; a ping is answered by a pong echoing its value.

A server that saw version 2 sends a ping right after its ServerHello. That
first authenticated version-2 frame is how the client learns that the server
is one of ours (the Zig server accepts version byte 2 but never sends
anything but data frames): until then the client sends nothing new, after it
(:attr:`~tigertunnel.wire.codec.PoolCodec.peer_confirmed`) it sends ``stream_open`` sealed (type 3,
a control frame naming the stream, one c2s counter value) and pings the
server too. Symmetrically the server counts the client as confirmed at the
client's first authenticated version-2 frame (its pong, a ping or a sealed
``stream_open``) and from then on refuses an unsealed ``stream_open`` as a
protocol error, so a man in the middle cannot inject one. Every sealed frame
consumes one counter value of its direction, like a data frame. A server
never sends any of this to a version-1 (reference) client, and a client
never sends it to a server that has not proven it is one of ours.

In plaintext mode (no ``-k``) payloads are plain TB frames and a
``stream_close`` has no payload; there is no version-2 frame.

:class:`PoolCodec` turns received bytes into data items and
:class:`StreamOpened`, :class:`StreamClosed`, :class:`Ping` and :class:`Pong`
events and encodes outgoing frames; it keeps the two AEAD counters in step
with the wire. Any authentication or framing failure raises and leaves the
codec dead: the caller closes the pool connection and every session on it,
so nothing after a bad frame is ever delivered.

The data path goes around the event objects: :meth:`PoolCodec.receive`
returns the ``(stream_id, frame_type, payload)`` items of a read (data
payloads opened and rebuilt, one call into
:class:`~tigertunnel.wire.datapath.MuxReceiver`), and only the rarer
non-data items go through :meth:`PoolCodec.event`; a session sends through
its own :meth:`PoolCodec.frame_encoder`, which shares this codec's sender.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Union

from tigertunnel.crypto.aead import Opener, Sealer
from tigertunnel.crypto.kdf import SessionKeys
from tigertunnel.errors import MuxError, TunnelError
from tigertunnel.crypto.layout import MAX_U64
from tigertunnel.wire.datapath import Item
from tigertunnel.wire.implementation import ACTIVE, Encoding, Implementation
from tigertunnel.wire.muxframes import (
    FrameType,
    build_close_plaintext,
    build_control_plaintext,
    encode_header,
    is_valid_close,
    parse_control,
)

CLIENT = "client"
SERVER = "server"

#: The stream id of ping and pong frames (they belong to the pool connection).
CONTROL_STREAM_ID = 0
_DATA, _OPEN, _CLOSE = int(FrameType.DATA), int(FrameType.OPEN), int(FrameType.CLOSE)

#: The data-path classes a new codec uses (compiled when available; the
#: tests swap in the other set).
IMPLEMENTATION: Implementation = ACTIVE


@dataclass(frozen=True)
class StreamOpened:
    """The client opened stream ``stream_id`` (seen by the server only).

    :ivar sealed: the stream_open was sealed (version 2) and so is
        authentic; an unsealed one is proven only by the stream's first
        authenticated data frame.
    """

    stream_id: int
    sealed: bool = False


@dataclass(frozen=True)
class StreamClosed:
    """The peer closed stream ``stream_id``."""

    stream_id: int


@dataclass(frozen=True)
class Ping:
    """The peer asks for a :class:`Pong` echoing ``value`` (version 2)."""

    value: int


@dataclass(frozen=True)
class Pong:
    """The peer answered the ping that carried ``value`` (version 2)."""

    value: int


Event = Union[StreamOpened, StreamClosed, Ping, Pong]


class PoolCodec:
    """Encode and decode the mux frames of one pool connection.

    :ivar peer_confirmed: an authenticated version-2 frame has arrived from
        the peer (see the module docstring): a client then seals its
        ``stream_open`` frames and may ping; a server then refuses unsealed
        ``stream_open`` frames.
    """

    def __init__(self, role: str, keys: Optional[SessionKeys],
                 cluster_id: int = 0, peer_extended: bool = True) -> None:
        """
        :param role: ``"client"`` or ``"server"``: which end of the pool
            connection this codec runs on.
        :param keys: the session keys from the handshake, or ``None`` in
            plaintext mode.
        :param cluster_id: the cluster id written into received TB headers
            (encrypted mode only; plaintext frames pass unchanged).
        :param peer_extended: server side: the client announced version 2
            (it accepts server-sent ``stream_close``, ping and pong, and may
            send version-2 frames). Client side: whether this client
            announced version 2 and so accepts version-2 frames (``True``
            unless it sent version 1).
        :raises ValueError: an unknown role.
        """
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be client or server, not {role!r}")
        self.role = role
        self.encrypted = keys is not None
        self.peer_extended = peer_extended
        #: Whether the peer has proven it speaks version 2 (section 12).
        self.peer_confirmed = False
        self._dead = False
        impl = self._impl = IMPLEMENTATION
        self._ping_value = 0
        self._sealer: Optional[Sealer] = None
        self._opener: Optional[Opener] = None
        if keys is not None:
            if role == CLIENT:
                self._sealer = impl.FrameSealer(keys.c2s_key, keys.c2s_nonce)
                self._opener = impl.FrameOpener(keys.s2c_key, keys.s2c_nonce,
                                                cluster_id)
            else:
                self._sealer = impl.FrameSealer(keys.s2c_key, keys.s2c_nonce)
                self._opener = impl.FrameOpener(keys.c2s_key, keys.c2s_nonce,
                                                cluster_id)
        self._receiver = impl.MuxReceiver(self._opener, self.encrypted and peer_extended)

    @property
    def can_send_close(self) -> bool:
        """Whether this end may send ``stream_close`` frames to the peer."""
        if self.role == CLIENT:
            return True
        return self.encrypted and self.peer_extended

    @property
    def can_ping(self) -> bool:
        """Whether this end may send ping and pong frames to the peer.

        A server may ping a version-2 client from the start (its first ping
        is how the client learns it talks to one of ours); a client only
        once the server has confirmed it speaks version 2.
        """
        if not (self.encrypted and self.peer_extended):
            return False
        return self.role == SERVER or self.peer_confirmed

    @property
    def seals_open(self) -> bool:
        """Whether :meth:`encode_open` sends a sealed ``stream_open`` (client)."""
        return self.role == CLIENT and self.can_ping

    @property
    def receive_counter(self) -> int:
        """The counter value the next sealed frame from the peer must use (0 in plaintext mode)."""
        return self._opener.counter if self._opener is not None else 0

    # -- receiving ---------------------------------------------------------

    def receive(self, data: bytes) -> List[Item]:
        """Decode received bytes into ``(stream_id, frame_type, payload)`` items, in wire order.

        A data item's payload is its authenticated TB frame (rebuilt in
        encrypted mode); every other item must be passed, in order, to
        :meth:`event`, which checks what it means. Framing and
        authentication are checked here, for the whole read at once.

        :raises MuxError: malformed framing, or a frame type not accepted
            on this pool connection.
        :raises AuthenticationError: a frame failed to authenticate.
        :raises FrameError: an authenticated frame has non-zero padding.
        """
        if self._dead:
            raise MuxError("pool connection codec already failed")
        try:
            items: List[Item] = self._receiver.feed(data)
        except TunnelError:
            self._dead = True
            raise
        return items

    def event(self, stream_id: int, frame_type: int,
              payload: "bytes | bytearray") -> Event:
        """The event of one non-data item :meth:`receive` returned.

        :raises MuxError: a frame the peer may not send, or a malformed
            stream_close or control frame; the codec is then dead.
        :raises ValueError: a data item (the caller delivers those itself).
        """
        try:
            return self._event(stream_id, frame_type, payload)
        except TunnelError:
            self._dead = True
            raise

    def _event(self, stream_id: int, frame_type: int,
               payload: "bytes | bytearray") -> Event:
        if frame_type == _DATA:
            raise ValueError(f"a data item of stream {stream_id} is not an event")
        if frame_type == _OPEN:
            if self.role == CLIENT:
                raise MuxError("server sent stream_open")
            if self.peer_confirmed:
                raise MuxError(f"unsealed stream_open for stream {stream_id} "
                               f"from a client that seals them")
            return StreamOpened(stream_id)
        if frame_type == _CLOSE:
            if self.role == CLIENT and not self.encrypted:
                raise MuxError("server sent stream_close in plaintext mode")
            if self._opener is not None and not is_valid_close(bytes(payload), stream_id):
                raise MuxError(f"malformed stream_close for stream {stream_id}")
            return StreamClosed(stream_id)
        return self._control(stream_id, FrameType(frame_type), bytes(payload))

    def _control(self, stream_id: int, frame_type: FrameType, plain: bytes) -> Event:
        """Check an opened version-2 control frame (the receiver only passes them when allowed)."""
        if frame_type == FrameType.SEALED_OPEN and self.role == CLIENT:
            raise MuxError("server sent stream_open")
        if (frame_type != FrameType.SEALED_OPEN
                and stream_id != CONTROL_STREAM_ID):
            raise MuxError(f"{frame_type.name.lower()} on stream {stream_id}, "
                           f"not {CONTROL_STREAM_ID}")
        value = parse_control(plain, frame_type, stream_id)
        if value is None or (frame_type == FrameType.SEALED_OPEN and value):
            raise MuxError(f"malformed {frame_type.name.lower()} frame "
                           f"for stream {stream_id}")
        self.peer_confirmed = True
        if frame_type == FrameType.SEALED_OPEN:
            return StreamOpened(stream_id, sealed=True)
        if frame_type == FrameType.PING:
            return Ping(value)
        return Pong(value)

    # -- sending -----------------------------------------------------------

    def encode_open(self, stream_id: int) -> List[bytes]:
        """Return the wire bytes of a ``stream_open`` (client only).

        Sealed (type 3, one c2s counter value) once the server is confirmed
        to speak version 2 (:attr:`seals_open`), else the bare 12-byte
        header of the reference.

        :raises MuxError: called on the server.
        """
        if self.role != CLIENT:
            raise MuxError("only the client opens streams")
        if self.seals_open:
            return self._seal_control(FrameType.SEALED_OPEN, stream_id, 0)
        return [encode_header(stream_id, FrameType.OPEN)]

    def frame_encoder(self, stream_id: int, check: bool, cluster_id: Optional[int] = None,
                      watch: "Optional[Callable[[bytes], object]]" = None) -> Encoding:
        """A :class:`~tigertunnel.wire.datapath.FrameEncoder` for the session on ``stream_id``.

        It seals with this codec's sender, so its frames take their counter
        values in the order they are encoded, among this codec's own
        frames: write each encoder's output as soon as it is returned.
        """
        return self._impl.FrameEncoder(stream_id, self._sealer, check, cluster_id, watch)

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

    def encode_ping(self) -> List[bytes]:
        """Return the wire bytes of a ping carrying the next sequence number.

        The sequence numbers of a pool connection's pings run 0, 1, 2 ...

        :raises MuxError: the peer does not take pings (:attr:`can_ping`).
        """
        if not self.can_ping:
            raise MuxError("peer does not accept ping")
        value = self._ping_value
        out = self._seal_control(FrameType.PING, CONTROL_STREAM_ID, value)
        self._ping_value = value + 1
        return out

    def encode_pong(self, value: int) -> List[bytes]:
        """Return the wire bytes of a pong answering the ping that carried ``value``.

        :raises MuxError: the peer does not take pongs (:attr:`can_ping`).
        :raises ValueError: ``value`` is not a u64.
        """
        if not self.can_ping:
            raise MuxError("peer does not accept pong")
        if not 0 <= value <= MAX_U64:
            raise ValueError(f"pong value {value} is not a u64")
        return self._seal_control(FrameType.PONG, CONTROL_STREAM_ID, value)

    def _seal_control(self, frame_type: FrameType, stream_id: int,
                      value: int) -> List[bytes]:
        assert self._sealer is not None  # callers checked can_ping
        return self._sealer.seal(encode_header(stream_id, frame_type),
                                 build_control_plaintext(frame_type, stream_id,
                                                         value))
