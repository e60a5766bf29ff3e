"""A flood of silent TCP connects, run as its own process by the flood tests.

``python -m tests.integration.flooder HOST PORT SOURCE HOLD IN_FLIGHT SECONDS``
connects to ``HOST:PORT`` from ``SOURCE`` as fast as it can with
non-blocking sockets, ``IN_FLIGHT`` connects under way at a time (so the
server finds many connections waiting at each accept, as from a fast
attacker); it sends nothing, keeps the newest ``HOLD`` connections open
(closing the oldest beyond that) and stops after ``SECONDS``. A connect
not completed within 1 s is given up. It prints ``connects N`` every 100
connects and ``done N`` at the end.

It is a separate process so that the flood runs as fast as an attacker's
would, not at the pace of the test's reactor.
"""

import selectors
import socket
import sys
import time
from collections import deque
from typing import Deque, Dict, List

#: Seconds a connect may stay under way before it is given up.
CONNECT_TIMEOUT = 1.0


def flood(host: str, port: int, source: str, hold: int, in_flight: int,
          seconds: float) -> int:
    """Run the flood; return how many connects completed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held: Deque[socket.socket] = deque()
    under_way: Dict[socket.socket, float] = {}
    selector = selectors.DefaultSelector()
    deadline = time.monotonic() + seconds
    connects = 0
    while time.monotonic() < deadline:
        while len(under_way) < in_flight:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.bind((source, 0))
                sock.connect_ex((host, port))
            except OSError:
                sock.close()
                break
            under_way[sock] = time.monotonic()
            selector.register(sock, selectors.EVENT_WRITE)
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj  # type: ignore[assignment]
            selector.unregister(sock)
            del under_way[sock]
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                sock.close()
                continue
            connects += 1
            held.append(sock)
            if len(held) > hold:
                held.popleft().close()
            if connects % 100 == 0:
                print(f"connects {connects}", flush=True)
        now = time.monotonic()
        for sock, started in list(under_way.items()):
            if now - started > CONNECT_TIMEOUT:
                selector.unregister(sock)
                del under_way[sock]
                sock.close()
    for sock in list(held) + list(under_way):
        sock.close()
    return connects


def main(argv: List[str]) -> None:
    """Parse ``HOST PORT SOURCE HOLD IN_FLIGHT SECONDS`` and flood."""
    host, port, source, hold, in_flight, seconds = argv
    total = flood(host, int(port), source, int(hold), int(in_flight), float(seconds))
    print(f"done {total}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
