"""Tests for tigertunnel.tools.echo: the TB-frame echo backend."""

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.tools.echo import HANG_UP, EchoProtocol
from tigertunnel.tools.tbframes import sized_tb_frame


def connected(hang_up: bool = True) -> "tuple[EchoProtocol, StringTransport]":
    """An echo protocol (closing at a HANG_UP frame unless told not to) on a StringTransport."""
    proto = EchoProtocol(hang_up)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


class EchoTests(SynchronousTestCase):
    """Complete frames come back unchanged; a hang-up frame closes the connection."""

    def test_frames_echoed(self) -> None:
        """Each complete frame is written back as it was, a partial one only once complete."""
        proto, transport = connected()
        a, b = sized_tb_frame(300, 1), sized_tb_frame(4096, 2)
        proto.dataReceived(a + b[:1000])
        self.assertEqual(transport.value(), a)
        proto.dataReceived(b[1000:])
        self.assertEqual(transport.value(), a + b)
        self.assertFalse(transport.disconnecting)

    def test_hang_up_closes_after_the_frames_before_it(self) -> None:
        """A frame with the HANG_UP command is not echoed: the frames before it are, then the connection closes."""
        proto, transport = connected()
        a, b = sized_tb_frame(300, 1), sized_tb_frame(300, 3)
        proto.dataReceived(a + sized_tb_frame(256, 2, command=HANG_UP) + b)
        self.assertEqual(transport.value(), a)
        self.assertTrue(transport.disconnecting)

    def test_hang_up_is_opt_in(self) -> None:
        """Without hang_up (tigertunnel echo without --hang-up) a frame with command 0 is echoed like any other."""
        proto, transport = connected(hang_up=False)
        frames = sized_tb_frame(300, 1) + sized_tb_frame(256, 2, command=HANG_UP)
        proto.dataReceived(frames)
        self.assertEqual(transport.value(), frames)
        self.assertFalse(transport.disconnecting)

    def test_bad_size_closes(self) -> None:
        """A frame whose size is outside 256 B .. 1 MiB closes the connection."""
        proto, transport = connected()
        proto.dataReceived(bytes(300))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
