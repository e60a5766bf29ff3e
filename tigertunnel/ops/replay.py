"""A ClientHello replay cache kept in a small file, shared by processes.

The in-memory :class:`~tigertunnel.wire.handshake.ReplayCache` forgets
everything on a restart and is private to one process, so a recorded
ClientHello is accepted again after a restart, by another worker, or by
another proxy pair with the same key. :class:`FileReplayCache` has the same
interface (``check_and_add(digest, timestamp)``, ``len()``) and keeps its
entries in one file per tunnel end: every proxy pair and every worker
process of that end opens the same file, and a new process loads it at
start. Its default place is next to the pidfile, ``<pidfile>.replay``
(:func:`default_path`).

File format (all integers little-endian)::

    header   16 bytes  b"TTREPLAY" | u32 version (1) | u32 record size (40)
    record   40 bytes  hello hash (32) | hello timestamp, u64 (8)
    ...

The hash is the ClientHello's own hash field (it travels in clear, so the
file holds nothing secret); the timestamp is the hello's, in Unix seconds.
A hello is only accepted within ±3600 s of its timestamp, so a record whose
timestamp is more than 3600 s in the past can be dropped.

Concurrency. Every lookup-and-append happens under an exclusive ``flock``
of the file: read the records other processes appended since we last
looked, check, append ours with one ``pwrite``. When dead records make up
more than half of the file (and there are at least
:data:`COMPACT_MIN_RECORDS`), the process holding the lock writes the live
records to a new file and renames it over the old one; the others notice
(the path no longer names the inode they locked), reopen and reload.
At most ``max_entries`` records are live; past that the oldest are dropped
(as the in-memory cache does), so the file stays below
``16 + 80 * max_entries`` bytes (5 MiB with the default 65536).

Damage and failures, decided so that a problem is seen and nothing unsafe
is done silently:

* a missing or empty file is created (mode 0600) with its header;
* a file whose header is not ours (another program's file, a wrong path)
  is refused with :class:`~tigertunnel.errors.ReplayCacheError`, one line
  naming the path: it is never overwritten;
* a file owned by another user, or not a regular file (a symlink is not
  followed), is refused; group or other permission bits are removed;
* a partial record at the end (a process killed in the middle of an
  append) is cut off: the hello it was recording was never answered;
* an I/O error after start (disk full, EIO) does not stop handshakes: the
  entry is kept in this process's memory (so this process still refuses
  the replay), :attr:`FileReplayCache.io_errors` counts it and
  :attr:`FileReplayCache.last_error` says what happened, for the caller to
  log.

Appends are not fsynced by default: a killed process loses nothing (the
data is in the kernel's page cache), only a machine crash within seconds of
a handshake can lose its record.

A tunnel server uses the file through :class:`ReplayCacheService`, one per
tunnel end, which every proxy pair's handshakes share. It opens the file in
``startService``, that is after ``twistd -u/-g`` has dropped privileges, so
the file belongs to the user the tunnel runs as and worker processes
(started as that user) can open it too. Where the file is
(:func:`replay_path`): ``--replay-file`` if given; else next to twistd's
pidfile; else (the console script, or ``twistd --pidfile=``) nowhere: the
cache is kept in memory, per process.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
from collections import deque
from types import TracebackType
from typing import Callable, Deque, Dict, Optional, Tuple, Type, Union

from twisted.application.service import Service

from tigertunnel.errors import ReplayCacheError
from tigertunnel.logs import LogRateLimit, logger
from tigertunnel.wire.handshake import ReplayCache

__all__ = ["FileReplayCache", "ReplayCacheService", "default_path",
           "replay_path", "MAGIC", "HEADER_SIZE", "RECORD_SIZE",
           "COMPACT_MIN_RECORDS", "TIMESTAMP_TOLERANCE"]

MAGIC = b"TTREPLAY"
VERSION = 1
DIGEST_SIZE = 32
RECORD_SIZE = DIGEST_SIZE + 8
_HEADER = struct.Struct("<8sII")
HEADER_SIZE = _HEADER.size
_RECORD = struct.Struct("<32sQ")
#: Never compact a file with fewer records than this.
COMPACT_MIN_RECORDS = 1024
#: PROTOCOL.md section 3.3: a hello is accepted within this many seconds.
TIMESTAMP_TOLERANCE = 3600
_MAX_U64 = (1 << 64) - 1


def default_path(pidfile: str) -> str:
    """Return where a tunnel end with this pidfile keeps its replay cache."""
    return pidfile + ".replay"


#: ``--replay-file`` values that mean "keep the cache in memory only".
IN_MEMORY = ("", "memory")


def replay_path(option: Optional[str], pidfile: Optional[str]) -> Optional[str]:
    """Where a tunnel server keeps its replay cache (absolute), or ``None``
    for memory only.

    :param option: the ``--replay-file`` value, ``None`` when not given;
        ``""`` or ``"memory"`` ask for memory only.
    :param pidfile: twistd's ``--pidfile`` (``None`` or ``""`` when there is
        none, as for the console script).
    """
    if option is not None:
        return None if option in IN_MEMORY else os.path.abspath(option)
    if pidfile:
        return default_path(os.path.abspath(pidfile))
    return None


class _Locked:
    """Context manager: hold the cache's file lock (see :meth:`FileReplayCache._lock`)."""

    def __init__(self, cache: "FileReplayCache") -> None:
        self._cache = cache

    def __enter__(self) -> int:
        return self._cache._lock()

    def __exit__(self, kind: Optional[Type[BaseException]],
                 value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self._cache._unlock()


class FileReplayCache:
    """Remembers authenticated ClientHellos in a file shared by processes.

    :ivar path: the cache file.
    :ivar io_errors: I/O errors met after start (each handled in memory).
    :ivar last_error: the last of them, as one line, or ``None``.
    """

    def __init__(self, path: str, max_entries: int = 65536,
                 now: Callable[[], float] = time.time,
                 fsync: bool = False) -> None:
        """Open (or create) ``path`` and load its live entries.

        :param max_entries: live entries kept at most (oldest dropped).
        :param now: wall-clock seconds (hello timestamps are wall clock).
        :param fsync: ``fsync`` after every append (survives a machine
            crash, costs a disk flush per handshake).
        :raises ReplayCacheError: the file cannot be opened, is not a
            regular file owned by this user, or is not a replay cache.
        :raises ValueError: ``max_entries`` below 1.
        """
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries!r}")
        self.path = path
        self._max = max_entries
        self._now = now
        self._fsync = fsync
        self._seen: Dict[bytes, int] = {}
        self._order: Deque[Tuple[int, bytes]] = deque()
        self._fd = -1
        self._ino: Tuple[int, int] = (0, 0)
        self._offset = 0  # end of the records this instance has read
        self.io_errors = 0
        self.last_error: Optional[str] = None
        try:
            self._open()
            with _Locked(self):
                self._sync()
        except OSError as e:
            self.close()
            raise ReplayCacheError(f"{path}: cannot use replay cache: "
                                   f"{e.strerror or e}") from None
        except ReplayCacheError:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<FileReplayCache {self.path!r} entries={len(self._seen)}>"

    def __len__(self) -> int:
        """The number of live entries this instance knows of."""
        return len(self._seen)

    def close(self) -> None:
        """Close the file (the instance must not be used afterwards)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- the interface of wire.handshake.ReplayCache -------------------------

    def check_and_add(self, digest: bytes, timestamp: int) -> bool:
        """Record a hello by its hash; return ``False`` if any process saw it before.

        :param digest: the 32-byte ClientHello hash.
        :param timestamp: the hello's timestamp (Unix seconds).
        :raises ValueError: a digest that is not 32 bytes or a timestamp
            outside u64.
        """
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"hello hash must be {DIGEST_SIZE} bytes, got {len(digest)}")
        if not 0 <= timestamp <= _MAX_U64:
            raise ValueError(f"timestamp {timestamp} is not a u64")
        digest = bytes(digest)
        added = False
        try:
            with _Locked(self):
                self._sync()
                if not self._remember(digest, timestamp):
                    return False
                added = True
                self._append(digest, timestamp)
                self._maybe_compact()
            return True
        except (OSError, ReplayCacheError) as e:
            # Keep working from memory; the caller logs last_error.
            self.io_errors += 1
            self.last_error = f"{self.path}: {getattr(e, 'strerror', None) or e}"
            return added or self._remember(digest, timestamp)

    # -- memory ---------------------------------------------------------------

    def _expire(self) -> None:
        horizon = int(self._now()) - TIMESTAMP_TOLERANCE - 1
        order, seen = self._order, self._seen
        while order and (order[0][0] < horizon or len(seen) > self._max):
            ts, old = order.popleft()
            if seen.get(old) == ts:
                del seen[old]

    def _remember(self, digest: bytes, timestamp: int) -> bool:
        """Add to memory; ``False`` if already there."""
        self._expire()
        if digest in self._seen:
            return False
        self._seen[digest] = timestamp
        self._order.append((timestamp, digest))
        if len(self._seen) > self._max:
            self._expire()
        return True

    def _reset_memory(self) -> None:
        self._seen.clear()
        self._order.clear()
        self._offset = 0

    # -- the file -------------------------------------------------------------

    def _open(self) -> None:
        """Open or create the file and check what it is."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ReplayCacheError(f"{self.path}: replay cache is not a regular file")
            if st.st_uid != os.geteuid():
                raise ReplayCacheError(
                    f"{self.path}: replay cache is owned by uid {st.st_uid}, "
                    f"not by this process (uid {os.geteuid()})")
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._ino = (st.st_dev, st.st_ino)

    def _lock(self) -> int:
        """Lock the file that ``path`` names now; reopen it if it was replaced."""
        while True:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                st = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self._ino:
                return self._fd
            # Compacted (renamed over) or removed by someone else: start over
            # on the file the path names now.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._open()
            self._reset_memory()

    def _unlock(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sync(self) -> None:
        """Read the records appended since we last looked (lock held)."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            os.pwrite(self._fd, _HEADER.pack(MAGIC, VERSION, RECORD_SIZE), 0)
            self._reset_memory()
            self._offset = HEADER_SIZE
            return
        if self._offset == 0 or size < self._offset:
            self._reset_memory()
            self._check_header(os.pread(self._fd, HEADER_SIZE, 0))
            self._offset = HEADER_SIZE
        tail = (size - HEADER_SIZE) % RECORD_SIZE
        if tail:
            # A process died in the middle of an append.
            size -= tail
            os.ftruncate(self._fd, size)
        if size > self._offset:
            data = os.pread(self._fd, size - self._offset, self._offset)
            for digest, timestamp in _RECORD.iter_unpack(data):
                self._remember(digest, timestamp)
            self._offset = size
        self._expire()

    def _check_header(self, header: bytes) -> None:
        if len(header) < HEADER_SIZE:
            raise ReplayCacheError(
                f"{self.path}: not a tigertunnel replay cache (file too short); "
                f"move it away or use another path")
        magic, version, record = _HEADER.unpack(header)
        if magic != MAGIC:
            raise ReplayCacheError(
                f"{self.path}: not a tigertunnel replay cache (bad header); "
                f"move it away or use another path")
        if version != VERSION or record != RECORD_SIZE:
            raise ReplayCacheError(
                f"{self.path}: replay cache version {version} (record size {record}) "
                f"is not {VERSION} ({RECORD_SIZE}); move it away or use another path")

    def _append(self, digest: bytes, timestamp: int) -> None:
        os.pwrite(self._fd, _RECORD.pack(digest, timestamp), self._offset)
        self._offset += RECORD_SIZE
        if self._fsync:
            os.fsync(self._fd)

    def records_in_file(self) -> int:
        """How many records the file holds as far as this instance has read."""
        return max(0, (self._offset - HEADER_SIZE) // RECORD_SIZE)

    def _maybe_compact(self) -> None:
        records = self.records_in_file()
        if records < COMPACT_MIN_RECORDS or records <= 2 * len(self._seen):
            return
        self._compact()

    def _compact(self) -> None:
        """Replace the file by one holding only the live records (lock held)."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        flags = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | os.O_CLOEXEC)
        try:
            os.unlink(tmp)  # left over by a killed process with our pid
        except FileNotFoundError:
            pass
        fd = os.open(tmp, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            live = [(ts, d) for ts, d in self._order if self._seen.get(d) == ts]
            body = b"".join(_RECORD.pack(d, ts) for ts, d in live)
            os.write(fd, _HEADER.pack(MAGIC, VERSION, RECORD_SIZE) + body)
            os.fsync(fd)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        old, self._fd = self._fd, fd
        os.close(old)  # releases the old lock; waiters will see the new inode
        st = os.fstat(fd)
        self._ino = (st.st_dev, st.st_ino)
        self._order = deque(live)
        self._offset = HEADER_SIZE + RECORD_SIZE * len(live)


log = logger(__name__)

#: Minimum seconds between two log lines about replay-file I/O errors.
IO_ERROR_LOG_INTERVAL = 60.0


class ReplayCacheService(Service):
    """The replay cache of a tunnel server, shared by all its proxy pairs.

    Until :meth:`startService` (and always when ``path`` is ``None``) the
    hellos are kept in memory; once started, in the :class:`FileReplayCache`
    at ``path``, which every worker process of the tunnel end opens too.

    :param path: the cache file, or ``None`` for memory only.
    :param now: wall-clock seconds (hello timestamps are wall clock).
    """

    def __init__(self, path: Optional[str],
                 now: Callable[[], float] = time.time) -> None:
        self.path = path
        self._now = now
        self.cache: Union[ReplayCache, FileReplayCache] = ReplayCache(now=now)
        self._io_errors = 0
        self._io_log = LogRateLimit(IO_ERROR_LOG_INTERVAL)

    def __len__(self) -> int:
        return len(self.cache)

    def startService(self) -> None:
        """Open the file (after twistd dropped privileges).

        :raises ReplayCacheError: it cannot be used (one line naming it).
        """
        if self.path is not None:
            self.cache = FileReplayCache(self.path, now=self._now)
            log.info("replay cache: {path} ({count} hellos remembered)",
                     path=self.path, count=len(self.cache))
        else:
            log.info("replay cache: in memory only (no --pidfile or "
                     "--replay-file): a ClientHello replayed after a restart "
                     "or to another worker is not recognised")
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        cache = self.cache
        if isinstance(cache, FileReplayCache):
            cache.close()
            self.cache = ReplayCache(now=self._now)

    def check_and_add(self, digest: bytes, timestamp: int) -> bool:
        """Record a hello by its hash; return ``False`` if it was seen before
        (by any process using the file)."""
        cache = self.cache
        fresh = cache.check_and_add(digest, timestamp)
        if isinstance(cache, FileReplayCache) and cache.io_errors != self._io_errors:
            self._io_errors = cache.io_errors
            held = self._io_log.allow(time.monotonic())
            if held is not None:
                log.warn("replay cache {path}: {error}; remembering hellos in "
                         "this process only until it works again ({count} "
                         "errors so far)", path=self.path,
                         error=cache.last_error, count=cache.io_errors)
        return fresh
