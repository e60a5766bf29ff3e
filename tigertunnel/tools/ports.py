"""Free loopback ports for the demo, the benchmark and the tests.

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, the
same range it picks local ports of outgoing connections from.  Between choosing
such a port and a daemon binding it, any outgoing connection on the machine can
take it, and the daemon then fails to start with "Address already in use".  So
the ports returned here come from below the ephemeral range, where only
explicit binds land; each is checked by binding it.
"""

import errno
import random
import socket
from typing import List, Tuple

#: Lowest port handed out: above the well-known and the commonly configured ones.
LOWEST = 10000
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_range(path: str = EPHEMERAL_RANGE_FILE) -> Tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default when it cannot be read)."""
    try:
        with open(path) as f:
            low, high = (int(field) for field in f.read().split()[:2])
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def candidate_range(ephemeral: Tuple[int, int]) -> Tuple[int, int]:
    """The ports outside ``ephemeral`` to pick from, as ``[low, high)``."""
    low, high = ephemeral
    if low - LOWEST >= 1000:
        return LOWEST, low
    return high + 1, 65536  # the ephemeral range starts low: use the ports above it


def free_ports(count: int, host: str = "127.0.0.1",
               rng: "random.Random | None" = None) -> List[int]:
    """``count`` distinct TCP ports on ``host`` that were free a moment ago.

    They are held all at once while checked, so they differ from each other.
    """
    rng = rng or random.SystemRandom()
    low, high = candidate_range(ephemeral_range())
    held: List[socket.socket] = []
    try:
        for _ in range(200 * count):
            if len(held) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, rng.randrange(low, high)))
            except OSError as e:
                s.close()
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            held.append(s)
        else:
            if len(held) < count:
                raise OSError(errno.EADDRINUSE,
                              f"no {count} free ports in {low}-{high - 1} on {host}")
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port on ``host`` that was free a moment ago."""
    return free_ports(1, host)[0]
