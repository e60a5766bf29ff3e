"""Retry delays: exponential backoff with jitter (docs/protocol.rst §7.8)."""

import random
from typing import Callable

#: Pool connection reconnect backoff (docs/protocol.rst §7.8).
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 10.0


def exponential_delay(attempt: int, initial: float, maximum: float,
                      factor: float = 2.0) -> float:
    """The delay before try number ``attempt`` (1 for the first retry):
    ``initial``, multiplied by ``factor`` for each further try, at most
    ``maximum``. No jitter."""
    try:
        delay = initial * factor ** max(attempt - 1, 0)
    except OverflowError:
        return maximum
    return min(delay, maximum)


def backoff_policy(rand: Callable[[], float] = random.random) -> Callable[[int], float]:
    """Return a retry policy: 100 ms, doubling, capped at 10 s, ±20 % jitter."""
    def policy(attempt: int) -> float:
        base = exponential_delay(attempt, BACKOFF_INITIAL, BACKOFF_MAX)
        return base * (0.8 + 0.4 * rand())
    return policy
