"""Process tuning for the frame hot path.

TB frames reach 1 MiB. With glibc's default malloc settings every buffer of
that size is either ``mmap``-ed and ``munmap``-ed per frame or carved from a
heap top that is trimmed back after each free, so the kernel zero-fills 256
fresh pages for every frame: measured here, that made handling a 1 MiB frame
about ten times slower than the copies and the AEAD themselves. Raising
``M_MMAP_THRESHOLD`` above the largest frame and ``M_TRIM_THRESHOLD`` above a
few frames keeps those buffers in the heap and reuses them.
"""

import ctypes
import ctypes.util
from typing import Optional

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
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass
