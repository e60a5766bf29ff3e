"""Process tuning for the frame hot path.

Two things: glibc's malloc, and Python's cyclic garbage collector.

TB frames reach 1 MiB. With glibc's default malloc settings every buffer of
that size is either ``mmap``-ed and ``munmap``-ed per frame or carved from a
heap top that is trimmed back after each free, so the kernel zero-fills 256
fresh pages for every frame: measured here, that made handling a 1 MiB frame
about ten times slower than the copies and the AEAD themselves. Raising
``M_MMAP_THRESHOLD`` above the largest frame and ``M_TRIM_THRESHOLD`` above a
few frames keeps those buffers in the heap and reuses them.

The garbage collector's full collections walk every container object the
process has, and most of them (modules, classes, the configuration, Twisted
itself) are made at start-up and live as long as the process: measured under
1 MiB frames, those walks were about 5 % of a tunnel process's CPU.
:func:`freeze_startup_heap` moves them out of the collector's sight once the
process is running (:func:`gc.freeze`); what the tunnel allocates later is
collected as before.
"""

import ctypes
import ctypes.util
import functools
import gc
from typing import Callable, Optional

from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime

#: glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Larger than any TB frame plus its framing.
MMAP_THRESHOLD = 4 << 20
#: Freed heap kept before it is returned to the kernel.
TRIM_THRESHOLD = 64 << 20

_done: Optional[bool] = None


def tune_malloc() -> bool:
    """Apply the settings once per process; ``False`` where not glibc."""
    global _done
    if _done is not None:
        return _done
    _done = False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


#: Seconds between two returns of freed heap memory to the kernel.
TRIM_INTERVAL = 30.0


def trim_memory() -> None:
    """Return freed heap memory to the kernel (``malloc_trim``), if glibc.

    With :data:`TRIM_THRESHOLD` the heap keeps what a burst of 1 MiB frames
    freed; trimming it periodically brings an idle daemon's resident memory
    back down after the burst.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, looked up once; ``None`` elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def freeze_startup_heap() -> int:
    """Collect once, then leave everything alive now out of later collections.

    Call it once the process runs (its start-up objects are made).

    :returns: how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def memory_trimmer(clock: IReactorTime) -> TimerService:
    """A service that calls :func:`trim_memory` every :data:`TRIM_INTERVAL` s."""
    service = TimerService(TRIM_INTERVAL, trim_memory)
    service.clock = clock
    return service
