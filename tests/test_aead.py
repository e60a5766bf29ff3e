"""Tests for :mod:`tigertunnel.crypto.aead` (frame encryption, PROTOCOL.md section 6)."""

import struct
from typing import Any, List, Tuple

import pyaegis
from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import (
    Implementation,
    ImplementationMixin,
    load_trace,
    load_vectors,
    on_both,
    open_frame,
    unhex,
)
from tests.strategies import make_tb_frame, tb_frames
from tigertunnel.crypto.aead import FrameSealer, frame_nonce
from tigertunnel.errors import AuthenticationError, FrameError, TunnelError
from tigertunnel.wire.frames import frame_cluster
from tigertunnel.wire.muxframes import (
    FrameType,
    MuxDecoder,
    build_close_plaintext,
    encode_header,
    is_valid_close,
)

FRAMES = load_vectors("frames")
SESSIONS = [load_vectors("session_psk"), load_vectors("session_kem")]
KEY = bytes(range(16))
NONCE = bytes(range(100, 116))
MIB = 1 << 20


def receiver_view(frame: bytes, cluster_id: int) -> bytes:
    """``frame`` as a receiver rebuilds it: nonce_reserved zeroed, its own cluster."""
    return frame[:64] + bytes(16) + cluster_id.to_bytes(16, "little") + frame[96:]


def seal_by_spec(key: bytes, nonce: bytes, header: bytes, frame: bytes) -> bytes:
    """Encrypt ``frame`` following PROTOCOL.md 6.2 literally, without any check."""
    p = frame[0:64] + frame[100:256] + frame[240:256] + frame[256:]
    ct, tag = pyaegis.Aegis128X2(tag_size=16).encrypt_detached(key, nonce, p, header)
    return header + tag + frame[96:100] + ct


def seal_one(sealer: FrameSealer, header: bytes, frame: bytes) -> bytes:
    """Seal and check the chunk shape; return the joined wire bytes."""
    chunks = sealer.seal(header, frame)
    assert all(type(c) is bytes for c in chunks)
    assert chunks[0][:12] == header
    wire = b"".join(chunks)
    assert len(wire) == 12 + len(frame)
    return wire


class FrameVectorTests(ImplementationMixin):
    """frames.json, produced by the reference."""

    impl: Implementation

    def test_sequences(self) -> None:
        """Sealing gives the reference wire bytes and opening the reference frames."""
        self.assertEqual([s["name"] for s in FRAMES["sequences"]],
                         ["c2s_counter_from_0", "s2c_counter_across_2pow32",
                          "receiver_without_cluster"])
        for seq in FRAMES["sequences"]:
            key, base = unhex(seq["key"]), unhex(seq["base_nonce"])
            start = int(seq["start_counter"])
            cluster = int(seq["receiver_cluster_id"])
            sealer = self.impl.FrameSealer(key, base, start)
            opener = self.impl.FrameOpener(key, base, cluster, start)
            for f in seq["frames"]:
                plain = unhex(f["plaintext_frame"])
                self.assertEqual(len(plain), f["frame_size"])
                self.assertEqual(f["frame_size"], 256 + f["body_length"])
                self.assertEqual(sealer.counter, int(f["counter"]))
                self.assertEqual(opener.counter, int(f["counter"]))
                header = encode_header(seq["stream_id"], FrameType.DATA)
                self.assertEqual(header, unhex(f["mux_header"]))
                wire = seal_one(sealer, header, plain)
                self.assertEqual(wire, unhex(f["wire"]))
                self.assertEqual(len(wire), f["wire_length"])
                frame, = MuxDecoder(encrypted=True).feed(wire)
                self.assertEqual(open_frame(opener, frame.header, frame.payload),
                                 unhex(f["decrypted_frame"]))
            self.assertEqual(sealer.counter, int(seq["counter_after"]))
            self.assertEqual(opener.counter, int(seq["counter_after"]))

    def test_nonce_crosses_2pow32(self) -> None:
        """The counter is XORed into bytes 0..7 as a 64-bit little-endian integer."""
        base = bytes(range(16))
        self.assertEqual(frame_nonce(base, 1 << 32),
                         bytes([0, 1, 2, 3, 5]) + bytes(range(5, 16)))
        self.assertEqual(frame_nonce(base, 0), base)
        self.assertEqual(frame_nonce(base, (1 << 64) - 1),
                         bytes(b ^ 0xFF for b in base[:8]) + base[8:])

    def test_nonzero_checksum_padding(self) -> None:
        """A frame with non-zero checksum_padding is refused without consuming a counter."""
        vector = FRAMES["nonzero_checksum_padding"]
        self.assertEqual(vector["result"], "InvalidPadding")
        seq = FRAMES["sequences"][0]
        sealer = self.impl.FrameSealer(unhex(seq["key"]), unhex(seq["base_nonce"]))
        frame = bytearray(unhex(seq["frames"][0]["plaintext_frame"]))
        frame[20] = 1
        self.assertRaises(FrameError, sealer.seal, encode_header(1, FrameType.DATA),
                          bytes(frame))
        self.assertEqual(sealer.counter, int(vector["counter_after"]))
        # The counter value is still available for the next good frame.
        self.assertEqual(seal_one(sealer, unhex(seq["frames"][0]["mux_header"]),
                                  unhex(seq["frames"][0]["plaintext_frame"])),
                         unhex(seq["frames"][0]["wire"]))


class SessionVectorTests(ImplementationMixin):
    """Complete sessions captured between the reference client and server."""

    impl: Implementation

    def keys(self, session: Any) -> Tuple[bytes, bytes, bytes, bytes]:
        k = session["derived_keys_client_side"]
        return (unhex(k["c2s_key"]), unhex(k["c2s_nonce"]),
                unhex(k["s2c_key"]), unhex(k["s2c_nonce"]))

    def test_decode_c2s(self) -> None:
        """The c2s stream decrypts into the TB client's frames and a valid stream_close."""
        for session in SESSIONS:
            c2s_key, c2s_nonce, _, _ = self.keys(session)
            cluster = int(session["cluster_id"])
            hello = len(unhex(session["client_to_server_segments"][0]["bytes"]))
            stream = unhex(session["client_to_server"])
            self.assertEqual(len(stream), session["c2s_length"])
            frames = MuxDecoder(encrypted=True).feed(stream[hello:])
            self.assertEqual([f.frame_type for f in frames],
                             [FrameType.OPEN] + [FrameType.DATA] * 3 + [FrameType.CLOSE])
            self.assertEqual({f.stream_id for f in frames}, {1})
            opener = self.impl.FrameOpener(c2s_key, c2s_nonce, cluster)
            got = [open_frame(opener, f.header, f.payload) for f in frames[1:4]]
            self.assertEqual(got, [receiver_view(unhex(t["sent_by_tb_client"]), cluster)
                                   for t in session["tb_frames"]])
            close = open_frame(opener, frames[4].header, frames[4].payload)
            self.assertTrue(is_valid_close(close, 1))
            self.assertEqual(close, receiver_view(build_close_plaintext(1), cluster))
            self.assertEqual(opener.counter, int(session["client_c2s_counter_after"]))

    def test_decode_s2c(self) -> None:
        """The s2c stream decrypts into the frames the TB client received."""
        for session in SESSIONS:
            _, _, s2c_key, s2c_nonce = self.keys(session)
            stream = unhex(session["server_to_client"])
            self.assertEqual(len(stream), session["s2c_length"])
            frames = MuxDecoder(encrypted=True).feed(stream[49:])
            self.assertEqual([f.frame_type for f in frames], [FrameType.DATA] * 3)
            opener = self.impl.FrameOpener(s2c_key, s2c_nonce, int(session["cluster_id"]))
            self.assertEqual([open_frame(opener, f.header, f.payload) for f in frames],
                             [unhex(t["received_by_tb_client"]) for t in session["tb_frames"]])
            self.assertEqual(opener.counter, int(session["client_s2c_counter_after"]))

    def test_reseal(self) -> None:
        """Sealing the session's frames reproduces both streams byte for byte."""
        for session in SESSIONS:
            c2s_key, c2s_nonce, s2c_key, s2c_nonce = self.keys(session)
            segs = session["client_to_server_segments"]
            self.assertEqual(unhex(segs[1]["bytes"]), encode_header(1, FrameType.OPEN))
            after_open = sum(len(unhex(s["bytes"])) for s in segs[:2])
            sealer = self.impl.FrameSealer(c2s_key, c2s_nonce)
            wire = b"".join(seal_one(sealer, encode_header(1, FrameType.DATA),
                                     unhex(t["sent_by_tb_client"]))
                            for t in session["tb_frames"])
            wire += seal_one(sealer, encode_header(1, FrameType.CLOSE),
                             build_close_plaintext(1))
            self.assertEqual(wire, unhex(session["client_to_server"])[after_open:])
            self.assertEqual(sealer.counter, int(session["client_c2s_counter_after"]))
            sealer = self.impl.FrameSealer(s2c_key, s2c_nonce)
            wire = b"".join(seal_one(sealer, encode_header(1, FrameType.DATA),
                                     unhex(t["received_by_tb_client"]))
                            for t in session["tb_frames"])
            self.assertEqual(wire, unhex(session["server_to_client"])[49:])
            self.assertEqual(sealer.counter, int(session["client_s2c_counter_after"]))


class TraceTests(ImplementationMixin):
    """Real TigerBeetle frames, up to exactly 1 MiB."""

    impl: Implementation

    def test_round_trip(self) -> None:
        """Every traced frame seals to the spec's bytes and opens back unchanged."""
        frames = [f.data for name in ("tb-0.17.8-single", "tb-0.17.8-cluster3")
                  for f in load_trace(name)]
        self.assertEqual(max(map(len, frames)), MIB)
        sealer = self.impl.FrameSealer(KEY, NONCE)
        for i, frame in enumerate(frames):
            header = encode_header(i, FrameType.DATA)
            wire = seal_one(sealer, header, frame)
            self.assertEqual(wire, seal_by_spec(KEY, frame_nonce(NONCE, i), header, frame))
            opener = self.impl.FrameOpener(KEY, NONCE, frame_cluster(frame), i)
            self.assertEqual(open_frame(opener, wire[:12], wire[12:]), frame)
            self.assertEqual(opener.counter, i + 1)

    def test_tampered_mib_frame(self) -> None:
        """A 1 MiB frame with its last ciphertext bit flipped fails; the counter stays."""
        frame = make_tb_frame(bytes(range(256)) * ((MIB - 256) // 256))
        header = encode_header(1, FrameType.DATA)
        wire = bytearray(seal_one(self.impl.FrameSealer(KEY, NONCE, 9), header, frame))
        wire[-1] ^= 0x80
        opener = self.impl.FrameOpener(KEY, NONCE, 0, 9)
        self.assertRaises(AuthenticationError, open_frame, opener, header, bytes(wire[12:]))
        self.assertEqual(opener.counter, 9)


class SealOpenTests(ImplementationMixin):
    """Properties of sealing and opening."""

    impl: Implementation

    @given(st.lists(tb_frames(max_body=800), min_size=1, max_size=4),
           st.integers(0, (1 << 64) - 5), st.integers(0, (1 << 128) - 1))
    def test_round_trip(self, frames: List[bytes], start: int, cluster: int) -> None:
        """Opening sealed frames in order gives them back as the receiver rebuilds them."""
        sealer = self.impl.FrameSealer(KEY, NONCE, start)
        opener = self.impl.FrameOpener(KEY, NONCE, cluster, start)
        for i, frame in enumerate(frames):
            header = encode_header(i, FrameType.DATA)
            wire = seal_one(sealer, header, frame)
            self.assertEqual(wire, seal_by_spec(KEY, frame_nonce(NONCE, start + i),
                                                header, frame))
            self.assertEqual(open_frame(opener, wire[:12], wire[12:]),
                             receiver_view(frame, cluster))
        self.assertEqual((sealer.counter, opener.counter),
                         (start + len(frames), start + len(frames)))

    @given(st.data())
    def test_bit_flip(self, data: st.DataObject) -> None:
        """Flipping any bit of the header, tag, size or ciphertext fails; the counter stays."""
        frame = data.draw(tb_frames(max_body=300))
        counter = data.draw(st.integers(0, 1000))
        header = encode_header(data.draw(st.integers(0, 9)), FrameType.DATA)
        wire = seal_one(self.impl.FrameSealer(KEY, NONCE, counter), header, frame)
        region = data.draw(st.sampled_from([(0, 12), (12, 28), (28, 32), (32, len(wire))]))
        bit = data.draw(st.integers(region[0] * 8, region[1] * 8 - 1))
        bad = bytearray(wire)
        bad[bit // 8] ^= 1 << (bit % 8)
        opener = self.impl.FrameOpener(KEY, NONCE, 0, counter)
        self.assertRaises((AuthenticationError, FrameError),
                          open_frame, opener, bytes(bad[:12]), bytes(bad[12:]))
        self.assertEqual(opener.counter, counter)
        # The untouched frame still opens: nothing moved.
        self.assertEqual(open_frame(opener, wire[:12], wire[12:]), receiver_view(frame, 0))

    def test_wrong_counter(self) -> None:
        """A frame sealed with another counter fails to authenticate."""
        wire = seal_one(self.impl.FrameSealer(KEY, NONCE, 5), encode_header(1, FrameType.DATA),
                        make_tb_frame(b"x"))
        opener = self.impl.FrameOpener(KEY, NONCE, 0, 4)
        self.assertRaises(AuthenticationError, open_frame, opener, wire[:12], wire[12:])
        self.assertEqual(opener.counter, 4)

    @given(st.sampled_from([range(16, 32), range(48, 64)]).flatmap(st.sampled_from),
           st.integers(1, 255))
    def test_seal_padding(self, index: int, value: int) -> None:
        """Any non-zero padding byte is refused and consumes no counter value."""
        frame = bytearray(make_tb_frame(b"body"))
        frame[index] = value
        sealer = self.impl.FrameSealer(KEY, NONCE, 3)
        self.assertRaises(FrameError, sealer.seal, encode_header(1, FrameType.DATA),
                          bytes(frame))
        self.assertEqual(sealer.counter, 3)

    @given(st.sampled_from([range(16, 32), range(48, 64)]).flatmap(st.sampled_from),
           st.integers(1, 255))
    def test_open_padding(self, index: int, value: int) -> None:
        """Non-zero padding behind a good tag raises FrameError after the counter advanced."""
        frame = bytearray(make_tb_frame(b"body"))
        frame[index] = value
        header = encode_header(1, FrameType.DATA)
        wire = seal_by_spec(KEY, frame_nonce(NONCE, 7), header, bytes(frame))
        opener = self.impl.FrameOpener(KEY, NONCE, 0, 7)
        self.assertRaises(FrameError, open_frame, opener, wire[:12], wire[12:])
        self.assertEqual(opener.counter, 8)

    def test_seal_bad_frames(self) -> None:
        """Frames with a wrong length or size field are refused without using a counter."""
        sealer = self.impl.FrameSealer(KEY, NONCE)
        header = encode_header(1, FrameType.DATA)
        good = make_tb_frame(b"abc")
        for frame in (good[:-1], good + b"x", bytes(255), make_tb_frame(bytes(MIB - 255))):
            self.assertRaises(FrameError, sealer.seal, header, frame)
        self.assertRaises(FrameError, sealer.seal, header[:11], good)
        self.assertEqual(sealer.counter, 0)

    def test_open_bad_size(self) -> None:
        """A payload whose clear size differs from its length is refused; counter unchanged."""
        wire = seal_one(self.impl.FrameSealer(KEY, NONCE), encode_header(1, FrameType.DATA),
                        make_tb_frame(bytes(10)))
        opener = self.impl.FrameOpener(KEY, NONCE)
        for payload in (wire[12:] + b"\0", wire[12:-1], wire[12:12 + 255]):
            self.assertRaises(FrameError, open_frame, opener, wire[:12], payload)
        self.assertEqual(opener.counter, 0)
        self.assertEqual(len(open_frame(opener, wire[:12], wire[12:])), 266)

    def test_duplicate_tail_ignored(self) -> None:
        """The second copy of the last 16 header bytes is discarded by the receiver."""
        frame = make_tb_frame(b"body", header_fill=bytes(range(256)))
        p = bytearray(frame[0:64] + frame[100:256] + frame[240:256] + frame[256:])
        p[220:236] = b"\xee" * 16
        header = encode_header(2, FrameType.DATA)
        ct, tag = pyaegis.Aegis128X2(tag_size=16).encrypt_detached(
            KEY, NONCE, bytes(p), header)
        opened = open_frame(self.impl.FrameOpener(KEY, NONCE), header, tag + frame[96:100] + ct)
        self.assertEqual(opened, receiver_view(frame, 0))

    def test_counter_limits(self) -> None:
        """Counters are u64: the last value works, then sealing and opening stop."""
        header = encode_header(1, FrameType.DATA)
        frame = make_tb_frame(b"")
        sealer = self.impl.FrameSealer(KEY, NONCE, (1 << 64) - 1)
        wire = seal_one(sealer, header, frame)
        self.assertRaises(TunnelError, sealer.seal, header, frame)
        opener = self.impl.FrameOpener(KEY, NONCE, 0, (1 << 64) - 1)
        self.assertEqual(open_frame(opener, header, wire[12:]), frame)
        self.assertRaises(AuthenticationError, open_frame, opener, header, wire[12:])
        self.assertRaises(ValueError, self.impl.FrameSealer, KEY, NONCE, 1 << 64)
        self.assertRaises(ValueError, self.impl.FrameOpener, KEY, NONCE, 0, -1)

    def test_bad_keys(self) -> None:
        """Keys and base nonces must be 16 bytes, cluster ids u128."""
        self.assertRaises(ValueError, self.impl.FrameSealer, KEY[:15], NONCE)
        self.assertRaises(ValueError, self.impl.FrameSealer, KEY, NONCE + b"x")
        self.assertRaises(ValueError, self.impl.FrameOpener, KEY + b"x", NONCE)
        self.assertRaises(ValueError, self.impl.FrameOpener, KEY, NONCE, 1 << 128)

    def test_tag_is_16_bytes(self) -> None:
        """The tag is 16 bytes: the wire adds nothing to the frame size."""
        frame = make_tb_frame(bytes(1000))
        chunks = self.impl.FrameSealer(KEY, NONCE).seal(encode_header(1, FrameType.DATA), frame)
        self.assertEqual(sum(map(len, chunks)), 12 + len(frame))
        self.assertEqual(struct.unpack("<I", b"".join(chunks)[28:32])[0], len(frame))


PureFrameVectorTests, CompiledFrameVectorTests = on_both(FrameVectorTests)
PureSessionVectorTests, CompiledSessionVectorTests = on_both(SessionVectorTests)
PureTraceTests, CompiledTraceTests = on_both(TraceTests)
PureSealOpenTests, CompiledSealOpenTests = on_both(SealOpenTests)
