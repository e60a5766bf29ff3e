"""A flood of silent TCP connects, run as its own process by the flood tests.

``python -m tests.integration.flooder HOST PORT SOURCE HOLD SECONDS``
connects to ``HOST:PORT`` from ``SOURCE`` as fast as blocking sockets allow,
sends nothing, keeps the newest ``HOLD`` connections open (closing the
oldest beyond that) and stops after ``SECONDS``. It prints ``connects N``
after its first 200 connects and every 1,000 after, and ``done N`` at the
end. A connect that does not complete within 0.5 s is given up.

It is a separate process so that the flood runs as fast as an attacker's
would, not at the pace of the test's reactor.
"""

import socket
import sys
import time
from collections import deque
from typing import Deque, List


def flood(host: str, port: int, source: str, hold: int, seconds: float) -> int:
    """Run the flood; return how many connects completed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held: Deque[socket.socket] = deque()
    deadline = time.monotonic() + seconds
    connects = 0
    while time.monotonic() < deadline:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((source, 0))
            sock.settimeout(0.5)
            sock.connect((host, port))
        except OSError:
            sock.close()
            continue
        connects += 1
        held.append(sock)
        if len(held) > hold:
            held.popleft().close()
        if connects == 200 or connects % 1000 == 0:
            print(f"connects {connects}", flush=True)
    for sock in held:
        sock.close()
    return connects


def main(argv: List[str]) -> None:
    """Parse ``HOST PORT SOURCE HOLD SECONDS`` and flood."""
    host, port, source, hold, seconds = argv
    total = flood(host, int(port), source, int(hold), float(seconds))
    print(f"done {total}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
