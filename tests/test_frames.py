"""Tests for :mod:`tigertunnel.wire.frames` (TB frame parsing, PROTOCOL.md 6.1 and 7.7)."""

import struct
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import Implementation, ImplementationMixin, load_trace, on_both
from tests.strategies import chunked, make_tb_frame, noisy_tb_streams, tb_frames
from tigertunnel.wire import frames
from tigertunnel.errors import ClusterMismatchError, FrameError
from tigertunnel.wire.frames import check_frame, frame_cluster, frame_size

MIB = 1 << 20


def trace_streams() -> List[Tuple[bytes, List[bytes]]]:
    """Each (link, conn, dir) of both traces: its concatenated bytes and its frames."""
    streams: Dict[Tuple[str, str, int, str], List[bytes]] = defaultdict(list)
    for name in ("tb-0.17.8-single", "tb-0.17.8-cluster3"):
        for f in load_trace(name):
            streams[(name, f.link, f.conn, f.dir)].append(f.data)
    return [(b"".join(fs), fs) for fs in streams.values()]


TRACE_STREAMS = trace_streams()


def model_parse(data: bytes, max_size: int = MIB) -> Tuple[List[bytes], Optional[int]]:
    """Parse ``data`` the slow, obvious way.

    :returns: the complete frames before any error, and the index of the byte
        that makes a bad size readable (the last size byte), or ``None``.
    """
    out: List[bytes] = []
    off = 0
    while len(data) - off >= 100:
        size = int.from_bytes(data[off + 96:off + 100], "little")
        if not 256 <= size <= max_size:
            return out, off + 99
        if len(data) - off < size:
            break
        out.append(data[off:off + size])
        off += size
    return out, None


class ConstantsTests(SynchronousTestCase):
    """The wire constants."""

    def test_values(self) -> None:
        """The constants match PROTOCOL.md section 6.1."""
        self.assertEqual(
            (frames.HEADER_SIZE, frames.MIN_FRAME_SIZE, frames.MAX_FRAME_SIZE,
             frames.SIZE_OFFSET, frames.CLUSTER_OFFSET, frames.CHECKSUM_PADDING,
             frames.CHECKSUM_BODY_PADDING),
            (256, 256, 1048576, 96, 80, slice(16, 32), slice(48, 64)))


class FieldTests(SynchronousTestCase):
    """frame_size and frame_cluster."""

    @given(st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 128) - 1))
    def test_fields(self, size: int, cluster: int) -> None:
        """The size is the u32 LE at 96 and the cluster the u128 LE at 80."""
        header = bytearray(range(256))
        header[96:100] = size.to_bytes(4, "little")
        header[80:96] = cluster.to_bytes(16, "little")
        self.assertEqual(frame_size(bytes(header[:100])), size)
        self.assertEqual(frame_cluster(bytes(header)), cluster)

    def test_short(self) -> None:
        """Too short a header for the field raises FrameError."""
        self.assertRaises(FrameError, frame_size, bytes(99))
        self.assertRaises(FrameError, frame_cluster, bytes(95))


class ParserTraceTests(ImplementationMixin):
    """FrameParser on the recorded TigerBeetle traffic."""

    impl: Implementation

    def test_whole_streams(self) -> None:
        """Each direction of each traced connection, fed at once, yields its frames."""
        self.assertEqual(len(TRACE_STREAMS), 14)
        self.assertIn(MIB, [len(f) for _, fs in TRACE_STREAMS for f in fs])
        for data, expected in TRACE_STREAMS:
            parser = self.impl.FrameParser()
            got = parser.feed(data)
            self.assertEqual(got, expected)
            self.assertTrue(all(type(f) is bytes for f in got))
            self.assertEqual(parser.buffered(), 0)

    @given(st.data())
    def test_trace_chunking(self, data: st.DataObject) -> None:
        """Any chunking of a traced stream yields exactly the traced frames."""
        stream, expected = data.draw(st.sampled_from(TRACE_STREAMS))
        parser = self.impl.FrameParser()
        got = []
        for chunk in data.draw(chunked(stream, max_cuts=80)):
            got.extend(parser.feed(chunk))
        self.assertEqual(got, expected)
        self.assertEqual(parser.buffered(), 0)


class ParserTests(ImplementationMixin):
    """FrameParser on generated input."""

    impl: Implementation

    @given(st.lists(tb_frames(), max_size=5), st.data())
    def test_chunking_invariance(self, expected: List[bytes], data: st.DataObject) -> None:
        """Any split of a stream of valid frames yields the same frames, all bytes."""
        stream = b"".join(expected)
        parser = self.impl.FrameParser()
        got = []
        for chunk in data.draw(chunked(stream)):
            got.extend(parser.feed(chunk))
        self.assertEqual(got, expected)
        self.assertTrue(all(type(f) is bytes for f in got))

    def test_byte_at_a_time(self) -> None:
        """Bytes fed one at a time yield each frame exactly when its last byte arrives."""
        expected = [make_tb_frame(b""), make_tb_frame(b"x"), make_tb_frame(bytes(700))]
        stream = b"".join(expected)
        ends = {sum(map(len, expected[:i + 1])) for i in range(len(expected))}
        parser = self.impl.FrameParser()
        got = []
        for i in range(len(stream)):
            out = parser.feed(stream[i:i + 1])
            self.assertEqual(bool(out), i + 1 in ends)
            got.extend(out)
            self.assertEqual(parser.buffered(), (i + 1) - sum(map(len, got)))
        self.assertEqual(got, expected)

    def test_bytearray_and_memoryview_input(self) -> None:
        """Non-bytes input still yields frames of type bytes."""
        frame = make_tb_frame(b"abc")
        for wrap in (bytearray, memoryview):
            got = self.impl.FrameParser().feed(wrap(frame + frame[:5]))
            self.assertEqual(got, [frame])
            self.assertIs(type(got[0]), bytes)

    def test_partial_tail_kept(self) -> None:
        """The bytes after the last complete frame are kept and completed later."""
        frame = make_tb_frame(bytes(300))
        parser = self.impl.FrameParser()
        self.assertEqual(parser.feed(frame + frame[:400]), [frame])
        self.assertEqual(parser.buffered(), 400)
        self.assertEqual(parser.feed(frame[400:] + frame[:10]), [frame])
        self.assertEqual(parser.buffered(), 10)

    def test_extreme_sizes_accepted(self) -> None:
        """Frames of exactly 256 bytes and exactly 1 MiB are accepted."""
        small, big = make_tb_frame(b""), make_tb_frame(bytes(MIB - 256))
        self.assertEqual(self.impl.FrameParser().feed(small + big), [small, big])

    @given(st.one_of(st.integers(0, 255), st.integers(MIB + 1, (1 << 32) - 1)),
           st.binary(min_size=96, max_size=96))
    def test_bad_size_rejected_before_body(self, size: int, prefix: bytes) -> None:
        """A size outside 256..1 MiB raises when the size bytes arrive, not later."""
        parser = self.impl.FrameParser()
        head = prefix + struct.pack("<I", size)
        self.assertEqual(parser.feed(head[:99]), [])
        self.assertRaises(FrameError, parser.feed, head[99:])

    def test_max_size_parameter(self) -> None:
        """A custom max_size accepts frames up to it and rejects one byte more."""
        ok, too_big = make_tb_frame(bytes(744)), make_tb_frame(bytes(745))
        self.assertEqual(self.impl.FrameParser(max_size=1000).feed(ok), [ok])
        self.assertRaises(FrameError, self.impl.FrameParser(max_size=1000).feed, too_big[:100])
        self.assertRaises(ValueError, self.impl.FrameParser, max_size=MIB + 1)
        self.assertRaises(ValueError, self.impl.FrameParser, max_size=255)

    def test_dead_after_error(self) -> None:
        """After an error every feed raises, even with valid data."""
        parser = self.impl.FrameParser()
        self.assertRaises(FrameError, parser.feed, bytes(100))
        self.assertRaises(FrameError, parser.feed, make_tb_frame(b""))
        self.assertRaises(FrameError, parser.feed, b"")
        self.assertEqual(parser.buffered(), 0)

    @given(noisy_tb_streams(), st.data())
    def test_arbitrary_bytes(self, stream: bytes, data: st.DataObject) -> None:
        """Arbitrary bytes give a prefix of the frames, then FrameError at the bad size byte."""
        expected, error_at = model_parse(stream)
        parser = self.impl.FrameParser()
        got: List[bytes] = []
        start = 0
        for chunk in data.draw(chunked(stream)):
            end = start + len(chunk)
            if error_at is not None and start <= error_at < end:
                self.assertRaises(FrameError, parser.feed, chunk)
                break
            got.extend(parser.feed(chunk))
            start = end
        else:
            self.assertIsNone(error_at)
            self.assertEqual(got, expected)
            self.assertEqual(parser.buffered(), len(stream) - sum(map(len, got)))
            return
        # The frames delivered before the failing chunk are exactly the model's
        # frames that ended before it.
        self.assertEqual(got, [f for i, f in enumerate(expected)
                               if sum(map(len, expected[:i + 1])) <= start])


class CheckFrameTests(SynchronousTestCase):
    """check_frame padding and cluster rules."""

    @given(st.integers(0, (1 << 128) - 1), tb_frames(max_body=10, cluster=0))
    def test_matching_cluster(self, cluster: int, frame: bytes) -> None:
        """A frame with zero paddings and nonce_reserved and the configured cluster passes."""
        framed = frame[:64] + bytes(16) + cluster.to_bytes(16, "little") + frame[96:]
        check_frame(framed, cluster)
        if cluster == 0:
            check_frame(framed, None)

    @given(st.integers(64, 79), st.integers(1, 255))
    def test_nonce_reserved_refused(self, offset: int, value: int) -> None:
        """A frame with a non-zero nonce_reserved byte is refused (the encrypted format drops it)."""
        frame = bytearray(make_tb_frame(b"", cluster=0))
        frame[offset] = value
        err = self.assertRaises(FrameError, check_frame, bytes(frame), None)
        self.assertIn("nonce_reserved", str(err))

    @given(st.integers(0, (1 << 128) - 1), st.integers(0, (1 << 128) - 1))
    def test_cluster_mismatch(self, configured: int, got: int) -> None:
        """A frame whose cluster differs from the configured one raises ClusterMismatchError."""
        frame = make_tb_frame(b"", cluster=got)
        if configured == got:
            check_frame(frame, configured)
            return
        err = self.assertRaises(ClusterMismatchError, check_frame, frame, configured)
        self.assertEqual((err.expected, err.got), (configured, got))

    @given(st.integers(1, (1 << 128) - 1))
    def test_no_cluster_configured(self, got: int) -> None:
        """Without a configured cluster, a non-zero cluster mismatches expected 0."""
        err = self.assertRaises(ClusterMismatchError, check_frame,
                                make_tb_frame(b"", cluster=got), None)
        self.assertEqual((err.expected, err.got), (0, got))

    @given(st.sampled_from([range(16, 32), range(48, 64)]).flatmap(st.sampled_from),
           st.integers(1, 255), st.sampled_from([None, 0, 7]))
    def test_padding(self, index: int, value: int, cluster: Optional[int]) -> None:
        """Any non-zero padding byte raises FrameError (not a cluster error)."""
        frame = bytearray(make_tb_frame(b"body", cluster=5))
        frame[index] = value
        err = self.assertRaises(FrameError, check_frame, bytes(frame), cluster)
        self.assertNotIsInstance(err, ClusterMismatchError)

    def test_trace_frames_pass(self) -> None:
        """Every real TigerBeetle frame passes with its own cluster."""
        for _, fs in TRACE_STREAMS:
            for f in fs:
                check_frame(f, frame_cluster(f))


class DripTests(ImplementationMixin):
    """A frame dripped one byte per read costs memory in proportion to its size."""

    impl: Implementation

    def test_one_byte_reads_bounded_memory(self) -> None:
        """Feeding a 256 KiB frame one byte at a time peaks below four times its size."""
        import tracemalloc
        frame = make_tb_frame(bytes(256 * 1024 - 256), cluster=0)
        parser = self.impl.FrameParser()
        tracemalloc.start()
        try:
            got = []
            for i in range(len(frame)):
                got += parser.feed(frame[i:i + 1])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(got, [frame])
        self.assertLess(peak, 4 * len(frame))


PureParserTraceTests, CompiledParserTraceTests = on_both(ParserTraceTests)
PureParserTests, CompiledParserTests = on_both(ParserTests)
PureDripTests, CompiledDripTests = on_both(DripTests)
