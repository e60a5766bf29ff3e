"""Tests for :mod:`tigertunnel.wire.datapath` and its compiled twin (PROTOCOL.md 6, 7.1, 7.2).

The behaviour tests run on both implementations (``on_both``); the
cross-implementation tests feed the same arbitrary input to both and require
the same bytes, the same errors and the same counters.
"""

import struct
import tracemalloc
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import (
    COMPILED_SKIP,
    Implementation,
    ImplementationMixin,
    load_trace,
    load_vectors,
    on_both,
    open_frame,
    unhex,
)
from tests.strategies import chunked, make_tb_frame, mux_header, noisy_tb_streams, tb_frames
from tests.test_aead import receiver_view, seal_by_spec
from tigertunnel.crypto.aead import frame_nonce
from tigertunnel.errors import (
    AuthenticationError,
    ClusterMismatchError,
    FrameError,
    MuxError,
    TunnelError,
)
from tigertunnel.wire.implementation import COMPILED, PURE
from tigertunnel.wire.muxframes import (
    FrameType,
    build_close_plaintext,
    build_control_plaintext,
    encode_header,
)

FRAMES = load_vectors("frames")
SESSIONS = [load_vectors("session_psk"), load_vectors("session_kem")]
KEY = bytes(range(16))
NONCE = bytes(range(100, 116))
MIB = 1 << 20
U64 = 1 << 64


def frame(n: int, body: int = 10, cluster: int = 0) -> bytes:
    """A recognisable valid TB frame that passes the tunnel's checks (zero nonce_reserved)."""
    fill = bytearray((n + i) & 0xFF for i in range(256))
    fill[64:80] = bytes(16)
    return make_tb_frame(bytes((n * 3 + i) & 0xFF for i in range(body)), bytes(fill), cluster)


def with_bytes(tb: bytes, offset: int, value: bytes) -> bytes:
    """``tb`` with ``value`` written at ``offset``."""
    out = bytearray(tb)
    out[offset:offset + len(value)] = value
    return bytes(out)


def spec_wire(stream_id: int, frames: List[bytes], start: int) -> bytes:
    """The wire bytes of ``frames`` on ``stream_id``, sealed from counter ``start`` per the spec."""
    header = encode_header(stream_id, FrameType.DATA)
    return b"".join(seal_by_spec(KEY, frame_nonce(NONCE, start + i), header, f)
                    for i, f in enumerate(frames))


def session_keys(session: Any) -> Tuple[bytes, bytes, bytes, bytes]:
    """c2s key and nonce, s2c key and nonce of a session vector."""
    k = session["derived_keys_client_side"]
    return (unhex(k["c2s_key"]), unhex(k["c2s_nonce"]), unhex(k["s2c_key"]),
            unhex(k["s2c_nonce"]))


def as_bytes(items: List[Tuple[int, int, Any]]) -> List[Tuple[int, int, bytes]]:
    """Receiver items with their payloads as bytes."""
    return [(s, t, bytes(p)) for s, t, p in items]


class EncoderVectorTests(ImplementationMixin):
    """FrameEncoder reproduces the reference's wire bytes."""

    impl: Implementation

    def test_frames_json(self) -> None:
        """Each frame of frames.json, one read each or all in one read, encodes to the reference wire bytes."""
        for seq in FRAMES["sequences"]:
            key, base = unhex(seq["key"]), unhex(seq["base_nonce"])
            start = int(seq["start_counter"])
            plain = [unhex(f["plaintext_frame"]) for f in seq["frames"]]
            wires = [unhex(f["wire"]) for f in seq["frames"]]
            sealer = self.impl.FrameSealer(key, base, start)
            encoder = self.impl.FrameEncoder(seq["stream_id"], sealer, False)
            self.assertEqual([encoder.encode(p) for p in plain], wires)
            self.assertEqual(sealer.counter, int(seq["counter_after"]))
            sealer = self.impl.FrameSealer(key, base, start)
            encoder = self.impl.FrameEncoder(seq["stream_id"], sealer, False)
            self.assertEqual(encoder.encode(b"".join(plain)), b"".join(wires))

    def test_sessions(self) -> None:
        """The TB frames of both session vectors encode to their data segments, both ways."""
        for session in SESSIONS:
            c2s_key, c2s_nonce, s2c_key, s2c_nonce = session_keys(session)
            cluster = int(session["cluster_id"])
            c2s = [unhex(s["bytes"]) for s in session["client_to_server_segments"]
                   if s["kind"] == "data"]
            s2c = [unhex(s["bytes"]) for s in session["server_to_client_segments"]
                   if s["kind"] == "data"]
            client = self.impl.FrameEncoder(1, self.impl.FrameSealer(c2s_key, c2s_nonce),
                                            True, cluster)
            server = self.impl.FrameEncoder(1, self.impl.FrameSealer(s2c_key, s2c_nonce),
                                            True, cluster)
            for tb, sent in zip(session["tb_frames"], c2s):
                self.assertEqual(client.encode(unhex(tb["sent_by_tb_client"])), sent)
            for tb, sent in zip(session["tb_frames"], s2c):
                self.assertEqual(server.encode(unhex(tb["received_by_tb_client"])), sent)


class ReceiverVectorTests(ImplementationMixin):
    """MuxReceiver opens the reference's wire bytes."""

    impl: Implementation

    def test_sessions(self) -> None:
        """Both directions of both session vectors give the TB frames, the stream_open and the stream_close."""
        for session in SESSIONS:
            c2s_key, c2s_nonce, s2c_key, s2c_nonce = session_keys(session)
            cluster = int(session["cluster_id"])
            hello = len(unhex(session["client_to_server_segments"][0]["bytes"]))
            opener = self.impl.FrameOpener(c2s_key, c2s_nonce, cluster)
            items = self.impl.MuxReceiver(opener).feed(unhex(session["client_to_server"])[hello:])
            self.assertEqual(as_bytes(items), [(1, 1, b"")] + [
                (1, 0, receiver_view(unhex(t["sent_by_tb_client"]), cluster))
                for t in session["tb_frames"]] + [
                (1, 2, receiver_view(build_close_plaintext(1), cluster))])
            self.assertEqual(opener.counter, int(session["client_c2s_counter_after"]))
            opener = self.impl.FrameOpener(s2c_key, s2c_nonce, cluster)
            receiver = self.impl.MuxReceiver(opener)
            items = []
            for byte in unhex(session["server_to_client"])[49:]:
                items += receiver.feed(bytes([byte]))
            self.assertEqual(as_bytes(items), [(1, 0, unhex(t["received_by_tb_client"]))
                                               for t in session["tb_frames"]])
            self.assertEqual(opener.counter, int(session["client_s2c_counter_after"]))

    def test_frames_json(self) -> None:
        """The wire bytes of frames.json open into its decrypted frames."""
        for seq in FRAMES["sequences"]:
            opener = self.impl.FrameOpener(unhex(seq["key"]), unhex(seq["base_nonce"]),
                                           int(seq["receiver_cluster_id"]),
                                           int(seq["start_counter"]))
            items = self.impl.MuxReceiver(opener).feed(
                b"".join(unhex(f["wire"]) for f in seq["frames"]))
            self.assertEqual(as_bytes(items), [(seq["stream_id"], 0,
                                                unhex(f["decrypted_frame"]))
                                               for f in seq["frames"]])
            self.assertEqual(opener.counter, int(seq["counter_after"]))


class RoundTripTests(ImplementationMixin):
    """Encoder and receiver together carry TB frames exactly, however the bytes are cut."""

    impl: Implementation

    def test_traces(self) -> None:
        """Every traced TB stream (frames up to 1 MiB) crosses in 64 KiB reads each way."""
        streams: Dict[Tuple[str, str, int, str], List[bytes]] = {}
        for name in ("tb-0.17.8-single", "tb-0.17.8-cluster3"):
            for f in load_trace(name):
                streams.setdefault((name, f.link, f.conn, f.dir), []).append(f.data)
        sealer = self.impl.FrameSealer(KEY, NONCE)
        opener = self.impl.FrameOpener(KEY, NONCE, 0)
        for n, frames in enumerate(streams.values()):
            cluster = int.from_bytes(frames[0][80:96], "little")
            encoder = self.impl.FrameEncoder(n, sealer, True, cluster)
            receiver = self.impl.MuxReceiver(opener)
            data = b"".join(frames)
            wire = b"".join(encoder.encode(data[i:i + 65536])
                            for i in range(0, len(data), 65536))
            self.assertEqual(encoder.buffered(), 0)
            items = []
            for i in range(0, len(wire), 65536):
                items += receiver.feed(wire[i:i + 65536])
            self.assertEqual(as_bytes(items), [(n, 0, receiver_view(f, 0)) for f in frames])
            self.assertEqual(receiver.buffered(), 0)
        self.assertEqual(sealer.counter, opener.counter)

    @given(st.lists(tb_frames(max_body=700), min_size=1, max_size=8), st.data())
    def test_any_chunking(self, frames: List[bytes], data: st.DataObject) -> None:
        """Any cut of the TB bytes gives the spec's wire bytes; any cut of those gives the frames back."""
        stream_id = data.draw(st.integers(0, (1 << 32) - 1))
        start = data.draw(st.integers(0, U64 - len(frames)))
        sealer = self.impl.FrameSealer(KEY, NONCE, start)
        encoder = self.impl.FrameEncoder(stream_id, sealer, False)
        wire = b"".join(encoder.encode(c) for c in data.draw(chunked(b"".join(frames))))
        self.assertEqual(wire, spec_wire(stream_id, frames, start))
        self.assertEqual(sealer.counter, start + len(frames))
        opener = self.impl.FrameOpener(KEY, NONCE, 5, start)
        receiver = self.impl.MuxReceiver(opener)
        items = []
        for c in data.draw(chunked(wire)):
            items += receiver.feed(c)
        self.assertEqual(as_bytes(items), [(stream_id, 0, receiver_view(f, 5)) for f in frames])
        self.assertEqual(opener.counter, start + len(frames))

    @given(st.lists(st.tuples(st.integers(0, 9), tb_frames(max_body=300)), max_size=8),
           st.data())
    def test_plaintext(self, sent: List[Tuple[int, bytes]], data: st.DataObject) -> None:
        """Without keys frames travel unchanged after their mux header, padding and all."""
        wire = b""
        for stream_id, tb in sent:
            tb = with_bytes(tb, 20, b"\x01")  # non-zero padding: nothing checks it here
            encoder = self.impl.FrameEncoder(stream_id, None, False)
            wire += encoder.encode(tb)
            self.assertEqual(wire[-len(tb) - 12:], mux_header(stream_id, 0) + tb)
        receiver = self.impl.MuxReceiver(None)
        items = []
        for c in data.draw(chunked(wire)):
            items += receiver.feed(c)
        self.assertEqual(as_bytes(items), [(s, 0, with_bytes(tb, 20, b"\x01"))
                                           for s, tb in sent])

    def test_control_frames(self) -> None:
        """A stream_open comes out with an empty payload, an encrypted stream_close opened, a plain one empty."""
        sealer = self.impl.FrameSealer(KEY, NONCE)
        close = sealer.seal_buffer(encode_header(4, FrameType.CLOSE), build_close_plaintext(4))
        data = encode_header(4, FrameType.OPEN) + bytes(close)
        items = self.impl.MuxReceiver(self.impl.FrameOpener(KEY, NONCE, 9)).feed(data)
        self.assertEqual(as_bytes(items), [(4, 1, b""),
                                           (4, 2, receiver_view(build_close_plaintext(4), 9))])
        plain = encode_header(4, FrameType.OPEN) + encode_header(4, FrameType.CLOSE)
        self.assertEqual(as_bytes(self.impl.MuxReceiver(None).feed(plain)),
                         [(4, 1, b""), (4, 2, b"")])

    def test_extended_control_frames(self) -> None:
        """With the extension, sealed stream_open, ping and pong come out opened, in counter order with data."""
        sealer = self.impl.FrameSealer(KEY, NONCE)
        kinds = [(FrameType.SEALED_OPEN, 4, 0), (FrameType.PING, 0, 7), (FrameType.PONG, 0, 9)]
        wire = b"".join(bytes(sealer.seal_buffer(encode_header(sid, kind),
                                                 build_control_plaintext(kind, sid, value)))
                        for kind, sid, value in kinds)
        wire += bytes(sealer.seal_buffer(encode_header(4, FrameType.DATA), frame(2)))
        receiver = self.impl.MuxReceiver(self.impl.FrameOpener(KEY, NONCE, 9), True)
        items = as_bytes(receiver.feed(wire))
        self.assertEqual(items, [(sid, int(kind), receiver_view(build_control_plaintext(
            kind, sid, value), 9)) for kind, sid, value in kinds] + [(4, 0, receiver_view(frame(2), 9))])
        for extended, opener in ((False, self.impl.FrameOpener(KEY, NONCE)), (True, None)):
            refused = self.impl.MuxReceiver(opener, extended)
            self.assertRaises(MuxError, refused.feed, wire)

    def test_watch_and_last_frames(self) -> None:
        """The watch sees each checked frame's header in order; last_frames counts the frames of the last read."""
        for sealed in (True, False):
            seen: List[bytes] = []
            encoder = self.impl.FrameEncoder(
                2, self.impl.FrameSealer(KEY, NONCE) if sealed else None, True, None, seen.append)
            tbs = [frame(1, 30), frame(2, 3000), frame(3, 0)]
            stream = b"".join(tbs)
            self.assertEqual(encoder.last_frames, 0)
            encoder.encode(stream[:100])
            self.assertEqual((encoder.last_frames, seen), (0, []))
            out = encoder.encode(stream[100:])
            self.assertEqual(encoder.last_frames, 3)
            self.assertEqual(seen, [tb[:256] for tb in tbs])
            self.assertEqual(len(out) - 12 * encoder.last_frames, len(stream))
            bad = with_bytes(frame(4), 64, b"\x01")
            self.assertRaises(FrameError, encoder.encode, frame(5) + bad)
            self.assertEqual((encoder.last_frames, len(seen)), (0, 3))

    def test_failing_watch_fails_the_encoder(self) -> None:
        """An exception from the watch fails the read and the encoder; no counter value is used."""
        def broken(header: bytes) -> None:
            raise FrameError("watch refused")
        sealer = self.impl.FrameSealer(KEY, NONCE)
        encoder = self.impl.FrameEncoder(2, sealer, True, None, broken)
        self.assertRaises(FrameError, encoder.encode, frame(1))
        self.assertEqual(sealer.counter, 0)
        self.assertRaises(FrameError, encoder.encode, frame(2))
        self.assertRaises(TypeError, self.impl.FrameEncoder, 2, None, True, None, 5)

    def test_input_types(self) -> None:
        """bytes, bytearray and memoryview reads give the same results."""
        tb = frame(1, 50)
        for wrap in (bytes, bytearray, memoryview):
            sealer = self.impl.FrameSealer(KEY, NONCE)
            wire = self.impl.FrameEncoder(2, sealer, True).encode(wrap(tb))
            self.assertEqual(wire, spec_wire(2, [tb], 0))
            items = self.impl.MuxReceiver(self.impl.FrameOpener(KEY, NONCE)).feed(wrap(wire))
            self.assertEqual(as_bytes(items), [(2, 0, tb)])


class EncoderErrorTests(ImplementationMixin):
    """A bad TB frame fails the read that completes it: nothing of it is sent, no counter is used."""

    impl: Implementation

    def encoder(self, check: bool = True, cluster: Optional[int] = None,
                counter: int = 3) -> Tuple[Any, Any]:
        """An encoder on stream 1 and its sealer."""
        sealer = self.impl.FrameSealer(KEY, NONCE, counter)
        return self.impl.FrameEncoder(1, sealer, check, cluster), sealer

    def assert_dead(self, encoder: Any) -> None:
        """Every later read raises FrameError, even a valid one."""
        self.assertRaises(FrameError, encoder.encode, frame(9))
        self.assertRaises(FrameError, encoder.encode, b"")

    @given(st.one_of(st.integers(0, 255), st.integers(MIB + 1, (1 << 32) - 1)))
    def test_bad_size_before_body(self, size: int) -> None:
        """A size outside 256..1 MiB raises when its last byte arrives."""
        encoder, sealer = self.encoder()
        head = frame(1)[:96] + struct.pack("<I", size)
        self.assertEqual(encoder.encode(head[:99]), b"")
        self.assertRaises(FrameError, encoder.encode, head[99:])
        self.assertEqual(sealer.counter, 3)
        self.assert_dead(encoder)

    def test_checks(self) -> None:
        """Padding, nonce_reserved and cluster are checked; a bad frame sends nothing of its read."""
        good = frame(1)
        for offset, value, error in ((16, b"\x01", FrameError), (63, b"\x80", FrameError),
                                     (64, b"\x01", FrameError),
                                     (80, b"\x07", ClusterMismatchError)):
            encoder, sealer = self.encoder()
            bad = with_bytes(frame(2), offset, value)
            self.assertRaises(error, encoder.encode, good + bad + good)
            self.assertEqual(sealer.counter, 3)
            self.assert_dead(encoder)

    def test_cluster(self) -> None:
        """With a cluster id, frames of that cluster pass and others raise ClusterMismatchError naming both."""
        encoder, sealer = self.encoder(cluster=12345)
        ok = frame(1, cluster=12345)
        self.assertEqual(encoder.encode(ok), spec_wire(1, [ok], 3))
        try:
            encoder.encode(frame(2, cluster=7))
        except ClusterMismatchError as e:
            seen = (e.expected, e.got, str(e))
        self.assertEqual(seen, (12345, 7, "frame cluster 7 != configured cluster 12345"))
        self.assertEqual(sealer.counter, 4)

    def test_unchecked(self) -> None:
        """Unchecked, a sealing encoder still refuses padding; nonce_reserved and cluster pass."""
        encoder, sealer = self.encoder(check=False)
        odd = with_bytes(with_bytes(frame(1), 64, b"\x05"), 80, b"\x09")
        self.assertEqual(encoder.encode(odd), spec_wire(1, [odd], 3))
        self.assertRaises(FrameError, encoder.encode, with_bytes(frame(2), 50, b"\x01"))
        self.assertEqual(sealer.counter, 4)

    def test_counter_exhausted(self) -> None:
        """A read whose frames would run the u64 counter past its end raises TunnelError and uses none."""
        encoder, sealer = self.encoder(counter=U64 - 2)
        self.assertRaises(TunnelError, encoder.encode, frame(1) * 3)
        self.assertEqual(sealer.counter, U64 - 2)
        encoder, sealer = self.encoder(counter=U64 - 2)
        self.assertEqual(encoder.encode(frame(1) * 2), spec_wire(1, [frame(1)] * 2, U64 - 2))
        self.assertEqual(sealer.counter, U64)
        self.assertRaises(TunnelError, encoder.encode, frame(1))

    def test_bad_arguments(self) -> None:
        """Stream ids must be u32 and cluster ids u128."""
        sealer = self.impl.FrameSealer(KEY, NONCE)
        self.assertRaises(ValueError, self.impl.FrameEncoder, 1 << 32, sealer, True)
        self.assertRaises(ValueError, self.impl.FrameEncoder, -1, sealer, True)
        self.assertRaises(ValueError, self.impl.FrameEncoder, 1, sealer, True, 1 << 128)

    def test_one_byte_reads_bounded_memory(self) -> None:
        """A 256 KiB frame read one byte at a time peaks below four times its size."""
        tb = make_tb_frame(bytes(256 * 1024 - 256))
        encoder, _ = self.encoder()
        tracemalloc.start()
        try:
            out = []
            for i in range(len(tb)):
                wire = encoder.encode(tb[i:i + 1])
                if wire:
                    out.append(wire)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(b"".join(out), spec_wire(1, [tb], 3))
        self.assertLess(peak, 4 * len(tb))


class ReceiverErrorTests(ImplementationMixin):
    """The receiver fails closed: a bad frame kills it and nothing of the read is delivered."""

    impl: Implementation

    def receiver(self, counter: int = 0) -> Tuple[Any, Any]:
        """A receiver and its opener."""
        opener = self.impl.FrameOpener(KEY, NONCE, 0, counter)
        return self.impl.MuxReceiver(opener), opener

    def assert_dead(self, receiver: Any) -> None:
        """Every later read raises MuxError, even a valid one."""
        self.assertRaises(MuxError, receiver.feed, spec_wire(1, [frame(1)], 0))
        self.assertRaises(MuxError, receiver.feed, b"")

    @given(st.data())
    def test_flip_authenticated_byte(self, data: st.DataObject) -> None:
        """Flipping a byte of stream id, reserved bytes, tag or ciphertext raises AuthenticationError; the counter stays."""
        wire = bytearray(spec_wire(3, [frame(1, 40), frame(2, 40)], 0))
        position = data.draw(st.one_of(st.integers(4, 7), st.integers(9, 11),
                                       st.integers(12, 27), st.integers(32, 12 + 296 - 1)))
        wire[position] ^= data.draw(st.integers(1, 255))
        receiver, opener = self.receiver()
        self.assertRaises(AuthenticationError, receiver.feed, bytes(wire))
        self.assertEqual(opener.counter, 0)
        self.assert_dead(receiver)

    def test_counter_moves_only_on_success(self) -> None:
        """A replayed frame fails and leaves the counter after the frames that opened."""
        receiver, opener = self.receiver()
        unit = spec_wire(1, [frame(1)], 0)
        self.assertEqual(len(receiver.feed(unit)), 1)
        self.assertRaises(AuthenticationError, receiver.feed, unit)
        self.assertEqual(opener.counter, 1)

    def test_bad_header_opens_nothing(self) -> None:
        """A bad mux header anywhere in a read raises MuxError before anything of it is opened."""
        good = spec_wire(1, [frame(1)], 0)
        for bad in (b"ZMUX" + bytes(8), mux_header(1, 3), mux_header(1, 0) + bytes(16)
                    + struct.pack("<I", 255)):
            receiver, opener = self.receiver()
            self.assertRaises(MuxError, receiver.feed, good + bad)
            self.assertEqual(opener.counter, 0)
            self.assert_dead(receiver)

    def test_errors_on_the_offending_byte(self) -> None:
        """A bad magic, type or size raises as soon as its byte arrives, one byte at a time."""
        for bad, at in ((b"XUMQ", 3), (mux_header(1, 9), 8),
                        (mux_header(1, 0) + bytes(16) + struct.pack("<I", MIB + 1), 31)):
            receiver, _ = self.receiver()
            for i in range(at):
                self.assertEqual(receiver.feed(bad[i:i + 1]), [])
            self.assertRaises(MuxError, receiver.feed, bad[at:at + 1])

    def test_close_size_field(self) -> None:
        """An encrypted stream_close whose clear size is not 256 raises FrameError; the counter stays."""
        sealer = self.impl.FrameSealer(KEY, NONCE)
        header = encode_header(2, FrameType.CLOSE)
        close = bytearray(sealer.seal_buffer(header, build_close_plaintext(2)))
        close[28:32] = struct.pack("<I", 257)
        receiver, opener = self.receiver()
        self.assertRaises(FrameError, receiver.feed, bytes(close))
        self.assertEqual(opener.counter, 0)

    def test_padding_after_tag(self) -> None:
        """An authentic frame with non-zero padding raises FrameError after the counter moved."""
        tb = with_bytes(frame(1), 16, b"\x01")
        p = tb[0:64] + tb[100:256] + tb[240:256] + tb[256:]
        ct, tag = __import__("pyaegis").Aegis128X2(tag_size=16).encrypt_detached(
            KEY, NONCE, p, mux_header(1, 0))
        receiver, opener = self.receiver()
        self.assertRaises(FrameError, receiver.feed, mux_header(1, 0) + tag + tb[96:100] + ct)
        self.assertEqual(opener.counter, 1)

    def test_one_byte_reads_bounded_memory(self) -> None:
        """A 256 KiB encrypted frame read one byte at a time peaks below four times its size."""
        tb = make_tb_frame(bytes(256 * 1024 - 256))
        wire = spec_wire(1, [tb], 0)
        receiver, _ = self.receiver()
        tracemalloc.start()
        try:
            items = []
            for i in range(len(wire)):
                items += receiver.feed(wire[i:i + 1])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(as_bytes(items), [(1, 0, tb)])
        self.assertLess(peak, 4 * len(tb))


PureEncoderVectorTests, CompiledEncoderVectorTests = on_both(EncoderVectorTests)
PureReceiverVectorTests, CompiledReceiverVectorTests = on_both(ReceiverVectorTests)
PureRoundTripTests, CompiledRoundTripTests = on_both(RoundTripTests)
PureEncoderErrorTests, CompiledEncoderErrorTests = on_both(EncoderErrorTests)
PureReceiverErrorTests, CompiledReceiverErrorTests = on_both(ReceiverErrorTests)


# -- the two implementations side by side ------------------------------------

Outcome = Tuple[Any, ...]


def normal(value: Any) -> Any:
    """``value`` with every bytes-like turned into bytes and tuples into lists."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return [normal(v) for v in value]
    return value


def outcome(f: Callable[..., Any], *args: Any) -> Outcome:
    """What calling ``f`` gave: ``("ok", result)`` or ``("error", class, message)``.

    Only the class and message of an error are kept; the exception itself
    is dropped outside the ``except`` block.
    """
    try:
        result = f(*args)
    except (TunnelError, ValueError) as e:
        error = (type(e), str(e))
    else:
        return ("ok", normal(result))
    return ("error",) + error


@st.composite
def tb_material(draw: st.DrawFn) -> bytes:
    """TB frames, some with a bad padding, nonce_reserved, cluster or size, and garbage."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["ok", "ok", "ok", "field", "noise"]))
        if kind == "noise":
            parts.append(draw(noisy_tb_streams()))
            continue
        tb = draw(tb_frames(max_body=300, cluster=draw(st.sampled_from([0, 0, 7]))))
        if kind == "field":
            tb = with_bytes(tb, draw(st.sampled_from([16, 31, 48, 63, 64, 79])), b"\x01")
        else:
            tb = with_bytes(tb, 64, bytes(16))
        parts.append(tb)
    return b"".join(parts)


@st.composite
def mux_material(draw: st.DrawFn) -> Tuple[bytes, int]:
    """Wire bytes sealed from KEY/NONCE (opens, data, closes), maybe tampered, maybe with noise; and the first counter."""
    start = draw(st.sampled_from([0, 5, U64 - 3]))
    sealer = PURE.FrameSealer(KEY, NONCE, start)
    wire = bytearray()
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["open", "data", "data", "close", "control"]))
        stream_id = draw(st.integers(0, 5))
        if kind == "open":
            wire += encode_header(stream_id, FrameType.OPEN)
        elif sealer.counter < U64:
            if kind == "data":
                wire += sealer.seal_buffer(encode_header(stream_id, FrameType.DATA),
                                           draw(tb_frames(max_body=200)))
            elif kind == "control":
                control = draw(st.sampled_from([FrameType.SEALED_OPEN, FrameType.PING,
                                                FrameType.PONG]))
                wire += sealer.seal_buffer(encode_header(stream_id, control),
                                           build_control_plaintext(control, stream_id, 0))
            else:
                wire += sealer.seal_buffer(encode_header(stream_id, FrameType.CLOSE),
                                           build_close_plaintext(stream_id))
    if wire and draw(st.booleans()):
        wire[draw(st.integers(0, len(wire) - 1))] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        wire += draw(st.binary(max_size=300))
    return bytes(wire), start


class CrossImplementationTests(SynchronousTestCase):
    """The compiled data path gives the pure one's bytes, errors and counters for any input."""

    skip = COMPILED_SKIP

    def setUp(self) -> None:
        assert COMPILED is not None
        self.c = COMPILED

    @given(noisy_tb_streams(), st.integers(256, MIB), st.data())
    def test_parser(self, stream: bytes, max_size: int, data: st.DataObject) -> None:
        """FrameParser: same frames, errors and buffered count for every read of any stream."""
        parsers = [PURE.FrameParser(max_size), self.c.FrameParser(max_size)]
        for chunk in data.draw(chunked(stream)) + [b"", stream[:150]]:
            got = [(outcome(p.feed, chunk), p.buffered()) for p in parsers]
            self.assertEqual(got[0], got[1])

    @given(st.binary(min_size=0, max_size=700), st.binary(min_size=10, max_size=14),
           st.sampled_from([0, 1, 2 ** 32, U64 - 1]), st.data())
    def test_seal_open(self, body: bytes, header: bytes, counter: int,
                       data: st.DataObject) -> None:
        """FrameSealer and FrameOpener: same wire bytes, errors and counters, tampered or not."""
        edited = bytearray(make_tb_frame(body))
        if data.draw(st.booleans()):
            edited[data.draw(st.integers(0, len(edited) - 1))] ^= data.draw(st.integers(1, 255))
        if data.draw(st.booleans()):
            del edited[data.draw(st.integers(0, len(edited))):]
        tb = bytes(edited)
        cluster = data.draw(st.integers(0, (1 << 128) - 1))
        sealers = [PURE.FrameSealer(KEY, NONCE, counter), self.c.FrameSealer(KEY, NONCE, counter)]
        sealed = [outcome(s.seal_buffer, header, tb) for s in sealers]
        self.assertEqual(sealed[0], sealed[1])
        self.assertEqual(sealers[0].counter, sealers[1].counter)
        wire = sealed[0][1] if sealed[0][0] == "ok" else header + tb
        payload = bytearray(wire[len(header):])
        if payload and data.draw(st.booleans()):
            payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
        openers = [PURE.FrameOpener(KEY, NONCE, cluster, counter),
                   self.c.FrameOpener(KEY, NONCE, cluster, counter)]
        for method in ("open_frame", "open_buffer"):
            results = []
            for o in openers:
                given_payload = bytearray(payload)
                call = partial(open_frame, o) if method == "open_frame" else o.open_buffer
                results.append((outcome(call, wire[:len(header)], given_payload),
                                bytes(given_payload), o.counter))
            self.assertEqual(results[0], results[1])

    @given(tb_material(), st.booleans(), st.booleans(),
           st.sampled_from([None, 0, 7]), st.sampled_from([0, U64 - 2]), st.data())
    def test_encoder(self, stream: bytes, sealed: bool, check: bool, cluster: Optional[int],
                     counter: int, data: st.DataObject) -> None:
        """FrameEncoder: same wire bytes, errors, counters, buffered count, frame count and watched headers for every read."""
        sealers = [PURE.FrameSealer(KEY, NONCE, counter), self.c.FrameSealer(KEY, NONCE, counter)]
        seen: List[List[bytes]] = [[], []]
        encoders = [impl.FrameEncoder(6, s if sealed else None, check, cluster, w.append)
                    for impl, s, w in zip((PURE, self.c), sealers, seen)]
        for chunk in data.draw(chunked(stream)) + [frame(1)]:
            got = [(outcome(e.encode, chunk), e.buffered(), s.counter, e.last_frames)
                   for e, s in zip(encoders, sealers)]
            self.assertEqual(got[0], got[1])
        self.assertEqual(seen[0], seen[1])

    @given(mux_material(), st.booleans(), st.booleans(), st.data())
    def test_receiver(self, material: Tuple[bytes, int], cut_more: bool, extended: bool,
                      data: st.DataObject) -> None:
        """MuxReceiver, with or without the extension: same items, errors, counters and buffered count for every read."""
        wire, start = material
        openers = [PURE.FrameOpener(KEY, NONCE, 3, start), self.c.FrameOpener(KEY, NONCE, 3, start)]
        receivers = [impl.MuxReceiver(o, extended) for impl, o in zip((PURE, self.c), openers)]
        chunks = data.draw(chunked(wire, max_cuts=80 if cut_more else 10))
        for chunk in chunks + [b"", encode_header(1, FrameType.OPEN)]:
            got = [(outcome(r.feed, chunk), r.buffered(), o.counter)
                   for r, o in zip(receivers, openers)]
            self.assertEqual(got[0], got[1])

    @given(st.lists(st.tuples(st.integers(0, 3), tb_frames(max_body=200)), max_size=6),
           st.data())
    def test_plaintext_receiver(self, sent: List[Tuple[int, bytes]], data: st.DataObject) -> None:
        """MuxReceiver without keys: same items for plain data, opens and closes, however cut."""
        wire = b"".join(mux_header(s, 0) + tb if s else mux_header(1, data.draw(
            st.sampled_from([1, 2]))) for s, tb in sent)
        receivers = [PURE.MuxReceiver(None), self.c.MuxReceiver(None)]
        for chunk in data.draw(chunked(wire)):
            got = [(outcome(r.feed, chunk), r.buffered()) for r in receivers]
            self.assertEqual(got[0], got[1])
