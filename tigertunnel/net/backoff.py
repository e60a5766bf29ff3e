"""Retry delays: exponential backoff with jitter (PROTOCOL.md section 7.8)."""

import random
from typing import Callable

#: Pool connection reconnect backoff (PROTOCOL.md section 7.8).
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 10.0

def backoff_policy(rand: Callable[[], float] = random.random) -> Callable[[int], float]:
    """Return a retry policy: 100 ms, doubling, capped at 10 s, ±20 % jitter."""
    def policy(attempt: int) -> float:
        base = min(BACKOFF_INITIAL * (2.0 ** min(max(attempt - 1, 0), 20)),
                   BACKOFF_MAX)
        return base * (0.8 + 0.4 * rand())
    return policy
