"""A TB-frame echo backend: writes every complete TB frame straight back.

Stands in for a replica in the demo, the benchmark and the tests. It checks
frame sizes like the tunnel does and closes a connection that sends a frame
outside 256 B ... 1 MiB.

``tigertunnel echo PORT`` (or ``python -m tigertunnel.tools.echo PORT``) runs
one on 127.0.0.1 (:func:`serve`).

With ``hang_up`` (``--hang-up``), a frame whose ``command`` is
:data:`HANG_UP` (0, ``reserved``: TigerBeetle never sends it) is not echoed:
the backend closes the connection instead, after echoing the frames before
it. The churn of ``tigertunnel bench --churn`` uses it for sessions cut by
the backend. Without it every frame is echoed, whatever its command.
"""

import sys
from typing import Any

from twisted.internet.protocol import Protocol, ServerFactory

from tigertunnel.errors import FrameError
from tigertunnel.tools.tbframes import COMMAND_OFFSET
from tigertunnel.wire.implementation import ACTIVE

#: The ``command`` of a frame that makes the backend close the connection.
HANG_UP = 0


class EchoProtocol(Protocol):
    """Echo each complete TB frame back to the sender, unchanged.

    :param hang_up: close the connection at a :data:`HANG_UP` frame.
    """

    def __init__(self, hang_up: bool = False) -> None:
        self._parser = ACTIVE.FrameParser()
        self._hang_up = hang_up
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
        if self._hang_up:
            for i, frame in enumerate(frames):
                if frame[COMMAND_OFFSET] == HANG_UP:
                    frames = frames[:i]
                    transport.loseConnection()
                    break
        if frames:
            self.frames += len(frames)
            transport.writeSequence(frames)


class EchoFactory(ServerFactory):
    """Factory of :class:`EchoProtocol`; counts connections."""

    protocol = EchoProtocol
    noisy = False

    def __init__(self, hang_up: bool = False) -> None:
        self.connections = 0
        self.hang_up = hang_up

    def buildProtocol(self, addr: Any) -> EchoProtocol:
        self.connections += 1
        return EchoProtocol(self.hang_up)


def serve(port: int, hang_up: bool = False) -> int:
    """Run an echo backend on 127.0.0.1:``port`` until SIGTERM or SIGINT.

    :param hang_up: close a connection at a :data:`HANG_UP` frame.

    :returns: 0 once stopped; 1 after one line on stderr when the port
        cannot be bound (nothing runs then).
    """
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError

    from tigertunnel.config.model import LISTEN_BACKLOG
    from tigertunnel.net.listeners import listen_error
    from tigertunnel.ops.memory import tune_malloc

    tune_malloc()
    try:
        reactor.listenTCP(port, EchoFactory(hang_up), backlog=LISTEN_BACKLOG,
                          interface="127.0.0.1")
    except CannotListenError as e:
        sys.stderr.write(f"tigertunnel: error: echo: "
                         f"{listen_error(f'127.0.0.1:{port}', e)}\n")
        return 1
    reactor.run()
    return 0


def main(argv: "list[str] | None" = None) -> int:
    """``python -m tigertunnel.tools.echo [--hang-up] PORT``: :func:`serve` (``tigertunnel echo``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    hang_up = "--hang-up" in args
    if hang_up:
        args.remove("--hang-up")
    if len(args) != 1 or not args[0].isdigit() or not 1 <= int(args[0]) <= 65535:
        sys.stderr.write("usage: tigertunnel echo [--hang-up] PORT (1 to 65535)\n")
        return 2
    return serve(int(args[0]), hang_up)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
