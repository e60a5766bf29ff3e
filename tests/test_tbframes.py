"""Tests for tigertunnel.tools.tbframes: the one TB-frame builder."""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.tools.tbframes import (
    COMMAND_OFFSET,
    REQUEST,
    make_tb_frame,
    pattern_bytes,
    sized_tb_frame,
)
from tigertunnel.wire.frames import (
    MAX_FRAME_SIZE,
    FrameParser,
    check_frame,
    frame_cluster,
    frame_size,
)


class MakeTBFrameTests(SynchronousTestCase):
    """Frames built from a body and header bytes."""

    @given(st.binary(max_size=2000), st.binary(max_size=300), st.integers(0, (1 << 128) - 1))
    def test_valid_whatever_the_header_bytes(self, body: bytes, fill: bytes,
                                             cluster: int) -> None:
        """Any header bytes give a frame the tunnel's parser and checks accept, with the body at the end."""
        frame = make_tb_frame(body, fill, cluster)
        self.assertEqual(FrameParser().feed(frame), [frame])
        check_frame(frame, cluster)
        self.assertEqual((frame_size(frame), frame_cluster(frame), frame[256:]),
                         (256 + len(body), cluster, body))

    def test_tag_and_command(self) -> None:
        """The tag goes into the checksum field and the command into its byte."""
        frame = make_tb_frame(b"x", tag=0x0102, command=REQUEST)
        self.assertEqual(frame[0:16], (0x0102).to_bytes(16, "little"))
        self.assertEqual(frame[COMMAND_OFFSET], REQUEST)

    def test_oversized_on_purpose(self) -> None:
        """A body past 1 MiB - 256 gives a frame whose size field tells the truth."""
        frame = make_tb_frame(bytes(MAX_FRAME_SIZE))
        self.assertEqual(frame_size(frame), MAX_FRAME_SIZE + 256)


class SizedTBFrameTests(SynchronousTestCase):
    """Frames of a given size, derived from a seed."""

    @given(st.integers(256, 5000), st.integers(0, 1 << 20))
    def test_size_and_determinism(self, size: int, seed: int) -> None:
        """The frame has exactly the size asked for and the same seed gives the same bytes."""
        frame = sized_tb_frame(size, seed)
        self.assertEqual((len(frame), frame_size(frame)), (size, size))
        self.assertEqual(frame, sized_tb_frame(size, seed))
        check_frame(frame, 0)

    def test_seeds_differ(self) -> None:
        """Frames with different seeds differ in their header and their body."""
        a, b = sized_tb_frame(1024, 1), sized_tb_frame(1024, 2)
        self.assertNotEqual(a[:16], b[:16])
        self.assertNotEqual(a[256:], b[256:])
        self.assertEqual(pattern_bytes(3, 255), bytes([255, 0, 1]))

    def test_too_small(self) -> None:
        """A size below the header is refused, naming it."""
        with self.assertRaises(ValueError) as caught:
            sized_tb_frame(255)
        self.assertIn("255", str(caught.exception))
