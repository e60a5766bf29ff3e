"""Tests for :mod:`tigertunnel.wire.muxframes` (mux framing, PROTOCOL.md 7.1, 7.2, 8)."""

import struct
from typing import List, Optional, Tuple

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import load_vectors, unhex
from tests.strategies import chunked, mux_header, mux_units, noisy_mux_streams
from tigertunnel.wire import muxframes
from tigertunnel.errors import MuxError
from tigertunnel.wire.muxframes import (
    FrameType,
    MuxDecoder,
    MuxFrame,
    build_close_plaintext,
    build_control_plaintext,
    encode_header,
    is_valid_close,
    parse_control,
)

MIB = 1 << 20
SESSIONS = [load_vectors("session_psk"), load_vectors("session_kem")]


def model_decode(data: bytes, encrypted: bool,
                 extended: bool = False) -> Tuple[List[bytes], Optional[int]]:
    """Decode ``data`` the slow, obvious way.

    ``extended``: types 3, 4 and 5 (encrypted only) carry 256 bytes.

    :returns: the complete units (header + payload) before any error, and the
        index of the first byte that shows the error, or ``None``.
    """
    out = []
    off = 0
    size_at = 16 if encrypted else 96
    max_type = 5 if extended and encrypted else 2
    while off < len(data):
        for i in range(4):
            if off + i < len(data) and data[off + i] != b"XUMZ"[i]:
                return out, off + i
        if off + 8 < len(data) and data[off + 8] > max_type:
            return out, off + 8
        if len(data) - off < 12:
            break
        kind = data[off + 8]
        if kind == 0:
            field = off + 12 + size_at
            if len(data) < field + 4:
                break
            size = int.from_bytes(data[field:field + 4], "little")
            if not 256 <= size <= MIB:
                return out, field + 3
        elif kind >= 2 and encrypted:
            size = 256
        else:
            size = 0
        if len(data) - off < 12 + size:
            break
        out.append(data[off:off + 12 + size])
        off += 12 + size
    return out, None


def units(frames: List[MuxFrame]) -> List[bytes]:
    """The wire bytes of decoded frames, checking each frame's fields on the way."""
    out = []
    for f in frames:
        # Data payloads are bytearrays (decrypted in place by the receiver).
        assert type(f.header) is bytes
        assert type(f.payload) is (bytearray if f.frame_type is FrameType.DATA else bytes)
        assert f.stream_id == struct.unpack("<I", f.header[4:8])[0]
        assert f.frame_type is FrameType(f.header[8])
        out.append(f.header + bytes(f.payload))
    return out


class ConstantsTests(SynchronousTestCase):
    """Wire constants and header encoding."""

    def test_values(self) -> None:
        """The constants match PROTOCOL.md section 7."""
        self.assertEqual(muxframes.MUX_HEADER_SIZE, 12)
        self.assertEqual(muxframes.MAGIC, b"XUMZ")
        self.assertEqual(struct.unpack("<I", muxframes.MAGIC)[0], 0x5A4D5558)
        self.assertEqual(muxframes.CLOSE_PAYLOAD_SIZE, 256)
        self.assertEqual([(t.name, int(t)) for t in FrameType],
                         [("DATA", 0), ("OPEN", 1), ("CLOSE", 2),
                          ("SEALED_OPEN", 3), ("PING", 4), ("PONG", 5)])
        self.assertEqual(muxframes.CONTROL_PAYLOAD_SIZE, 256)

    def test_stream_open_vector(self) -> None:
        """The stream_open of stream 1 is the reference's 12 bytes."""
        wire = unhex(load_vectors("frames")["stream_open_stream_1"]["wire"])
        self.assertEqual(encode_header(1, FrameType.OPEN), wire)
        self.assertEqual(MuxDecoder(encrypted=True).feed(wire),
                         [MuxFrame(1, FrameType.OPEN, wire, b"")])

    @given(st.integers(0, (1 << 32) - 1), st.sampled_from(list(FrameType)))
    def test_encode_header(self, stream_id: int, frame_type: FrameType) -> None:
        """The header is magic, stream id LE, type, three zero bytes."""
        self.assertEqual(encode_header(stream_id, frame_type),
                         mux_header(stream_id, int(frame_type)))

    def test_encode_header_range(self) -> None:
        """A stream id outside u32 is refused."""
        self.assertRaises(ValueError, encode_header, 1 << 32, FrameType.DATA)
        self.assertRaises(ValueError, encode_header, -1, FrameType.DATA)


class CloseTests(SynchronousTestCase):
    """The encrypted stream_close pseudo header."""

    @given(st.integers(0, (1 << 32) - 1))
    def test_layout(self, stream_id: int) -> None:
        """All zero except size 256 at 96, the stream id at 116 and 2 at 120."""
        expected = bytearray(256)
        expected[96:100] = (256).to_bytes(4, "little")
        expected[116:120] = stream_id.to_bytes(4, "little")
        expected[120] = 2
        plain = build_close_plaintext(stream_id)
        self.assertEqual(plain, bytes(expected))
        self.assertTrue(is_valid_close(plain, stream_id))

    @given(st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1))
    def test_other_stream(self, stream_id: int, other: int) -> None:
        """A close naming another stream is not valid for this one."""
        self.assertEqual(is_valid_close(build_close_plaintext(stream_id), other),
                         stream_id == other)

    @given(st.integers(0, 255))
    def test_marker(self, marker: int) -> None:
        """Only the byte 2 at offset 120 marks a close; other bytes are not checked."""
        plain = bytearray(build_close_plaintext(9))
        plain[120] = marker
        plain[0:96] = b"\xff" * 96
        self.assertEqual(is_valid_close(bytes(plain), 9), marker == 2)

    def test_short(self) -> None:
        """A payload too short to hold the marker is not a valid close."""
        self.assertFalse(is_valid_close(build_close_plaintext(1)[:120], 1))


class SessionVectorTests(SynchronousTestCase):
    """Decoding the pool-connection streams captured from the reference."""

    def c2s(self, session: dict) -> Tuple[bytes, List[dict]]:
        """The c2s mux bytes (after the ClientHello) and their segments."""
        segs = session["client_to_server_segments"]
        hello = len(unhex(segs[0]["bytes"]))
        return unhex(session["client_to_server"])[hello:], segs[1:]

    def s2c(self, session: dict) -> Tuple[bytes, List[dict]]:
        """The s2c mux bytes (after the 49-byte ServerHello) and their segments."""
        segs = session["server_to_client_segments"]
        self.assertEqual(len(unhex(segs[0]["bytes"])), 49)
        return unhex(session["server_to_client"])[49:], segs[1:]

    def check(self, stream: bytes, segs: List[dict], chunks: List[bytes]) -> None:
        decoder = MuxDecoder(encrypted=True)
        got: List[MuxFrame] = []
        for chunk in chunks:
            got.extend(decoder.feed(chunk))
        kinds = {"data": FrameType.DATA, "stream_open": FrameType.OPEN,
                 "stream_close": FrameType.CLOSE}
        self.assertEqual([(f.frame_type, f.stream_id) for f in got],
                         [(kinds[s["kind"]], s["stream_id"]) for s in segs])
        self.assertEqual(units(got), [unhex(s["bytes"]) for s in segs])
        self.assertEqual(decoder.buffered(), 0)

    def test_sessions(self) -> None:
        """Both captured sessions decode into exactly their recorded segments."""
        for session in SESSIONS:
            stream, segs = self.c2s(session)
            self.assertEqual([s["kind"] for s in segs],
                             ["stream_open", "data", "data", "data", "stream_close"])
            self.check(stream, segs, [stream])
            stream, segs = self.s2c(session)
            self.assertEqual([s["kind"] for s in segs], ["data"] * 3)
            self.check(stream, segs, [stream])

    @given(st.sampled_from(SESSIONS), st.booleans(), st.data())
    def test_session_chunking(self, session: dict, c2s: bool, data: st.DataObject) -> None:
        """Any chunking of a captured stream decodes into the same segments."""
        stream, segs = self.c2s(session) if c2s else self.s2c(session)
        self.check(stream, segs, data.draw(chunked(stream)))

    def test_byte_at_a_time(self) -> None:
        """The captured c2s stream fed byte by byte decodes into its segments."""
        stream, segs = self.c2s(SESSIONS[0])
        self.check(stream, segs, [stream[i:i + 1] for i in range(len(stream))])


class DecoderTests(SynchronousTestCase):
    """MuxDecoder on generated input."""

    @given(st.booleans(), st.data())
    def test_chunking_invariance(self, encrypted: bool, data: st.DataObject) -> None:
        """Any split of a stream of valid units yields the same frames."""
        expected = data.draw(st.lists(mux_units(encrypted), max_size=6))
        stream = b"".join(expected)
        decoder = MuxDecoder(encrypted)
        got: List[MuxFrame] = []
        for chunk in data.draw(chunked(stream)):
            got.extend(decoder.feed(chunk))
        self.assertEqual(units(got), expected)
        self.assertEqual(decoder.buffered(), 0)

    @given(st.binary(min_size=3, max_size=3), st.integers(0, (1 << 32) - 1))
    def test_reserved_kept(self, reserved: bytes, stream_id: int) -> None:
        """The reserved bytes are not checked and stay in the header (the AD)."""
        header = mux_header(stream_id, 1, reserved)
        frame, = MuxDecoder(encrypted=True).feed(header)
        self.assertEqual(frame, MuxFrame(stream_id, FrameType.OPEN, header, b""))

    def test_payload_lengths(self) -> None:
        """Payload lengths per type and mode follow PROTOCOL.md 7.2."""
        data = bytearray(300)
        data[16:20] = struct.pack("<I", 300)
        plain = bytearray(300)
        plain[96:100] = struct.pack("<I", 300)
        close = bytes(range(256))
        enc = (mux_header(1, 1) + mux_header(1, 0) + bytes(data)
               + mux_header(1, 2) + close)
        got = MuxDecoder(encrypted=True).feed(enc)
        self.assertEqual([len(f.payload) for f in got], [0, 300, 256])
        self.assertEqual(got[2].payload, close)
        pln = mux_header(1, 1) + mux_header(1, 0) + bytes(plain) + mux_header(1, 2)
        got = MuxDecoder(encrypted=False).feed(pln)
        self.assertEqual([len(f.payload) for f in got], [0, 300, 0])

    def test_extreme_sizes(self) -> None:
        """Data payloads of exactly 256 bytes and exactly 1 MiB are accepted."""
        for encrypted, at in ((True, 16), (False, 96)):
            for size in (256, MIB):
                payload = bytearray(size)
                payload[at:at + 4] = struct.pack("<I", size)
                frame, = MuxDecoder(encrypted).feed(mux_header(3, 0) + bytes(payload))
                self.assertEqual(frame.payload, bytes(payload))

    @given(st.integers(0, 3), st.integers(1, 255), st.booleans())
    def test_bad_magic_immediately(self, index: int, xor: int, encrypted: bool) -> None:
        """A wrong magic byte raises as soon as that byte arrives."""
        header = bytearray(mux_header(1, 1))
        header[index] ^= xor
        decoder = MuxDecoder(encrypted)
        self.assertEqual(decoder.feed(bytes(header[:index])), [])
        self.assertRaises(MuxError, decoder.feed, bytes(header[index:index + 1]))

    @given(st.integers(3, 255), st.booleans())
    def test_bad_type_immediately(self, kind: int, encrypted: bool) -> None:
        """A frame type above 2 raises as soon as the type byte arrives."""
        header = mux_header(1, kind)
        decoder = MuxDecoder(encrypted)
        self.assertEqual(decoder.feed(header[:8]), [])
        self.assertRaises(MuxError, decoder.feed, header[8:9])

    @given(st.one_of(st.integers(0, 255), st.integers(MIB + 1, (1 << 32) - 1)),
           st.booleans(), st.binary(min_size=96, max_size=96))
    def test_bad_size_before_body(self, size: int, encrypted: bool, filler: bytes) -> None:
        """A data size outside 256..1 MiB raises when the size field arrives."""
        at = 16 if encrypted else 96
        head = mux_header(1, 0) + filler[:at] + struct.pack("<I", size)
        decoder = MuxDecoder(encrypted)
        self.assertEqual(decoder.feed(head[:-1]), [])
        self.assertRaises(MuxError, decoder.feed, head[-1:])

    def test_dead_after_error(self) -> None:
        """After an error every feed raises, even with valid data."""
        decoder = MuxDecoder(encrypted=False)
        self.assertRaises(MuxError, decoder.feed, b"ZMUX")
        self.assertRaises(MuxError, decoder.feed, mux_header(1, 1))
        self.assertRaises(MuxError, decoder.feed, b"")
        self.assertEqual(decoder.buffered(), 0)

    @given(st.booleans(), st.data())
    def test_arbitrary_bytes(self, encrypted: bool, data: st.DataObject) -> None:
        """Arbitrary bytes give a prefix of the frames, then MuxError at the first bad byte."""
        stream = data.draw(st.one_of(noisy_mux_streams(encrypted), st.binary(max_size=64)))
        expected, error_at = model_decode(stream, encrypted)
        decoder = MuxDecoder(encrypted)
        got: List[MuxFrame] = []
        start = 0
        for chunk in data.draw(chunked(stream)):
            end = start + len(chunk)
            if error_at is not None and start <= error_at < end:
                self.assertRaises(MuxError, decoder.feed, chunk)
                break
            got.extend(decoder.feed(chunk))
            start = end
        else:
            self.assertIsNone(error_at)
            self.assertEqual(units(got), expected)
            self.assertEqual(decoder.buffered(), len(stream) - sum(map(len, expected)))
            return
        ends = [sum(map(len, expected[:i + 1])) for i in range(len(expected))]
        self.assertEqual(units(got), [u for u, e in zip(expected, ends) if e <= start])


@st.composite
def extended_streams(draw: st.DrawFn) -> bytes:
    """Reference units, version-2 control units and noise, mixed."""
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["control", "control", "noisy"]))
        if kind == "control":
            parts.append(mux_header(draw(st.integers(0, 9)), draw(st.integers(3, 5)))
                         + draw(st.binary(min_size=256, max_size=256)))
        else:
            parts.append(draw(noisy_mux_streams(encrypted=True)))
    return b"".join(parts)


class ExtendedDecoderTests(SynchronousTestCase):
    """MuxDecoder with the version-2 types (sealed stream_open, ping, pong)."""

    @given(st.data())
    def test_arbitrary_bytes(self, data: st.DataObject) -> None:
        """Mixed streams give the model's frames, then MuxError at the model's first bad byte."""
        stream = data.draw(extended_streams())
        expected, error_at = model_decode(stream, True, extended=True)
        decoder = MuxDecoder(encrypted=True, extended=True)
        got: List[MuxFrame] = []
        start = 0
        for chunk in data.draw(chunked(stream)):
            end = start + len(chunk)
            if error_at is not None and start <= error_at < end:
                self.assertRaises(MuxError, decoder.feed, chunk)
                return
            got.extend(decoder.feed(chunk))
            start = end
        self.assertIsNone(error_at)
        self.assertEqual(units(got), expected)

    def test_control_payloads(self) -> None:
        """Types 3, 4 and 5 carry 256 bytes each, fed whole or a byte at a time."""
        payloads = [bytes([k]) * 256 for k in (3, 4, 5)]
        stream = b"".join(mux_header(k, k) + p for k, p in zip((3, 4, 5), payloads))
        for step in (len(stream), 1):
            decoder = MuxDecoder(encrypted=True, extended=True)
            got: List[MuxFrame] = []
            for i in range(0, len(stream), step):
                got += decoder.feed(stream[i:i + step])
            self.assertEqual([(f.frame_type, f.payload) for f in got],
                             list(zip([FrameType.SEALED_OPEN, FrameType.PING, FrameType.PONG],
                                      payloads)))

    @given(st.integers(6, 255))
    def test_bad_type_immediately(self, kind: int) -> None:
        """A type above 5 raises as soon as the type byte arrives."""
        decoder = MuxDecoder(encrypted=True, extended=True)
        header = mux_header(0, kind)
        self.assertEqual(decoder.feed(header[:8]), [])
        self.assertRaises(MuxError, decoder.feed, header[8:9])

    @given(st.integers(3, 5))
    def test_not_in_plaintext(self, kind: int) -> None:
        """Plaintext mode never accepts the version-2 types, even when asked to."""
        decoder = MuxDecoder(encrypted=False, extended=True)
        self.assertRaises(MuxError, decoder.feed, mux_header(0, kind))


class ControlPlaintextTests(SynchronousTestCase):
    """The pseudo header of the version-2 control frames."""

    @given(st.sampled_from([FrameType.SEALED_OPEN, FrameType.PING, FrameType.PONG]),
           st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 64) - 1))
    def test_layout(self, kind: FrameType, stream_id: int, value: int) -> None:
        """Size 256 at 96, stream id at 116, type at 120, value at 128, zeros elsewhere."""
        expected = bytearray(256)
        expected[96:100] = (256).to_bytes(4, "little")
        expected[116:120] = stream_id.to_bytes(4, "little")
        expected[120] = int(kind)
        expected[128:136] = value.to_bytes(8, "little")
        plain = build_control_plaintext(kind, stream_id, value)
        self.assertEqual(plain, bytes(expected))
        self.assertEqual(parse_control(plain, kind, stream_id), value)

    @given(st.sampled_from([FrameType.SEALED_OPEN, FrameType.PING, FrameType.PONG]),
           st.sampled_from(list(FrameType)), st.integers(0, 3), st.integers(0, 3))
    def test_type_and_stream_must_match(self, kind: FrameType, other: FrameType,
                                        stream: int, other_stream: int) -> None:
        """A control payload is only valid for its own type and stream id."""
        plain = build_control_plaintext(kind, stream, 1)
        valid = other is kind and stream == other_stream
        self.assertEqual(parse_control(plain, other, other_stream), 1 if valid else None)

    def test_refused_fields(self) -> None:
        """Non-control types and out-of-range fields are programming errors; short payloads are invalid."""
        self.assertRaises(ValueError, build_control_plaintext, FrameType.CLOSE, 1)
        self.assertRaises(ValueError, build_control_plaintext, FrameType.PING, 1 << 32)
        self.assertRaises(ValueError, build_control_plaintext, FrameType.PING, 0, 1 << 64)
        self.assertRaises(ValueError, build_control_plaintext, FrameType.PING, 0, -1)
        self.assertIsNone(parse_control(build_control_plaintext(FrameType.PING, 0)[:255],
                                        FrameType.PING, 0))


class DripTests(SynchronousTestCase):
    """An encrypted data frame dripped one byte per read costs memory in proportion to its size."""

    def test_one_byte_reads_bounded_memory(self) -> None:
        """Feeding a 256 KiB data frame one byte at a time peaks below four times its size."""
        import tracemalloc
        size = 256 * 1024
        payload = bytearray(size)
        payload[16:20] = size.to_bytes(4, "little")  # the size in clear
        wire = muxframes.encode_header(9, muxframes.FrameType.DATA) + bytes(payload)
        decoder = muxframes.MuxDecoder(encrypted=True)
        tracemalloc.start()
        try:
            got = []
            for i in range(len(wire)):
                got += decoder.feed(wire[i:i + 1])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual([(f.stream_id, bytes(f.payload)) for f in got], [(9, bytes(payload))])
        self.assertLess(peak, 4 * len(wire))
