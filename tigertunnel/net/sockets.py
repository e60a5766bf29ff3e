"""Socket-level helpers shared by every connection of a tunnel end.

* :func:`tune_socket`: TCP_NODELAY, TigerBeetle-like keepalive,
  TCP_USER_TIMEOUT and 1 MiB reads and sends.
* :func:`direct_sender`: write straight to the socket when nothing is
  queued.
* :func:`socket_family`: the address family of an inherited descriptor.
"""

import os
import socket
from typing import Any, Callable

from twisted.internet import tcp

from tigertunnel.net import twisted_private

#: TCP keepalive as TigerBeetle configures it: 5 s idle, 4 s interval,
#: 3 probes, so a dead peer is found within about 17 s.
KEEPALIVE = (5, 4, 3)
#: Bytes Twisted may read or send per system call on our sockets: a whole
#: maximal TB frame with its mux header.
IO_SIZE = (1 << 20) + 64
#: TCP_USER_TIMEOUT (ms): unacknowledged data for this long kills the socket.
#: It also bounds keepalive (it overrides the probe count), so it equals
#: idle + interval * probes.
USER_TIMEOUT_MS = 17_000


def tune_socket(transport: Any) -> None:
    """Set TCP_NODELAY and TigerBeetle-like TCP keepalive on a TCP transport.

    Also let Twisted read and send up to :data:`IO_SIZE` bytes per system
    call (its defaults, 64 KiB reads and 128 KiB sends, cost a 1 MiB TB frame
    16 reads and 8 sends per hop). ``bufferSize`` doubles as the write-buffer
    size above which our producers are paused.

    Transports without a socket (in-memory tests) are left alone.
    """
    if hasattr(transport, "SEND_LIMIT"):
        transport.bufferSize = IO_SIZE
        transport.SEND_LIMIT = IO_SIZE
    try:
        transport.setTcpNoDelay(True)
        transport.setTcpKeepAlive(True)
        sock = transport.getHandle()
        idle, interval, count = KEEPALIVE
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            USER_TIMEOUT_MS)
    except (AttributeError, NotImplementedError, OSError):
        pass


def direct_sender(transport: Any) -> Callable[["bytes | bytearray"], None]:
    """A function writing to ``transport`` in this reactor turn, in order.

    Twisted's ``write`` queues every chunk, joins the queue into a new
    ``bytes`` and sends it on the next reactor turn, toggling epoll write
    interest each time. For a Twisted TCP connection the returned function
    sends straight to the socket when Twisted holds nothing queued for it,
    and queues with ``write`` only what the kernel did not take (or
    everything, on an error, so that Twisted's own send finds the error and
    loses the connection as usual): order is kept, and Twisted's
    producer/consumer flow control still sees every queued byte. Other
    transports (in-memory tests) get ``write``, and so does every transport
    when :data:`~tigertunnel.net.twisted_private.DIRECT_SEND` is false.
    """
    # Reading Twisted's write queue is private to Twisted: only where
    # twisted_private found what it reads.
    if twisted_private.DIRECT_SEND and isinstance(transport, tcp.Connection):
        return twisted_private.direct_send(transport)
    write = transport.write
    return lambda data: write(bytes(data))


def not_connected(data: "bytes | bytearray") -> None:
    """The sender of a connection before it is connected: a bug if called."""
    raise RuntimeError("send before the connection was made")


def socket_family(fd: int) -> int:
    """The address family of socket ``fd`` (``AF_INET`` or ``AF_INET6``)."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return int(sock.family)
    finally:
        sock.close()
