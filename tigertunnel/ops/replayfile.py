"""The replay table in a file or in shared memory, used by every process of a tunnel end.

:class:`FileReplayCache` keeps a :class:`~tigertunnel.wire.replaywindow.ReplayTable`
(the window rule, the buckets, the verdicts) in a file that every worker of
the tunnel end opens and a restarted server finds again (``--replay-file``,
``<pidfile>.replay``), or in shared memory (a ``memfd``,
:func:`create_shared_memory`) that worker 0 hands to its workers, each
process opening it through its descriptor (:meth:`FileReplayCache.from_descriptor`).
The layout is the replay window's (:func:`~tigertunnel.wire.replaywindow.pack_header`);
the hash is the ClientHello's own (sent in clear: the file holds no secret). A new file is made (mode 0600) at its full size with
``posix_fallocate``, so a record written later needs no new disk block. A
file of the previous layout (version 1, an append log) is converted at
start, keeping its unexpired hellos.

I/O per hello, on the reactor thread: ``flock``, one ``stat`` of the path,
one ``pread`` of the hash's bucket (1,280 bytes) and, for a fresh hello, one
``pwrite`` of 40 bytes: page-cache operations only. There is no ``fsync``,
no compaction and no rewrite (a slot is reused in place once its hello
expires), so no process holds the lock longer than these calls, except once
after the file was deleted (a 10 MiB copy). A process waits at most
:data:`LOCK_WAIT` for the lock (its holder may be off the CPU on a loaded
machine); past that the hello is refused. A killed process loses nothing; a
machine crash can lose the records of the last seconds.

When something is wrong, nothing unexpired is forgotten and nothing unsafe
is done silently:

* a full bucket, an I/O error (disk error, a file cut short in place) or a
  lock held too long: the hello is refused
  (:attr:`~tigertunnel.wire.replaywindow.Verdict.FULL`,
  :attr:`~tigertunnel.wire.replaywindow.Verdict.FAILED`;
  ``FileReplayCache.io_errors`` and ``last_error`` say why);
* the file deleted (or emptied by replacing it) while running: the open
  descriptor still holds every record; the next process to take the lock
  writes a copy at the path (never over a file that appeared there) and the
  others move to it, so a restart finds them too. If the copy cannot be
  made, the processes keep using the open descriptor and try again at the
  next hello. ``FileReplayCache.notice`` is told either way;
* the path replaced by another replay file: the processes move to it; by
  a file that is not one: hellos are refused until it is removed;
* at start, a file whose header is not ours, owned by another user, or not
  a regular file (a symlink is not followed) is refused with
  :class:`~tigertunnel.errors.ReplayCacheError`, one line naming the path;
  group or other permission bits are removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from typing import Callable, Optional, Tuple

from tigertunnel.errors import ReplayCacheError
from tigertunnel.wire.handshake import TIMESTAMP_TOLERANCE
from tigertunnel.wire.replaywindow import (
    DEFAULT_BUCKETS,
    DEFAULT_SLOTS,
    HEADER_SIZE,
    RECORD,
    RECORD_SIZE,
    VERSION_1_HEADER,
    MemoryBuckets,
    ReplayTable,
    Verdict,
    is_version_1,
    oldest_live,
    pack_header,
    parse_header,
    table_size,
)

__all__ = ["FileReplayCache", "create_shared_memory", "lock_within",
           "LOCK_WAIT", "OPEN_WAIT"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: Seconds a process waits for another to release the table's lock before
#: it refuses the hello: what another process can cost this reactor at most.
LOCK_WAIT = 0.02
#: Seconds a process opening the file at start waits for the lock.
OPEN_WAIT = 10.0
#: Seconds between two attempts to write a deleted file again at its path.
REWRITE_RETRY = 10.0


def lock_within(fd: int, seconds: float) -> None:
    """Take the exclusive ``flock`` of ``fd``, waiting at most ``seconds``.

    :raises OSError: another process held it all that time.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise OSError(errno.EWOULDBLOCK, f"locked by another process for "
                              f"more than {seconds * 1000:.0f} ms") from None
            time.sleep(0.0005)


def create_shared_memory(buckets: int = DEFAULT_BUCKETS,
                         slots: int = DEFAULT_SLOTS) -> int:
    """Worker 0 without a replay file: an empty table in a new memfd.

    :returns: the memfd (close-on-exec; handed to the workers, and opened by
        every process with :meth:`FileReplayCache.from_descriptor`).
    :raises OSError: the memfd cannot be made.
    """
    fd = os.memfd_create("tigertunnel-replay-cache", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, table_size(buckets, slots))
        os.pwrite(fd, pack_header(buckets, slots), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _FileBuckets:
    """The buckets of a replay table, read and written by offset in a file."""

    def __init__(self, cache: "FileReplayCache") -> None:
        self.cache = cache

    def read_bucket(self, index: int) -> bytes:
        size = self.cache.slots * RECORD_SIZE
        data = os.pread(self.cache.fd, size, HEADER_SIZE + index * size)
        if len(data) != size:
            raise OSError(0, "the file is shorter than its table (cut short "
                             "by another program?)")
        return data

    def write_record(self, index: int, slot: int, record: bytes) -> None:
        size = self.cache.slots * RECORD_SIZE
        offset = HEADER_SIZE + index * size + slot * RECORD_SIZE
        if os.pwrite(self.cache.fd, record, offset) != len(record):
            raise OSError(0, "short write")


class FileReplayCache:
    """Remembers authenticated ClientHellos in a table shared by processes.

    :ivar path: the cache file (``None`` for shared memory).
    :ivar name: the file, or a description of the shared memory, for logs.
    :ivar fd: the descriptor this instance locks, reads and writes.
    :ivar io_errors: hellos refused because of an I/O error.
    :ivar last_error: the last of those errors, as one line, or ``None``.
    :ivar notice: told (one line) when the file was deleted or replaced
        under the running processes, and what was done about it.
    """

    def __init__(self, path: str, buckets: int = DEFAULT_BUCKETS,
                 slots: int = DEFAULT_SLOTS, now: Callable[[], float] = time.time,
                 notice: Callable[[str], None] = lambda text: None,
                 lock_wait: float = LOCK_WAIT) -> None:
        """Open (or create) the file at ``path``.

        :param buckets: buckets of a new file (an existing file keeps its own).
        :param slots: slots per bucket of a new file.
        :param now: wall-clock seconds (hello timestamps are wall clock).
        :param lock_wait: seconds to wait for another process's lock before
            refusing a hello.
        :raises ReplayCacheError: the file cannot be opened or made, is not
            a regular file owned by this user, or is not a replay cache.
        :raises ValueError: a shape below one bucket of one slot.
        """
        self._setup(path, path, buckets, slots, now, notice, lock_wait)
        try:
            self._open_path(create=True, wait=OPEN_WAIT)
        except OSError as e:
            self.close()
            raise ReplayCacheError(f"{path}: cannot use replay cache: "
                                   f"{e.strerror or e}") from None
        except ReplayCacheError:
            self.close()
            raise

    @classmethod
    def from_descriptor(cls, fd: int, now: Callable[[], float] = time.time,
                        lock_wait: float = LOCK_WAIT) -> "FileReplayCache":
        """Open the shared-memory table worker 0 made
        (:func:`create_shared_memory`) through the descriptor ``fd``.

        The table is opened anew (``/proc/self/fd``) so that this process's
        lock is its own: a lock on an inherited descriptor would be shared
        with every process that inherited it.

        :raises ReplayCacheError: ``fd`` is not open or holds no replay table.
        """
        self = cls.__new__(cls)
        self._setup(None, f"shared memory (descriptor {fd})", 1, 1, now,
                    lambda text: None, lock_wait)
        try:
            self.fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
            self._use_shape(*self._check_header(self.fd, os.fstat(self.fd).st_size))
        except OSError as e:
            self.close()
            raise ReplayCacheError(f"replay cache in inherited descriptor {fd}: "
                                   f"{e.strerror or e}") from None
        except ReplayCacheError:
            self.close()
            raise
        return self

    def _setup(self, path: Optional[str], name: str, buckets: int, slots: int,
               now: Callable[[], float], notice: Callable[[str], None],
               lock_wait: float) -> None:
        if buckets < 1 or slots < 1:
            raise ValueError(f"a replay table needs at least one bucket and one "
                             f"slot, not {buckets} x {slots}")
        self.path = path
        self.name = name
        self.buckets = buckets
        self.slots = slots
        self._now = now
        self.notice = notice
        self.lock_wait = lock_wait
        self.fd = -1
        self._ino = (0, 0)
        # When to try again to write a deleted file at its path (0: no failure).
        self._rewrite_after = 0.0
        self.io_errors = 0
        self.last_error: Optional[str] = None
        self.table = ReplayTable(_FileBuckets(self), buckets, slots, TIMESTAMP_TOLERANCE)

    def __repr__(self) -> str:
        return f"<FileReplayCache {self.name!r} {self.buckets}x{self.slots}>"

    def __len__(self) -> int:
        """The number of hellos in the window, for a log line (reads the
        whole table without the lock, so a record being written may be
        missed).

        :raises OSError: the table cannot be read.
        """
        data = os.pread(self.fd, self.table.capacity * RECORD_SIZE, HEADER_SIZE)
        return self.table.live_in(data[:len(data) - len(data) % RECORD_SIZE], self._now())

    def close(self) -> None:
        """Close the file (the instance must not be used afterwards)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_and_add(self, digest: bytes, timestamp: int) -> Verdict:
        """Record a hello by its hash, for every process of the tunnel end
        (see :class:`~tigertunnel.wire.replaywindow.Verdict`).

        :raises ValueError: a hash that is not 32 bytes or a timestamp
            outside u64.
        """
        try:
            self._lock()
        except (OSError, ReplayCacheError) as e:
            return self._failed(e)
        try:
            return self.table.check_and_add(digest, timestamp, self._now())
        except OSError as e:
            return self._failed(e)
        finally:
            self._unlock()

    def _failed(self, error: Exception) -> Verdict:
        self.io_errors += 1
        self.last_error = f"{self.name}: {getattr(error, 'strerror', None) or error}"
        return Verdict.FAILED

    # -- the file -------------------------------------------------------------

    def _open_path(self, create: bool, wait: float) -> None:
        """Open the file the path names (making it if missing), check it,
        and make it this instance's (left unlocked). The descriptor in use
        is kept if the new file cannot be used."""
        assert self.path is not None
        flags = os.O_RDWR | _NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        for _ in range(16):
            fd = os.open(self.path, flags, 0o600)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise ReplayCacheError(f"{self.path}: replay cache is not a "
                                           f"regular file")
                if st.st_uid != os.geteuid():
                    raise ReplayCacheError(
                        f"{self.path}: replay cache is owned by uid {st.st_uid}, "
                        f"not by this process (uid {os.geteuid()})")
                if st.st_mode & 0o077:
                    os.fchmod(fd, 0o600)
                lock_within(fd, wait)
                named = os.stat(self.path, follow_symlinks=False)
                if (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # replaced (converted) while we waited
                    continue
                size = os.fstat(fd).st_size
                if size == 0:
                    os.posix_fallocate(fd, 0, table_size(self.buckets, self.slots))
                    os.pwrite(fd, pack_header(self.buckets, self.slots), 0)
                elif is_version_1(os.pread(fd, VERSION_1_HEADER.size, 0)):
                    fd = self._converted(fd, size)
                else:
                    self._use_shape(*self._check_header(fd, size))
            except BaseException:
                os.close(fd)
                raise
            self._adopt(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        raise OSError(0, "the file keeps being replaced")

    def _adopt(self, fd: int) -> None:
        """Make ``fd`` the descriptor in use (closing the previous one, which
        releases its lock)."""
        old, self.fd = self.fd, fd
        st = os.fstat(fd)
        self._ino = (st.st_dev, st.st_ino)
        if old >= 0 and old != fd:
            os.close(old)

    def _use_shape(self, buckets: int, slots: int) -> None:
        self.buckets, self.slots = buckets, slots
        self.table = ReplayTable(_FileBuckets(self), buckets, slots, TIMESTAMP_TOLERANCE)

    def _check_header(self, fd: int, size: int) -> Tuple[int, int]:
        """The shape (buckets, slots) of ``fd``'s table (:func:`parse_header`)."""
        return parse_header(os.pread(fd, HEADER_SIZE, 0), size, self.name)

    def _converted(self, fd: int, size: int) -> int:
        """A file of the previous layout (locked ``fd``) replaced by a table
        of its unexpired hellos; returns the new file, locked."""
        data = os.pread(fd, size - VERSION_1_HEADER.size, VERSION_1_HEADER.size)
        memory = MemoryBuckets(self.slots)
        table = ReplayTable(memory, self.buckets, self.slots, TIMESTAMP_TOLERANCE)
        now = self._now()
        oldest = oldest_live(now, TIMESTAMP_TOLERANCE)
        kept = sum(1 for digest, timestamp
                   in RECORD.iter_unpack(data[:len(data) - len(data) % RECORD_SIZE])
                   if timestamp >= oldest
                   and table.check_and_add(digest, timestamp, now) is Verdict.FRESH)
        image = bytearray(table_size(self.buckets, self.slots))
        image[:HEADER_SIZE] = pack_header(self.buckets, self.slots)
        span = self.slots * RECORD_SIZE
        for index, bucket in memory.written():
            image[HEADER_SIZE + index * span:HEADER_SIZE + (index + 1) * span] = bucket
        new = self._new_file(lambda out: _write_image(out, bytes(image)), replace=True)
        assert new is not None
        os.close(fd)
        self.notice(f"replay cache {self.path}: converted from format 1 "
                    f"({kept} unexpired hellos kept)")
        return new

    def _new_file(self, fill: Callable[[int], None], replace: bool) -> Optional[int]:
        """Write a new file at the path (``fill`` writes the whole table into
        the descriptor it is given) and return it, locked. ``replace``
        renames it over what the path names; otherwise a file that appeared
        at the path is left alone and ``None`` returned."""
        assert self.path is not None
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)  # left over by a killed process with our pid
        except FileNotFoundError:
            pass
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.posix_fallocate(fd, 0, table_size(self.buckets, self.slots))
            fill(fd)
            if replace:
                os.rename(tmp, self.path)
                return fd
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                os.unlink(tmp)
                os.close(fd)
                return None
            os.unlink(tmp)
            return fd
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _copy_into(self, out: int) -> None:
        """Copy this instance's table into ``out``."""
        total = table_size(self.buckets, self.slots)
        copied = 0
        while copied < total:
            n = os.copy_file_range(self.fd, out, total - copied, copied, copied)
            if n <= 0:
                raise OSError(0, "short copy")
            copied += n

    def _lock(self) -> None:
        """Lock the table; with a file, the one the path names now (moving
        to it if it was replaced, writing it again if it was deleted)."""
        if self.fd < 0:
            raise OSError(0, "replay cache is closed")
        for _ in range(16):
            lock_within(self.fd, self.lock_wait)
            if self.path is None:
                return
            try:
                st: Optional[os.stat_result] = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self._ino:
                return
            if st is None or (stat.S_ISREG(st.st_mode) and st.st_size == 0):
                # Deleted (or replaced by an empty file): our descriptor holds
                # every record; put a copy at the path and use it.
                if time.monotonic() < self._rewrite_after:
                    return  # failed lately: keep using the open file for now
                try:
                    new = self._new_file(self._copy_into, replace=st is not None)
                except OSError as e:
                    if not self._rewrite_after:
                        self.notice(f"replay cache {self.path} was deleted; the "
                                    f"running processes keep every hello in the "
                                    f"open file, but it cannot be written again "
                                    f"at its path: {e.strerror or e} (trying "
                                    f"again every {REWRITE_RETRY:.0f} s)")
                    self._rewrite_after = time.monotonic() + REWRITE_RETRY
                    return
                if new is not None:
                    self._adopt(new)
                    self._rewrite_after = 0.0
                    self.notice(f"replay cache {self.path} was deleted; written "
                                f"again from the open file, no hello forgotten")
                    return
            # Replaced (or written again by another process): move to it.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self._open_path(create=False, wait=self.lock_wait)
        raise OSError(0, "the file keeps being replaced")

    def _unlock(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def _write_image(fd: int, data: bytes) -> None:
    if os.pwrite(fd, data, 0) != len(data):
        raise OSError(0, "short write")
