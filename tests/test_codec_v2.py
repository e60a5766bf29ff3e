"""Tests for the version-2 frames of :mod:`tigertunnel.wire.codec`: sealed stream_open, ping, pong."""

from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import StreamData, encode_data, feed, last_ping_value, open_frame, send_counter
from tests.strategies import chunked, make_tb_frame, mux_header, tb_frames
from tigertunnel.crypto.aead import FrameOpener, FrameSealer
from tigertunnel.crypto.kdf import SessionKeys
from tigertunnel.errors import AuthenticationError, MuxError, TunnelError
from tigertunnel.wire.codec import (
    CLIENT,
    SERVER,
    PoolCodec,
    Ping,
    Pong,
    StreamClosed,
    StreamOpened,
)
from tigertunnel.wire.muxframes import (
    CONTROL_TYPES,
    FrameType,
    MuxDecoder,
    build_control_plaintext,
    encode_header,
    parse_control,
)

KEYS = SessionKeys(c2s_key=bytes(range(100, 116)), c2s_nonce=bytes(range(116, 132)),
                   s2c_key=bytes(range(132, 148)), s2c_nonce=bytes(range(148, 164)))


def wire(chunks: Sequence[Union[bytes, bytearray]]) -> bytes:
    """Join the chunks an encode_* method returned."""
    return b"".join(chunks)


def failure_of(f: Callable[..., object], *args: object) -> Optional[type]:
    """Call ``f`` and return the class of the TunnelError it raised, or ``None``.

    The exception is dropped outside any ``except`` block (see test_codec.failure_of).
    """
    try:
        f(*args)
    except TunnelError as e:
        return type(e)
    return None


def v2_pair() -> Tuple[PoolCodec, PoolCodec]:
    """A version-2 client codec and server codec, not yet confirmed."""
    return PoolCodec(CLIENT, KEYS), PoolCodec(SERVER, KEYS, peer_extended=True)


def confirmed_pair() -> Tuple[PoolCodec, PoolCodec]:
    """A version-2 pair after the server's first ping and the client's pong."""
    client, server = v2_pair()
    assert feed(client, wire(server.encode_ping())) == [Ping(0)]
    assert feed(server, wire(client.encode_pong(0))) == [Pong(0)]
    return client, server


def forged(sealer_key: bytes, nonce: bytes, counter: int, frame_type: FrameType,
           stream_id: int, payload: bytes) -> bytes:
    """A frame sealed with the right keys and counter but an arbitrary pseudo header."""
    return wire(FrameSealer(sealer_key, nonce, counter).seal(
        encode_header(stream_id, frame_type), payload))


class NegotiationTests(SynchronousTestCase):
    """Who may send what, before and after the peer proves it speaks version 2."""

    def test_server_pings_first(self) -> None:
        """A server may ping a version-2 client at once; the client may not ping first."""
        client, server = v2_pair()
        self.assertTrue(server.can_ping)
        self.assertFalse(client.can_ping)
        self.assertIs(failure_of(client.encode_ping), MuxError)
        self.assertIs(failure_of(client.encode_pong, 0), MuxError)

    def test_open_unsealed_until_confirmed(self) -> None:
        """Until the server's first version-2 frame the client sends the reference's bare stream_open."""
        client, server = v2_pair()
        self.assertFalse(client.seals_open)
        self.assertEqual(wire(client.encode_open(3)), mux_header(3, 1))
        self.assertEqual(send_counter(client), 0)
        self.assertEqual(feed(server, mux_header(3, 1)), [StreamOpened(3, sealed=False)])

    def test_ping_confirms_server(self) -> None:
        """The server's ping confirms it; the client's stream_open is then sealed and consumes a counter."""
        client, server = confirmed_pair()
        self.assertTrue(client.peer_confirmed and server.peer_confirmed)
        self.assertTrue(client.seals_open)
        before = send_counter(client)
        unit = wire(client.encode_open(9))
        self.assertEqual(len(unit), 12 + 256)
        self.assertEqual(unit[8], FrameType.SEALED_OPEN)
        self.assertEqual(send_counter(client), before + 1)
        self.assertEqual(feed(server, unit), [StreamOpened(9, sealed=True)])

    def test_server_close_does_not_confirm(self) -> None:
        """A server stream_close alone does not make the client seal or ping."""
        client, server = v2_pair()
        self.assertEqual(feed(client, wire(server.encode_close(4))), [StreamClosed(4)])
        self.assertFalse(client.peer_confirmed)
        self.assertEqual(wire(client.encode_open(5)), mux_header(5, 1))

    def test_confirmed_server_refuses_unsealed_open(self) -> None:
        """After the client's pong, an unsealed stream_open (injected by a third party) kills the codec."""
        _, server = confirmed_pair()
        self.assertIs(failure_of(partial(feed, server), mux_header(5, 1)), MuxError)
        self.assertIs(failure_of(partial(feed, server), b""), MuxError)

    def test_unsealed_opens_before_confirmation_then_sealed(self) -> None:
        """Opens sent before the client saw the ping are accepted, sealed ones after its pong."""
        client, server = v2_pair()
        early = wire(client.encode_open(1))
        feed(client, wire(server.encode_ping()))
        late = wire(client.encode_pong(0)) + wire(client.encode_open(2))
        self.assertEqual(feed(server, early + late),
                         [StreamOpened(1), Pong(0), StreamOpened(2, sealed=True)])

    def test_ping_pong_both_ways(self) -> None:
        """Pings carry 0, 1, 2 ... per sender and every pong echoes its ping's value."""
        client, server = confirmed_pair()
        for n in range(3):
            self.assertEqual(feed(server, wire(client.encode_ping())), [Ping(n)])
            self.assertEqual(last_ping_value(client), n)
            self.assertEqual(feed(client, wire(server.encode_pong(n))), [Pong(n)])
        self.assertEqual(feed(client, wire(server.encode_ping())), [Ping(1)])

    def test_pong_value_range(self) -> None:
        """A pong value outside u64 is a programming error."""
        _, server = v2_pair()
        self.assertRaises(ValueError, server.encode_pong, 1 << 64)

    def test_mixed_with_data(self) -> None:
        """Control frames interleave with data frames on shared counters, cut anywhere."""
        client, server = confirmed_pair()
        tb = make_tb_frame(b"body")
        stream = (wire(client.encode_open(1)) + wire(encode_data(client, 1, tb))
                  + wire(client.encode_ping()) + wire(encode_data(client, 1, tb))
                  + wire(client.encode_close(1)))
        events: List[object] = []
        for i in range(0, len(stream), 7):
            events += feed(server, stream[i:i + 7])
        self.assertEqual([type(e) for e in events],
                         [StreamOpened, StreamData, Ping, StreamData, StreamClosed])


class ReferencePeerTests(SynchronousTestCase):
    """A Zig (version-1) peer never sees anything new, and may not send it."""

    def test_server_to_version1_client(self) -> None:
        """A server whose client sent version 1 cannot encode ping, pong or stream_close."""
        server = PoolCodec(SERVER, KEYS, peer_extended=False)
        self.assertFalse(server.can_ping)
        for encode in (server.encode_ping, lambda: server.encode_pong(0),
                       lambda: server.encode_close(1)):
            self.assertIs(failure_of(encode), MuxError)

    def test_version1_client_sending_control_types(self) -> None:
        """From a version-1 client, types 3, 4 and 5 are refused at the type byte."""
        for kind in CONTROL_TYPES:
            server = PoolCodec(SERVER, KEYS, peer_extended=False)
            self.assertIs(failure_of(partial(feed, server), mux_header(0, int(kind))[:9]), MuxError)

    def test_plaintext_has_no_control_frames(self) -> None:
        """In plaintext mode nobody pings and types 3, 4 and 5 are refused."""
        for role in (CLIENT, SERVER):
            codec = PoolCodec(role, None)
            self.assertFalse(codec.can_ping)
            self.assertIs(failure_of(codec.encode_ping), MuxError)
            self.assertIs(failure_of(partial(feed, codec), mux_header(0, 4)), MuxError)

    @given(st.lists(st.tuples(st.sampled_from(["open", "data", "close"]),
                              st.integers(1, 4), tb_frames(max_body=100, cluster=0)),
                    max_size=15),
           st.booleans())
    def test_client_to_unconfirmed_server(self, ops: List[Tuple[str, int, bytes]],
                                          encrypted: bool) -> None:
        """Whatever a client sends a server that never pinged decodes with the reference's types alone."""
        client = PoolCodec(CLIENT, KEYS if encrypted else None)
        out = b""
        for kind, stream, tb in ops:
            out += wire(client.encode_open(stream) if kind == "open" else
                        encode_data(client, stream, tb) if kind == "data" else
                        client.encode_close(stream))
        frames = MuxDecoder(encrypted=encrypted, extended=False).feed(out)
        self.assertEqual(len(frames), len(ops))
        self.assertTrue(all(f.frame_type <= FrameType.CLOSE for f in frames))

    @given(st.lists(tb_frames(max_body=100, cluster=0), max_size=10))
    def test_server_to_version1_client_sends_data_only(self, frames: List[bytes]) -> None:
        """A server talking to a version-1 client only ever emits data frames."""
        server = PoolCodec(SERVER, KEYS, peer_extended=False)
        out = b"".join(wire(encode_data(server, 1, tb)) for tb in frames)
        decoded = MuxDecoder(encrypted=True).feed(out)
        self.assertEqual([f.frame_type for f in decoded], [FrameType.DATA] * len(frames))


class MalformedTests(SynchronousTestCase):
    """Authentic frames whose content is wrong are protocol errors."""

    def test_client_receiving_sealed_open(self) -> None:
        """A sealed stream_open sent to a client is a MuxError."""
        client, _ = v2_pair()
        unit = forged(KEYS.s2c_key, KEYS.s2c_nonce, 0, FrameType.SEALED_OPEN, 1,
                      build_control_plaintext(FrameType.SEALED_OPEN, 1))
        self.assertIs(failure_of(partial(feed, client), unit), MuxError)

    def test_ping_on_a_stream(self) -> None:
        """A ping whose mux header names a stream other than 0 is a MuxError."""
        client, _ = v2_pair()
        unit = forged(KEYS.s2c_key, KEYS.s2c_nonce, 0, FrameType.PING, 3,
                      build_control_plaintext(FrameType.PING, 3))
        self.assertIs(failure_of(partial(feed, client), unit), MuxError)

    def test_sealed_open_with_value(self) -> None:
        """A sealed stream_open whose value field is not zero is a MuxError."""
        _, server = v2_pair()
        unit = forged(KEYS.c2s_key, KEYS.c2s_nonce, 0, FrameType.SEALED_OPEN, 2,
                      build_control_plaintext(FrameType.SEALED_OPEN, 2, 1))
        self.assertIs(failure_of(partial(feed, server), unit), MuxError)

    @given(st.sampled_from(CONTROL_TYPES), st.integers(0, 255),
           st.sampled_from([0, 16, 50, 100, 116, 117, 120, 121, 127, 136, 200, 255]))
    def test_pseudo_header_must_be_exact(self, kind: FrameType, xor: int, offset: int) -> None:
        """parse_control accepts the exact layout only (cluster bytes 80..96 aside)."""
        stream = 0 if kind is not FrameType.SEALED_OPEN else 7
        plain = bytearray(build_control_plaintext(kind, stream, 5))
        plain[offset] ^= xor
        value = parse_control(bytes(plain), kind, stream)
        if xor == 0:
            self.assertEqual(value, 5)
        elif 128 <= offset < 136:
            self.assertEqual(value, 5 ^ (xor << (8 * (offset - 128))))
        else:
            self.assertIsNone(value)

    def test_cluster_bytes_ignored(self) -> None:
        """A receiver's own cluster id in the rebuilt header does not spoil a control frame."""
        client = PoolCodec(CLIENT, KEYS, cluster_id=(1 << 128) - 1)
        server = PoolCodec(SERVER, KEYS, cluster_id=12345, peer_extended=True)
        self.assertEqual(feed(client, wire(server.encode_ping())), [Ping(0)])
        self.assertEqual(feed(server, wire(client.encode_open(1))), [StreamOpened(1, sealed=True)])


@st.composite
def control_units(draw: st.DrawFn) -> Tuple[str, int]:
    """Which control frame to tamper with (direction and kind) and the counter to send it at."""
    return draw(st.sampled_from(["open", "c2s_ping", "c2s_pong", "s2c_ping", "s2c_pong"])), \
        draw(st.integers(0, 5))


class TamperTests(SynchronousTestCase):
    """Flip any byte of a sealed control frame: opening fails and the receive counter stays."""

    @given(control_units(), st.data())
    def test_flip_any_byte(self, which: Tuple[str, int], data: st.DataObject) -> None:
        """Any single flipped byte makes the receiver raise one of our errors, deliver nothing, keep its counter."""
        kind, warmup = which
        client, server = confirmed_pair()
        to_server = kind in ("open", "c2s_ping", "c2s_pong")
        sender, receiver = (client, server) if to_server else (server, client)
        # Move both counters by some data frames first.
        for _ in range(warmup):
            feed(receiver, wire(encode_data(sender, 1, make_tb_frame(b""))))
        unit = wire(sender.encode_open(4) if kind == "open" else
                    sender.encode_ping() if kind.endswith("ping") else
                    sender.encode_pong(77))
        position = data.draw(st.integers(0, len(unit) - 1))
        tampered = bytearray(unit)
        tampered[position] ^= data.draw(st.integers(1, 255))
        counter = receiver.receive_counter
        events: List[object] = []
        error: Optional[type] = None
        try:
            for chunk in data.draw(chunked(bytes(tampered), max_cuts=5)):
                events += feed(receiver, chunk)
        except TunnelError as e:
            error = type(e)
        self.assertIsNotNone(error, f"flip at {position} went unnoticed")
        self.assertEqual(events, [])
        self.assertEqual(receiver.receive_counter, counter)

    @given(st.sampled_from(CONTROL_TYPES), st.integers(0, 267), st.integers(1, 255),
           st.integers(0, (1 << 32) - 1))
    def test_original_still_opens(self, kind: FrameType, position: int, xor: int,
                                  counter: int) -> None:
        """After a tampered copy fails, the same opener opens the genuine frame at the same counter."""
        stream = 0 if kind is not FrameType.SEALED_OPEN else 3
        header = encode_header(stream, kind)
        plain = build_control_plaintext(kind, stream, 9)
        unit = wire(FrameSealer(KEYS.c2s_key, KEYS.c2s_nonce, counter).seal(header, plain))
        tampered = bytearray(unit)
        tampered[position] ^= xor
        opener = FrameOpener(KEYS.c2s_key, KEYS.c2s_nonce, 0, counter)
        self.assertIsNotNone(failure_of(open_frame, opener, bytes(tampered[:12]), bytes(tampered[12:])))
        self.assertEqual(opener.counter, counter)
        self.assertEqual(open_frame(opener, unit[:12], unit[12:]), plain)
        self.assertEqual(opener.counter, counter + 1)

    def test_replayed_ping(self) -> None:
        """A ping sent twice fails the second time (its counter is used up)."""
        client, server = confirmed_pair()
        unit = wire(server.encode_ping())
        self.assertEqual(feed(client, unit), [Ping(1)])
        self.assertIs(failure_of(partial(feed, client), unit), AuthenticationError)
