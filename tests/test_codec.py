"""Tests for :mod:`tigertunnel.wire.codec` (the codec of an established pool connection, PROTOCOL.md 7, 8)."""

import os
import subprocess
import sys
from functools import partial
from typing import Callable, List, Optional, Tuple

import pyaegis
from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import StreamData, encode_data, feed, on_other_implementation
from tests.strategies import chunked, make_tb_frame, mux_header, noisy_mux_streams, tb_frames
from tigertunnel.crypto.aead import FrameSealer
from tigertunnel.crypto.kdf import SessionKeys
from tigertunnel.errors import AuthenticationError, FrameError, MuxError, TunnelError
from tigertunnel.wire.codec import (
    CLIENT,
    SERVER,
    PoolCodec,
    StreamClosed,
    StreamOpened,
)
from tigertunnel.wire.muxframes import FrameType, build_close_plaintext, encode_header

KEYS = SessionKeys(c2s_key=bytes(range(16)), c2s_nonce=bytes(range(16, 32)),
                   s2c_key=bytes(range(32, 48)), s2c_nonce=bytes(range(48, 64)))


def pair(encrypted: bool = True, peer_extended: bool = True, client_cluster: int = 0,
         server_cluster: int = 0) -> Tuple[PoolCodec, PoolCodec]:
    """A client codec and the server codec of the same pool connection."""
    keys = KEYS if encrypted else None
    return (PoolCodec(CLIENT, keys, client_cluster),
            PoolCodec(SERVER, keys, server_cluster, peer_extended=peer_extended))


def received(frame: bytes, cluster: int) -> bytes:
    """What an encrypted receiver delivers for ``frame``: nonce_reserved zeroed, its own cluster."""
    out = bytearray(frame)
    out[64:80] = bytes(16)
    out[80:96] = cluster.to_bytes(16, "little")
    return bytes(out)


def frame(n: int, body: int = 10, cluster: int = 0) -> bytes:
    """A recognisable valid TB frame."""
    fill = bytes((n + i) & 0xFF for i in range(256))
    return make_tb_frame(bytes((n * 3 + i) & 0xFF for i in range(body)), fill, cluster)


def failure_of(f: Callable[..., object], *args: object) -> Optional[type]:
    """Call ``f`` and return the class of the TunnelError it raised, or ``None``.

    The exception is dropped at once, outside any ``except`` block: an
    AuthenticationError kept in a reference cycle (``assertRaises`` keeps it
    in one) can crash CPython's garbage collector, see
    :meth:`GarbageCollectionTests.test_collect_failed_codecs`.
    """
    try:
        f(*args)
    except TunnelError as e:
        return type(e)
    return None


def wire(chunks: List[bytes]) -> bytes:
    """Join the chunks an encode_* method returned."""
    return b"".join(chunks)


class RoleTests(SynchronousTestCase):
    """The two roles and what each may send."""

    def test_bad_role(self) -> None:
        """A role other than client or server is a programming error."""
        self.assertRaises(ValueError, PoolCodec, "peer", None)

    def test_only_client_opens(self) -> None:
        """The server cannot encode stream_open; the client's is the bare 12-byte header."""
        client, server = pair()
        self.assertRaises(MuxError, server.encode_open, 1)
        self.assertEqual(wire(client.encode_open(7)), mux_header(7, 1))

    def test_stream_open_round_trip(self) -> None:
        """A client's stream_open reaches the server as StreamOpened, in both modes."""
        for encrypted in (True, False):
            client, server = pair(encrypted)
            self.assertEqual(feed(server, wire(client.encode_open(5))), [StreamOpened(5)])

    def test_client_receiving_stream_open(self) -> None:
        """A stream_open sent to a client is a protocol violation and kills the codec."""
        for encrypted in (True, False):
            client, _ = pair(encrypted)
            self.assertIs(failure_of(partial(feed, client), mux_header(1, 1)), MuxError)
            self.assertIs(failure_of(partial(feed, client), b""), MuxError)

    def test_can_send_close(self) -> None:
        """A client may always send stream_close; a server only to an encrypted version-2 peer."""
        self.assertTrue(PoolCodec(CLIENT, KEYS).can_send_close)
        self.assertTrue(PoolCodec(CLIENT, None).can_send_close)
        self.assertTrue(PoolCodec(SERVER, KEYS, peer_extended=True).can_send_close)
        self.assertFalse(PoolCodec(SERVER, KEYS, peer_extended=False).can_send_close)
        self.assertFalse(PoolCodec(SERVER, None, peer_extended=True).can_send_close)

    def test_server_close_refused_for_reference_client(self) -> None:
        """encode_close raises MuxError when the peer is a version-1 client or in plaintext mode."""
        _, server = pair(peer_extended=False)
        self.assertRaises(MuxError, server.encode_close, 1)
        _, server = pair(encrypted=False)
        self.assertRaises(MuxError, server.encode_close, 1)

    def test_encrypted_flag(self) -> None:
        """``encrypted`` says whether session keys were given."""
        self.assertTrue(PoolCodec(CLIENT, KEYS).encrypted)
        self.assertFalse(PoolCodec(SERVER, None).encrypted)


class EncryptedTests(SynchronousTestCase):
    """Encrypted mode: c2s and s2c keys, counters, the AD."""

    def test_client_to_server(self) -> None:
        """A data frame from the client arrives with nonce_reserved zeroed and the server's cluster."""
        client, server = pair(server_cluster=77)
        tb = frame(1, 300)
        events = feed(server, wire(encode_data(client, 9, tb)))
        self.assertEqual(events, [StreamData(9, received(tb, 77))])

    def test_server_to_client(self) -> None:
        """A data frame from the server arrives at the client with the client's cluster."""
        client, server = pair(client_cluster=5)
        tb = frame(2, 0, cluster=5)
        self.assertEqual(feed(client, wire(encode_data(server, 3, tb))),
                         [StreamData(3, received(tb, 5))])

    def test_directions_use_their_own_keys(self) -> None:
        """A frame a client sealed cannot be opened by another client (s2c keys differ from c2s)."""
        client, _ = pair()
        other, _ = pair()
        self.assertIs(failure_of(partial(feed, other), wire(encode_data(client, 1, frame(1)))), AuthenticationError)

    def test_wire_counter_matches_frame_count(self) -> None:
        """The n-th sealed unit (data or close, any stream) uses counter n of its direction."""
        client, server = pair()
        c2s = FrameSealer(KEYS.c2s_key, KEYS.c2s_nonce)
        s2c = FrameSealer(KEYS.s2c_key, KEYS.s2c_nonce)
        for n in range(40):
            stream = n % 3 + 1
            tb = frame(n, n * 7)
            self.assertEqual(wire(encode_data(client, stream, tb)),
                             wire(c2s.seal(encode_header(stream, FrameType.DATA), tb)))
            self.assertEqual(wire(encode_data(server, stream, tb)),
                             wire(s2c.seal(encode_header(stream, FrameType.DATA), tb)))
            if n % 5 == 4:
                self.assertEqual(
                    wire(client.encode_close(stream)),
                    wire(c2s.seal(encode_header(stream, FrameType.CLOSE),
                                  build_close_plaintext(stream))))
                self.assertEqual(
                    wire(server.encode_close(stream)),
                    wire(s2c.seal(encode_header(stream, FrameType.CLOSE),
                                  build_close_plaintext(stream))))

    def test_many_frames_both_ways(self) -> None:
        """Five hundred interleaved frames each way, with opens and closes, all decode in order."""
        client, server = pair()
        up: List[object] = []
        down: List[object] = []
        for n in range(500):
            stream = n % 7 + 1
            if n < 7:
                self.assertEqual(feed(server, wire(client.encode_open(stream))),
                                 [StreamOpened(stream)])
            tb = frame(n, n % 50)
            up += feed(server, wire(encode_data(client, stream, tb)))
            down += feed(client, wire(encode_data(server, stream, tb)))
            if n % 97 == 0:
                up += feed(server, wire(client.encode_close(stream)))
                down += feed(client, wire(server.encode_close(stream)))
        expected: List[object] = []
        for n in range(500):
            stream = n % 7 + 1
            expected.append(StreamData(stream, received(frame(n, n % 50), 0)))
            if n % 97 == 0:
                expected.append(StreamClosed(stream))
        self.assertEqual(up, expected)
        self.assertEqual(down, expected)

    def test_server_close_reaches_client(self) -> None:
        """A version-2 client accepts the server's encrypted stream_close (the extension)."""
        client, server = pair()
        self.assertEqual(feed(client, wire(server.encode_close(4))), [StreamClosed(4)])

    def test_close_for_another_stream(self) -> None:
        """An authentic stream_close whose payload names a different stream is a MuxError."""
        client, server = pair()
        forged = FrameSealer(KEYS.s2c_key, KEYS.s2c_nonce).seal(
            encode_header(5, FrameType.CLOSE), build_close_plaintext(6))
        self.assertIs(failure_of(partial(feed, client), wire(forged)), MuxError)
        forged = FrameSealer(KEYS.c2s_key, KEYS.c2s_nonce).seal(
            encode_header(5, FrameType.CLOSE), build_close_plaintext(6))
        self.assertIs(failure_of(partial(feed, server), wire(forged)), MuxError)

    def test_bad_padding_consumes_no_counter(self) -> None:
        """A frame with non-zero padding is refused by encode_data and the next frame still decodes."""
        client, server = pair()
        bad = bytearray(frame(1))
        bad[50] = 1
        self.assertRaises(FrameError, encode_data, client, 1, bytes(bad))
        tb = frame(2)
        self.assertEqual(feed(server, wire(encode_data(client, 1, tb))),
                         [StreamData(1, received(tb, 0))])

    def test_received_bad_padding(self) -> None:
        """An authentic frame whose decrypted padding is not zero raises FrameError and kills the codec."""
        client, server = pair()
        bad = bytearray(frame(1))
        bad[20] = 1
        # The sealer refuses such a frame, so encrypt it following PROTOCOL.md 6.2 by hand
        # (counter 0: the nonce is the base nonce).
        header = encode_header(1, FrameType.DATA)
        p = bytes(bad[0:64] + bad[100:256] + bad[240:256] + bad[256:])
        ciphertext, tag = pyaegis.Aegis128X2(tag_size=16).encrypt_detached(
            KEYS.s2c_key, KEYS.s2c_nonce, p, header)
        self.assertIs(failure_of(partial(feed, client), header + tag + bytes(bad[96:100]) + ciphertext), FrameError)
        self.assertIs(failure_of(partial(feed, client), wire(encode_data(server, 1, frame(2)))), MuxError)


class TamperTests(SynchronousTestCase):
    """Fail closed: a bad frame kills the codec and nothing after it is delivered."""

    def sealed(self) -> Tuple[PoolCodec, bytes, bytes]:
        """A server codec, one sealed client data frame, and the one after it."""
        client, server = pair()
        first = wire(encode_data(client, 3, frame(1, 40)))
        second = wire(encode_data(client, 3, frame(2, 40)))
        return server, first, second

    def assert_dead(self, codec: PoolCodec, good: bytes) -> None:
        """Every later feed raises, even of bytes that would have been valid."""
        self.assertIs(failure_of(partial(feed, codec), good), MuxError)
        self.assertIs(failure_of(partial(feed, codec), b""), MuxError)
        self.assertIs(failure_of(partial(feed, codec), wire(PoolCodec(CLIENT, None).encode_open(1))), MuxError)

    @given(st.data())
    def test_flip_authenticated_byte(self, data: st.DataObject) -> None:
        """Flipping a byte of the stream id, reserved bytes, tag or ciphertext raises AuthenticationError."""
        server, first, second = self.sealed()
        position = data.draw(st.one_of(st.integers(4, 7), st.integers(9, 11),
                                       st.integers(12, 27), st.integers(32, len(first) - 1)))
        flip = data.draw(st.integers(1, 255))
        tampered = bytearray(first)
        tampered[position] ^= flip
        self.assertIs(failure_of(partial(feed, server), bytes(tampered) + second), AuthenticationError)
        self.assert_dead(server, second)

    def test_nothing_after_bad_frame_delivered(self) -> None:
        """Valid frames after a bad one in the same feed are not returned, and the one before is lost too."""
        client, server = pair()
        good = wire(encode_data(client, 1, frame(1)))
        bad = bytearray(wire(encode_data(client, 1, frame(2))))
        bad[-1] ^= 1
        after = wire(encode_data(client, 1, frame(3)))
        self.assertIs(failure_of(partial(feed, server), good + bytes(bad) + after), AuthenticationError)
        self.assert_dead(server, after)

    def test_tampered_server_close(self) -> None:
        """A tampered server stream_close raises AuthenticationError at the client."""
        client, server = pair()
        close = bytearray(wire(server.encode_close(2)))
        close[100] ^= 0x10
        self.assertIs(failure_of(partial(feed, client), bytes(close)), AuthenticationError)
        self.assert_dead(client, wire(encode_data(server, 2, frame(1))))

    def test_replayed_frame(self) -> None:
        """A frame sent twice fails the second time (the counter moved on)."""
        client, server = pair()
        unit = wire(encode_data(client, 1, frame(1)))
        feed(server, unit)
        self.assertIs(failure_of(partial(feed, server), unit), AuthenticationError)

    def test_bad_magic(self) -> None:
        """Bytes that are not a mux header raise MuxError and kill the codec."""
        client, server = pair()
        self.assertIs(failure_of(partial(feed, server), b"ZMUX" + bytes(8)), MuxError)
        self.assert_dead(server, wire(client.encode_open(1)))


class PlaintextTests(SynchronousTestCase):
    """Plaintext mode (no -k): frames pass unchanged, closes have no payload."""

    def test_frames_unchanged(self) -> None:
        """Data frames pass both ways byte for byte, cluster and nonce_reserved included."""
        client, server = pair(encrypted=False, server_cluster=3, client_cluster=4)
        tb = frame(9, 100, cluster=99)
        self.assertEqual(wire(encode_data(client, 2, tb)), mux_header(2, 0) + tb)
        self.assertEqual(feed(server, wire(encode_data(client, 2, tb))), [StreamData(2, tb)])
        self.assertEqual(feed(client, wire(encode_data(server, 2, tb))), [StreamData(2, tb)])

    def test_client_close(self) -> None:
        """A client's plaintext stream_close is the bare header and reaches the server."""
        client, server = pair(encrypted=False)
        self.assertEqual(wire(client.encode_close(8)), mux_header(8, 2))
        self.assertEqual(feed(server, mux_header(8, 2)), [StreamClosed(8)])

    def test_client_receiving_close(self) -> None:
        """A plaintext stream_close sent to a client is a MuxError (servers never send one there)."""
        client, _ = pair(encrypted=False)
        self.assertIs(failure_of(partial(feed, client), mux_header(8, 2)), MuxError)
        self.assertIs(failure_of(partial(feed, client), b""), MuxError)

    def test_padding_not_checked(self) -> None:
        """Plaintext frames are forwarded even with non-zero padding (nothing is encrypted)."""
        client, server = pair(encrypted=False)
        tb = bytearray(frame(1))
        tb[20] = 7
        self.assertEqual(feed(server, wire(encode_data(client, 1, bytes(tb)))),
                         [StreamData(1, bytes(tb))])


Op = Tuple[str, int, bytes]


@st.composite
def client_ops(draw: st.DrawFn) -> List[Op]:
    """A client's sequence of stream_open / data / stream_close operations."""
    ops = draw(st.lists(st.tuples(st.sampled_from(["open", "data", "data", "close"]),
                                  st.integers(1, 5),
                                  tb_frames(max_body=300, cluster=0)),
                        max_size=12))
    return [(kind, stream, tb if kind == "data" else b"") for kind, stream, tb in ops]


def encode_ops(codec: PoolCodec, ops: List[Op]) -> bytes:
    """The wire bytes of ``ops``."""
    out = []
    for kind, stream, tb in ops:
        if kind == "open":
            out += codec.encode_open(stream)
        elif kind == "data":
            out += encode_data(codec, stream, tb)
        else:
            out += codec.encode_close(stream)
    return b"".join(out)


def expected_events(ops: List[Op], encrypted: bool, cluster: int) -> List[object]:
    """The events a receiver must produce for ``ops``."""
    out: List[object] = []
    for kind, stream, tb in ops:
        if kind == "open":
            out.append(StreamOpened(stream))
        elif kind == "data":
            out.append(StreamData(stream, received(tb, cluster) if encrypted else tb))
        else:
            out.append(StreamClosed(stream))
    return out


class ChunkingTests(SynchronousTestCase):
    """Any split of the byte stream gives the same events."""

    @given(st.booleans(), client_ops(), st.data())
    def test_client_to_server(self, encrypted: bool, ops: List[Op], data: st.DataObject) -> None:
        """The server decodes a client's byte stream identically however it is cut."""
        client, server = pair(encrypted, server_cluster=12)
        stream = encode_ops(client, ops)
        events: List[object] = []
        for chunk in data.draw(chunked(stream)):
            events += feed(server, chunk)
        self.assertEqual(events, expected_events(ops, encrypted, 12))

    @given(st.lists(st.tuples(st.booleans(), st.integers(0, 2 ** 32 - 1),
                              tb_frames(max_body=300, cluster=0)), max_size=10),
           st.data())
    def test_server_to_client(self, ops: List[Tuple[bool, int, bytes]],
                              data: st.DataObject) -> None:
        """The client decodes a server's data and close frames identically however they are cut."""
        client, server = pair()
        stream = b"".join(wire(server.encode_close(s) if close else encode_data(server, s, tb))
                          for close, s, tb in ops)
        events: List[object] = []
        for chunk in data.draw(chunked(stream)):
            events += feed(client, chunk)
        self.assertEqual(events, [StreamClosed(s) if close else StreamData(s, received(tb, 0))
                                  for close, s, tb in ops])

    @given(st.booleans(), noisy_mux_streams(encrypted=True), st.data())
    def test_noise_gives_events_or_our_errors(self, encrypted: bool, noise: bytes,
                                              data: st.DataObject) -> None:
        """Arbitrary bytes make the server codec return events or raise one of our errors, nothing else."""
        codec = PoolCodec(SERVER, KEYS if encrypted else None)
        try:
            for chunk in data.draw(chunked(noise)):
                for event in feed(codec, chunk):
                    self.assertIsInstance(event, (StreamOpened, StreamData, StreamClosed))
        except TunnelError:
            self.assertIs(failure_of(partial(feed, codec), b""), MuxError)


GC_SCRIPT = """
import gc
from tigertunnel.crypto.kdf import SessionKeys
from tigertunnel.errors import AuthenticationError
from tigertunnel.wire.codec import CLIENT, SERVER, PoolCodec
from tests.helpers import encode_data, feed
keys = SessionKeys(bytes(16), bytes(16), bytes(16), bytes(16))
unit = encode_data(PoolCodec(CLIENT, keys), 1, bytes(96) + (256).to_bytes(4, "little") + bytes(156))
bad = bytearray(b"".join(unit))
bad[-1] ^= 1
kept = []
for _ in range(100):
    try:
        feed(PoolCodec(SERVER, keys), bytes(bad))
    except AuthenticationError as e:
        cycle = {"error": e}
        cycle["self"] = cycle  # what assertRaises, a Failure or a Deferred would do
gc.collect()
print("collected")
"""


class GarbageCollectionTests(SynchronousTestCase):
    """Errors raised by the codec are ordinary objects the GC can collect."""

    def test_collect_failed_codecs(self) -> None:
        """AuthenticationErrors kept in reference cycles are collected without crashing the interpreter."""
        result = subprocess.run([sys.executable, "-c", GC_SCRIPT], capture_output=True,
                                timeout=120, cwd=os.path.dirname(os.path.dirname(
                                    os.path.abspath(__file__))))
        self.assertEqual((result.returncode, result.stdout.strip()), (0, b"collected"),
                         result.stderr.decode(errors="replace")[-2000:])


# The codec tests above use the sealer and opener selected at import; these
# run them once more on the other implementation.
OtherRoleTests = on_other_implementation(RoleTests)
OtherEncryptedTests = on_other_implementation(EncryptedTests)
OtherTamperTests = on_other_implementation(TamperTests)
OtherChunkingTests = on_other_implementation(ChunkingTests)
