"""Tests for :mod:`tigertunnel.ops.replay` and :mod:`tigertunnel.ops.replayfile`
(the replay table in a file or shared memory, shared by workers)."""

import errno
import fcntl
import hashlib
import os
import stat
import struct
import threading
import time
from typing import Any, List, Tuple

from hypothesis import given, settings, strategies as st
from twisted.logger import globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.errors import ReplayCacheError
from tigertunnel.ops import replay, replayfile
from tigertunnel.wire import replaywindow
from tigertunnel.ops.replay import FileReplayCache, ReplayCacheService
from tigertunnel.wire.handshake import (
    ReplayCache,
    ServerHandshake,
    build_connect_hello,
)
from tigertunnel.wire.replaywindow import RECORD_SIZE, Verdict

FRESH, REPLAYED, FULL, FAILED = (Verdict.FRESH, Verdict.REPLAYED, Verdict.FULL,
                                 Verdict.FAILED)

NOW = 1_750_000_000


def digest(n: int) -> bytes:
    """A distinct 32-byte hello hash."""
    return hashlib.sha256(n.to_bytes(8, "little")).digest()


class Clock:
    """Wall-clock seconds under the test's control."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CacheCase(SynchronousTestCase):
    """Each test gets a fresh directory and a shared fake clock."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.path = os.path.join(self.dir, "tt-server.pid.replay")
        self.clock = Clock()

    def cache(self, **kwargs: Any) -> FileReplayCache:
        """A cache on the test's file, closed at the end of the test."""
        c = FileReplayCache(self.path, now=self.clock, **kwargs)
        self.addCleanup(c.close)
        return c

    def records(self, path: str = "") -> List[bytes]:
        """The hashes recorded in the file (slots not written are left out)."""
        with open(path or self.path, "rb") as f:
            data = f.read()
        found = [data[i:i + 32] for i in range(replay.HEADER_SIZE, len(data), RECORD_SIZE)]
        return sorted(d for d in found if d != bytes(32))


class SingleInstanceTests(CacheCase):
    """One instance behaves like the in-memory ReplayCache."""

    def test_second_sight_refused(self) -> None:
        """A hash is accepted once and refused afterwards."""
        c = self.cache()
        self.assertIs(c.check_and_add(digest(1), NOW), FRESH)
        self.assertIs(c.check_and_add(digest(1), NOW), REPLAYED)
        self.assertIs(c.check_and_add(digest(2), NOW), FRESH)
        self.assertEqual(len(c), 2)

    def test_file_layout(self) -> None:
        """The file is the 32-byte header then the buckets' 40-byte records (hash, LE64 timestamp); a hash goes to the bucket its first four bytes name."""
        c = self.cache(buckets=4, slots=2)
        d = (6).to_bytes(4, "little") + bytes(range(28))
        c.check_and_add(d, NOW + 5)
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertEqual(data[:32], b"TTREPLAY" + struct.pack("<IIII", 2, 40, 2, 4) + bytes(8))
        self.assertEqual(len(data), replaywindow.table_size(4, 2))
        bucket = 6 % 4
        at = 32 + bucket * 2 * 40
        self.assertEqual(data[at:at + 40], d + struct.pack("<Q", NOW + 5))
        self.assertEqual(data[32:at] + data[at + 40:], bytes(len(data) - 72))

    def test_new_file_allocated(self) -> None:
        """A new file is made at its full size with its blocks allocated, so a later write needs no new block."""
        self.cache(buckets=64, slots=8)
        st_ = os.stat(self.path)
        self.assertEqual(st_.st_size, replaywindow.table_size(64, 8))
        self.assertGreaterEqual(st_.st_blocks * 512, st_.st_size)

    def test_mode_0600(self) -> None:
        """A new file is created with mode 0600 whatever the umask."""
        old = os.umask(0)
        try:
            self.cache()
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_loose_mode_tightened(self) -> None:
        """An existing cache readable by others is set to 0600."""
        self.cache().close()
        os.chmod(self.path, 0o666)
        self.cache()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_same_interface_as_memory_cache(self) -> None:
        """A ServerHandshake refuses a replayed hello through the file cache as through ReplayCache."""
        psk = bytes(range(32))
        hello = build_connect_hello(2, 5, psk, bytes(16), NOW)
        for cache in (ReplayCache(now=self.clock), self.cache()):
            first = ServerHandshake({5: psk}, replay_cache=cache,
                                    now=self.clock).feed(hello)
            again = ServerHandshake({5: psk}, replay_cache=cache,
                                    now=self.clock).feed(hello)
            self.assertEqual(type(first).__name__, "Accepted")
            self.assertEqual(type(again).__name__, "Rejected")
            self.assertIn("replayed", again.reason)  # type: ignore[union-attr]

    def test_bad_arguments(self) -> None:
        """A digest of the wrong size, a negative timestamp or an empty shape are programming errors."""
        c = self.cache()
        self.assertRaises(ValueError, c.check_and_add, b"short", NOW)
        self.assertRaises(ValueError, c.check_and_add, digest(1), -1)
        self.assertRaises(ValueError, FileReplayCache, self.path, 0)

    def test_default_path(self) -> None:
        """The default cache sits next to the pidfile."""
        self.assertEqual(replay.default_path("/run/tt/tt-server.pid"),
                         "/run/tt/tt-server.pid.replay")

    @settings(max_examples=40)
    @given(st.lists(st.tuples(st.integers(0, 12), st.integers(-3700, 0),
                              st.integers(0, 1200)), max_size=60))
    def test_file_and_memory_agree(self, events: List[Tuple[int, int, int]]) -> None:
        """The file cache and the in-memory cache run one window implementation: the same verdicts, FULL included, for any events."""
        path = os.path.join(self.dir, f"m{len(os.listdir(self.dir))}.replay")
        clock = Clock()
        memory = ReplayCache(buckets=2, slots=3, now=clock)
        disk = FileReplayCache(path, buckets=2, slots=3, now=clock)
        try:
            for n, offset, advance in events:
                clock.now += advance
                stamp = int(clock.now) + offset
                self.assertIs(disk.check_and_add(digest(n), stamp),
                              memory.check_and_add(digest(n), stamp))
            self.assertEqual(len(disk), len(memory))
        finally:
            disk.close()


class SharingTests(CacheCase):
    """Two instances on one file stand for two workers; a new instance for a restart."""

    def test_two_workers(self) -> None:
        """A hello seen by one worker is refused by the other, both ways."""
        a, b = self.cache(), self.cache()
        self.assertIs(a.check_and_add(digest(1), NOW), FRESH)
        self.assertIs(b.check_and_add(digest(1), NOW), REPLAYED)
        self.assertIs(b.check_and_add(digest(2), NOW), FRESH)
        self.assertIs(a.check_and_add(digest(2), NOW), REPLAYED)
        self.assertEqual(self.records(), sorted([digest(1), digest(2)]))

    def test_replay_refused_after_restart(self) -> None:
        """After the process is gone, a new instance opens the file and refuses the replay."""
        a = self.cache()
        for n in range(10):
            a.check_and_add(digest(n), NOW)
        a.close()
        restarted = self.cache()
        self.assertEqual(len(restarted), 10)
        for n in range(10):
            self.assertIs(restarted.check_and_add(digest(n), NOW), REPLAYED)
        self.assertIs(restarted.check_and_add(digest(10), NOW), FRESH)

    def test_expired_entries_dropped(self) -> None:
        """Entries whose timestamp left the ±3600 s window are forgotten."""
        a = self.cache()
        a.check_and_add(digest(1), NOW - 3000)
        a.check_and_add(digest(2), NOW)
        self.clock.now = NOW + 700
        self.assertEqual(len(self.cache()), 1)
        a.check_and_add(digest(3), NOW + 700)
        self.assertEqual(len(a), 2)

    def test_no_rewrite_and_no_fsync(self) -> None:
        """However many hellos expire, the hot path never fsyncs, renames, truncates or grows the file: expired slots are reused in place."""
        a, b = self.cache(buckets=64, slots=16), self.cache()
        size = os.path.getsize(self.path)

        def forbidden(*args: object) -> None:
            raise AssertionError("file rewritten or synced on the hot path")

        for name in ("fsync", "fdatasync", "rename", "replace", "ftruncate"):
            self.patch(os, name, forbidden)
        n = 0
        for hour in range(6):
            self.clock.now = NOW + hour * 3700
            for _ in range(40):
                worker = (a, b)[n % 2]
                self.assertIs(worker.check_and_add(digest(n), int(self.clock.now)), FRESH)
                n += 1
        self.assertEqual(os.path.getsize(self.path), size)
        self.assertEqual(len(a), 40)

    @settings(max_examples=30)
    @given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30)), max_size=60))
    def test_three_workers_agree(self, ops: List[Tuple[int, int]]) -> None:
        """Across three instances each hash is accepted exactly once, whatever the interleaving."""
        path = os.path.join(self.dir, f"p{len(os.listdir(self.dir))}.replay")
        caches = [FileReplayCache(path, now=self.clock, buckets=8, slots=8)
                  for _ in range(3)]
        try:
            accepted: List[int] = []
            for worker, n in ops:
                if caches[worker].check_and_add(digest(n), NOW) is FRESH:
                    accepted.append(n)
            self.assertEqual(sorted(accepted), sorted(set(n for _, n in ops)))
        finally:
            for c in caches:
                c.close()


class FailClosedTests(CacheCase):
    """A hello the table cannot record is refused, in every process and after a restart."""

    def test_full_refuses_and_forgets_nothing(self) -> None:
        """A full file refuses new hellos (FULL) and keeps refusing the recorded ones, for another worker and after a restart too."""
        a, b = self.cache(buckets=1, slots=4), self.cache()
        for n in range(4):
            self.assertIs(a.check_and_add(digest(n), NOW), FRESH)
        self.assertIs(b.check_and_add(digest(4), NOW), FULL)
        self.assertIs(a.check_and_add(digest(5), NOW), FULL)
        a.close()
        restarted = self.cache()
        self.assertEqual((restarted.buckets, restarted.slots), (1, 4))
        for n in range(4):
            self.assertIs(restarted.check_and_add(digest(n), NOW + 3000), REPLAYED)
            self.assertIs(b.check_and_add(digest(n), NOW + 3000), REPLAYED)

    def test_write_error_fails_closed(self) -> None:
        """A write error refuses the hello (FAILED) and records it nowhere; it is counted and named."""
        a, b = self.cache(), self.cache()
        real = os.pwrite

        def failing(fd: int, data: bytes, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "pwrite", failing)
        self.assertIs(a.check_and_add(digest(1), NOW), FAILED)
        self.assertIs(a.check_and_add(digest(1), NOW), FAILED)
        self.assertEqual(a.io_errors, 2)
        self.assertIn("No space left on device", a.last_error or "")
        self.assertIn(self.path, a.last_error or "")
        self.patch(os, "pwrite", real)
        self.assertEqual(self.records(), [])
        self.assertIs(b.check_and_add(digest(1), NOW), FRESH)
        self.assertIs(a.check_and_add(digest(1), NOW), REPLAYED)

    def test_lock_error_fails_closed(self) -> None:
        """A failing lock refuses the hello too."""
        a = self.cache()

        def failing(fd: int, operation: int) -> None:
            raise OSError(errno.ENOLCK, "No locks available")

        self.patch(fcntl, "flock", failing)
        self.assertIs(a.check_and_add(digest(1), NOW), FAILED)
        self.assertIn("No locks available", a.last_error or "")

    def test_lock_wait_bounded(self) -> None:
        """A process holding the lock (another worker, off the CPU) costs this one at most LOCK_WAIT before the hello is refused: the reactor is never held for the other's whole hold."""
        a = self.cache()
        other = os.open(self.path, os.O_RDWR)
        self.addCleanup(os.close, other)
        fcntl.flock(other, fcntl.LOCK_EX)
        release = threading.Timer(2.0, fcntl.flock, (other, fcntl.LOCK_UN))
        release.start()
        self.addCleanup(release.join)
        self.addCleanup(release.cancel)
        started = time.monotonic()
        verdict = a.check_and_add(digest(1), NOW)
        waited = time.monotonic() - started
        self.assertIs(verdict, FAILED)
        self.assertLess(waited, 1.0)
        self.assertGreaterEqual(waited, replayfile.LOCK_WAIT)
        self.assertIn("locked by another process for more than 20 ms", a.last_error or "")
        fcntl.flock(other, fcntl.LOCK_UN)
        self.assertIs(a.check_and_add(digest(1), NOW), FRESH)

    def test_file_cut_short_fails_closed(self) -> None:
        """A file cut short in place by another program refuses hellos (its records are gone)."""
        a = self.cache(buckets=4, slots=2)
        with open(self.path, "r+b") as f:
            f.truncate(40)
        self.assertIs(a.check_and_add(digest(1), NOW), FAILED)
        self.assertIn("shorter than its table", a.last_error or "")


class DeletionTests(CacheCase):
    """The file deleted or replaced under the running processes."""

    def test_deleted_file_forgets_nothing(self) -> None:
        """Deleted while running, the file is written again from the open descriptor: the hellos recorded before are still refused, by both workers and after a restart."""
        notices: List[str] = []
        a = self.cache(notice=notices.append)
        b = self.cache()
        for n in range(5):
            a.check_and_add(digest(n), NOW)
        os.unlink(self.path)
        self.assertIs(a.check_and_add(digest(0), NOW), REPLAYED)
        self.assertTrue(os.path.exists(self.path))
        self.assertEqual(len(notices), 1)
        self.assertIn("was deleted; written again", notices[0])
        self.assertIs(b.check_and_add(digest(1), NOW), REPLAYED)
        self.assertIs(b.check_and_add(digest(9), NOW), FRESH)
        self.assertIs(a.check_and_add(digest(9), NOW), REPLAYED)
        self.assertEqual(os.fstat(a.fd).st_ino, os.fstat(b.fd).st_ino)
        a.close()
        b.close()
        restarted = self.cache()
        self.assertEqual(len(restarted), 6)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual([n for n in os.listdir(self.dir) if n.endswith(".tmp")], [])

    def test_deleted_and_not_writable_again(self) -> None:
        """When the deleted file cannot be written again, the open descriptor still refuses every recorded hello, one notice says so, and the file is written once it can be."""
        notices: List[str] = []
        a = self.cache(notice=notices.append)
        a.check_and_add(digest(0), NOW)
        os.unlink(self.path)
        real = os.posix_fallocate

        def full(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "posix_fallocate", full)
        self.patch(replayfile, "REWRITE_RETRY", 0.0)
        self.assertIs(a.check_and_add(digest(0), NOW), REPLAYED)
        self.assertIs(a.check_and_add(digest(1), NOW), FRESH)
        self.assertIs(a.check_and_add(digest(1), NOW), REPLAYED)
        self.assertEqual(len(notices), 1)
        self.assertIn("cannot be written again at its path: No space left", notices[0])
        self.assertFalse(os.path.exists(self.path))
        self.patch(os, "posix_fallocate", real)
        self.assertIs(a.check_and_add(digest(2), NOW), FRESH)
        self.assertIn("written again from the open file", notices[-1])
        a.close()
        self.assertEqual(len(self.cache()), 3)

    def test_deleted_by_the_other_worker_first(self) -> None:
        """Whichever worker notices the deletion first writes the file; the other moves to it."""
        a, b = self.cache(), self.cache()
        a.check_and_add(digest(1), NOW)
        os.unlink(self.path)
        self.assertIs(b.check_and_add(digest(1), NOW), REPLAYED)
        self.assertIs(a.check_and_add(digest(2), NOW), FRESH)
        self.assertIs(b.check_and_add(digest(2), NOW), REPLAYED)
        self.assertEqual(self.records(), sorted([digest(1), digest(2)]))

    def test_replaced_by_foreign_file(self) -> None:
        """A foreign file put at the path refuses hellos (nothing is written into it); once it is removed, the open descriptor's hellos come back."""
        a = self.cache()
        a.check_and_add(digest(1), NOW)
        os.unlink(self.path)
        with open(self.path, "wb") as f:
            f.write(b"not ours\n")
        os.chmod(self.path, 0o600)
        self.assertIs(a.check_and_add(digest(2), NOW), FAILED)
        self.assertIn("not a tigertunnel replay cache", a.last_error or "")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"not ours\n")
        os.unlink(self.path)
        self.assertIs(a.check_and_add(digest(1), NOW), REPLAYED)

    def test_previous_format_converted(self) -> None:
        """A file of the previous layout (an append log) is converted at start, keeping its unexpired hellos."""
        records = [(digest(1), NOW), (digest(2), NOW - 4000), (digest(3), NOW - 100)]
        with open(self.path, "wb") as f:
            f.write(b"TTREPLAY" + struct.pack("<II", 1, 40))
            for d, t in records:
                f.write(d + struct.pack("<Q", t))
            f.write(b"torn")
        os.chmod(self.path, 0o600)
        notices: List[str] = []
        c = self.cache(notice=notices.append)
        self.assertEqual(len(c), 2)
        self.assertIn("converted from format 1 (2 unexpired hellos kept)", notices[0])
        self.assertIs(c.check_and_add(digest(1), NOW), REPLAYED)
        self.assertIs(c.check_and_add(digest(3), NOW), REPLAYED)
        self.assertIs(c.check_and_add(digest(2), NOW), FRESH)
        self.assertEqual(os.path.getsize(self.path), replaywindow.table_size(
            replaywindow.DEFAULT_BUCKETS, replaywindow.DEFAULT_SLOTS))


class SharedMemoryTests(SynchronousTestCase):
    """Without a file, the workers of a tunnel end share a table in a memfd."""

    def shared(self, buckets: int = 8, slots: int = 4) -> int:
        """A new shared table, closed at the end of the test."""
        fd = replay.create_shared_memory(buckets, slots)
        self.addCleanup(os.close, fd)
        return fd

    def open(self, fd: int) -> FileReplayCache:
        """One process's view of the shared table."""
        c = FileReplayCache.from_descriptor(fd, now=lambda: NOW)
        self.addCleanup(c.close)
        return c

    def test_shared_between_instances(self) -> None:
        """Two processes' views of the shared memory refuse each other's hellos."""
        fd = self.shared()
        a, b = self.open(fd), self.open(fd)
        self.assertIs(a.check_and_add(digest(1), NOW), FRESH)
        self.assertIs(b.check_and_add(digest(1), NOW), REPLAYED)
        self.assertEqual(len(b), 1)

    def test_own_lock(self) -> None:
        """Each view locks through its own open file, so views exclude each other (an inherited descriptor would share one lock)."""
        fd = self.shared()
        a, b = self.open(fd), self.open(fd)
        fcntl.flock(a.fd, fcntl.LOCK_EX)
        self.addCleanup(fcntl.flock, a.fd, fcntl.LOCK_UN)
        self.assertRaises(BlockingIOError, fcntl.flock, b.fd,
                          fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_full_shared_memory(self) -> None:
        """Shared memory refuses rather than forgets, like the file."""
        fd = self.shared(buckets=1, slots=2)
        a, b = self.open(fd), self.open(fd)
        a.check_and_add(digest(1), NOW)
        b.check_and_add(digest(2), NOW)
        self.assertIs(a.check_and_add(digest(3), NOW), FULL)
        self.assertIs(b.check_and_add(digest(1), NOW), REPLAYED)

    def test_not_a_table(self) -> None:
        """A descriptor that holds no replay table, or none at all, is refused with one line."""
        other = os.memfd_create("x")
        self.addCleanup(os.close, other)
        os.write(other, b"junk" * 20)
        error = self.assertRaises(ReplayCacheError, FileReplayCache.from_descriptor, other)
        self.assertIn("not a tigertunnel replay cache", str(error))
        error = self.assertRaises(ReplayCacheError, FileReplayCache.from_descriptor, 987)
        self.assertIn("inherited descriptor 987", str(error))


class ServiceTests(CacheCase):
    """ReplayCacheService: where the table is, and what it says when it refuses."""

    def service(self, path: Any = None, descriptor: Any = None) -> ReplayCacheService:
        """A started service on the test's clocks, stopped at the end."""
        self.ticks = [0.0]
        s = ReplayCacheService(path, descriptor, now=self.clock,
                               monotonic=lambda: self.ticks[0])
        s.startService()
        self.addCleanup(s.stopService)
        return s

    def test_workers_share_memory_without_file(self) -> None:
        """Without a file, two services on one shared memory (worker 0 and a worker) refuse each other's hellos."""
        fd = replay.create_shared_memory()
        self.addCleanup(os.close, fd)
        a, b = self.service(descriptor=fd), self.service(descriptor=fd)
        self.assertIs(a.check_and_add(digest(1), NOW), FRESH)
        self.assertIs(b.check_and_add(digest(1), NOW), REPLAYED)

    def test_full_logged_at_most_once_a_minute(self) -> None:
        """A full table's refusals are counted and logged as a warning at most once a minute."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        s = self.service()
        s.cache = ReplayCache(buckets=1, slots=1, now=self.clock)
        s.check_and_add(digest(0), NOW)
        for n in range(1, 6):
            self.assertIs(s.check_and_add(digest(n), NOW), FULL)
        self.ticks[0] = 61.0
        s.check_and_add(digest(9), NOW)
        lines = [e for e in observer if "is full" in e.get("log_format", "")]
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[0]["log_level"].name, "warn")
        self.assertEqual(s.refused[FULL], 6)

    def test_error_logged(self) -> None:
        """A hello refused for an I/O error is logged with the error and the path."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        s = self.service(self.path)

        def failing(fd: int, data: bytes, offset: int) -> int:
            raise OSError(errno.EIO, "Input/output error")

        self.patch(os, "pwrite", failing)
        self.assertIs(s.check_and_add(digest(1), NOW), FAILED)
        lines = [e for e in observer if "until it works again" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.assertIn("Input/output error", lines[0]["error"])
        self.assertEqual(s.refused[FAILED], 1)

    def test_deletion_logged(self) -> None:
        """The file deleted under a running service is logged once, as a warning."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        s = self.service(self.path)
        s.check_and_add(digest(1), NOW)
        os.unlink(self.path)
        self.assertIs(s.check_and_add(digest(1), NOW), REPLAYED)
        lines = [e for e in observer if "was deleted" in e.get("text", "")]
        self.assertEqual(len(lines), 1)


class DamageTests(CacheCase):
    """What happens with a damaged or foreign file."""

    def test_foreign_file_refused(self) -> None:
        """A file that is not a replay cache is refused with one line naming it, and left untouched."""
        with open(self.path, "wb") as f:
            f.write(b"12345\n")
        os.chmod(self.path, 0o600)
        error = self.assertRaises(ReplayCacheError, FileReplayCache, self.path)
        self.assertIn(self.path, str(error))
        self.assertIn("not a tigertunnel replay cache", str(error))
        self.assertNotIn("\n", str(error))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"12345\n")

    def test_other_version_refused(self) -> None:
        """A cache of another format version is refused."""
        with open(self.path, "wb") as f:
            f.write(b"TTREPLAY" + struct.pack("<IIII", 3, 40, 1, 1) + bytes(48))
        os.chmod(self.path, 0o600)
        error = self.assertRaises(ReplayCacheError, FileReplayCache, self.path)
        self.assertIn("version 3", str(error))

    def test_damaged_table_refused(self) -> None:
        """A file shorter than its header's table is refused at start."""
        with open(self.path, "wb") as f:
            f.write(b"TTREPLAY" + struct.pack("<IIII", 2, 40, 4, 4) + bytes(8 + 40))
        os.chmod(self.path, 0o600)
        error = self.assertRaises(ReplayCacheError, FileReplayCache, self.path)
        self.assertIn("damaged", str(error))

    def test_empty_file_initialised(self) -> None:
        """An empty file (created, header never written) is initialised."""
        open(self.path, "wb").close()
        os.chmod(self.path, 0o600)
        self.assertIs(self.cache().check_and_add(digest(1), NOW), FRESH)

    def test_symlink_refused(self) -> None:
        """A symlink at the cache path is not followed."""
        target = os.path.join(self.dir, "elsewhere")
        os.symlink(target, self.path)
        error = self.assertRaises(ReplayCacheError, FileReplayCache, self.path)
        self.assertIn(self.path, str(error))
        self.assertFalse(os.path.exists(target))

    def test_directory_refused(self) -> None:
        """A path that cannot be opened as a file gives a one-line ReplayCacheError."""
        os.mkdir(self.path)
        error = self.assertRaises(ReplayCacheError, FileReplayCache, self.path)
        self.assertIn(self.path, str(error))
