"""A TB-frame echo backend: writes every complete TB frame straight back.

Stands in for a replica in the demo, the benchmark and the tests. It checks
frame sizes like the tunnel does and closes a connection that sends a frame
outside 256 B ... 1 MiB.

A frame whose ``command`` is :data:`HANG_UP` (0, ``reserved``: TigerBeetle
never sends it) is not echoed: the backend closes the connection instead,
after echoing the frames before it. The churn of ``tigertunnel bench
--churn`` uses it for sessions cut by the backend.
"""

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from tigertunnel.errors import FrameError
from tigertunnel.tools.tbframes import COMMAND_OFFSET
from tigertunnel.wire.frames import FrameParser

#: The ``command`` of a frame that makes the backend close the connection.
HANG_UP = 0


class EchoProtocol(Protocol):
    """Echo each complete TB frame back to the sender, unchanged."""

    def __init__(self) -> None:
        self._parser = FrameParser()
        self.frames = 0

    def connectionMade(self) -> None:
        from tigertunnel.net.sockets import tune_socket
        tune_socket(self.transport)

    def dataReceived(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None, "data arrives on a connected protocol"
        try:
            frames = self._parser.feed(data)
        except FrameError:
            transport.loseConnection()
            return
        for i, frame in enumerate(frames):
            if frame[COMMAND_OFFSET] == HANG_UP:
                frames = frames[:i]
                transport.loseConnection()
                break
        if frames:
            self.frames += len(frames)
            transport.writeSequence(frames)


class EchoFactory(Factory):
    """Factory of :class:`EchoProtocol`; counts connections."""

    protocol = EchoProtocol
    noisy = False

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> EchoProtocol:
        self.connections += 1
        return EchoProtocol()


def main(argv: "list[str] | None" = None) -> int:
    """``python -m tigertunnel.tools.echo PORT``: run an echo backend on 127.0.0.1."""
    import sys

    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        sys.stderr.write("usage: python -m tigertunnel.tools.echo PORT\n")
        return 2
    from tigertunnel.config.model import LISTEN_BACKLOG
    from tigertunnel.ops.memory import tune_malloc
    tune_malloc()
    status = [0]

    def failed(failure: Failure) -> None:
        sys.stderr.write(f"echo: {failure.getErrorMessage()}\n")
        status[0] = 1
        reactor.stop()

    d = TCP4ServerEndpoint(reactor, int(args[0]), backlog=LISTEN_BACKLOG,
                           interface="127.0.0.1").listen(EchoFactory())
    d.addErrback(failed)
    reactor.run()
    return status[0]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
