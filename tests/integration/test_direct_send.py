"""``net/sockets.py``'s direct sender on real TCP connections: same-turn sends, order kept, flow control intact."""

import socket
from typing import Any, List

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.tbpeers import the_reactor
from tigertunnel.net.sockets import direct_sender, not_connected


class Captured(Protocol):
    def __init__(self) -> None:
        self.made: "defer.Deferred[Any]" = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self.transport)


def read_exactly(sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
    """Read ``count`` bytes from a blocking socket (bounded by ``timeout``)."""
    sock.settimeout(timeout)
    chunks: List[bytes] = []
    got = 0
    while got < count:
        chunk = sock.recv(min(1 << 20, count - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class DirectSenderTests(TestCase):
    """Sends leave in the turn they are made, behind whatever Twisted still holds."""

    timeout = 30

    async def connect(self) -> "tuple[Any, socket.socket]":
        """A Twisted client connection and the accepted plain socket of its peer."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        proto = Captured()
        factory = ClientFactory.forProtocol(lambda: proto)
        the_reactor().connectTCP("127.0.0.1", listener.getsockname()[1], factory)
        transport = await proto.made
        self.addCleanup(transport.abortConnection)
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        return transport, peer

    async def test_sent_in_the_same_turn(self) -> None:
        """With nothing queued the bytes are in the kernel before the call returns (no reactor turn)."""
        transport, peer = await self.connect()
        send = direct_sender(transport)
        send(b"first")
        send(bytearray(b"second"))
        self.assertEqual(read_exactly(peer, 11), b"firstsecond")
        self.assertEqual(transport._tempDataLen, 0)

    async def test_queued_bytes_stay_first(self) -> None:
        """After a plain write (still queued in Twisted) a direct send queues behind it: order is kept."""
        transport, peer = await self.connect()
        send = direct_sender(transport)
        transport.write(b"queued-")
        send(b"direct")
        self.assertEqual(transport._tempDataLen, len(b"queued-direct"))
        await procs.wait_until(lambda: transport._tempDataLen == 0
                               and transport.offset == len(transport.dataBuffer), 5,
                               "Twisted to flush its queue")
        self.assertEqual(read_exactly(peer, 13), b"queued-direct")

    async def test_full_socket_queues_the_rest_in_order(self) -> None:
        """What the kernel does not take is queued (flow control sees it) and arrives after the part it took, in order."""
        transport, peer = await self.connect()
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        send = direct_sender(transport)
        blobs = [bytes([i]) * 300_000 for i in range(1, 4)]
        for blob in blobs:
            send(blob)
        self.assertGreater(transport._tempDataLen, 0)  # the kernel could not take it all
        # A blocking read in this thread would stall the reactor that flushes
        # the queue: read in a thread.
        from twisted.internet import threads
        got = await threads.deferToThread(read_exactly, peer, sum(map(len, blobs)), 20.0)
        self.assertEqual(got, b"".join(blobs))

    def test_other_transports_get_write(self) -> None:
        """An in-memory transport is written to (bytes), nothing else."""
        transport = StringTransport()
        send = direct_sender(transport)
        send(bytearray(b"abc"))
        send(b"def")
        self.assertEqual(transport.value(), b"abcdef")

    def test_not_connected_refuses(self) -> None:
        """The placeholder sender of an unconnected protocol raises (a bug, never a silent drop)."""
        self.assertRaises(RuntimeError, not_connected, b"x")
