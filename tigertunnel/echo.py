"""A TB-frame echo backend: writes every complete TB frame straight back.

Stands in for a replica in the demo, the benchmark and the tests. It checks
frame sizes like the tunnel does and closes a connection that sends a frame
outside 256 B ... 1 MiB.
"""

from typing import Any

from twisted.internet.protocol import Factory, Protocol

from tigertunnel.errors import FrameError
from tigertunnel.frames import FrameParser


class EchoProtocol(Protocol):
    """Echo each complete TB frame back to the sender, unchanged."""

    def __init__(self) -> None:
        self._parser = FrameParser()
        self.frames = 0

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except AttributeError:
            pass

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._parser.feed(data)
        except FrameError:
            self.transport.loseConnection()
            return
        if frames:
            self.frames += len(frames)
            self.transport.writeSequence(frames)


class EchoFactory(Factory):
    """Factory of :class:`EchoProtocol`; counts connections."""

    protocol = EchoProtocol
    noisy = False

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> EchoProtocol:
        self.connections += 1
        return EchoProtocol()
