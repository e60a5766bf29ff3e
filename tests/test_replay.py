"""Tests for :mod:`tigertunnel.ops.replay` (the replay cache file shared by workers)."""

import hashlib
import os
import stat
import struct
from typing import List, Tuple

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.errors import ReplayCacheError
from tigertunnel.ops import replay
from tigertunnel.ops.replay import FileReplayCache
from tigertunnel.wire.handshake import (
    ReplayCache,
    ServerHandshake,
    build_connect_hello,
)

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

    def cache(self, **kwargs: object) -> FileReplayCache:
        """A cache on the test's file, closed at the end of the test."""
        c = FileReplayCache(self.path, now=self.clock, **kwargs)  # type: ignore[arg-type]
        self.addCleanup(c.close)
        return c

    def records(self) -> List[bytes]:
        """The digests recorded in the file, in file order."""
        with open(self.path, "rb") as f:
            data = f.read()
        return [data[i:i + 32] for i in range(replay.HEADER_SIZE, len(data), replay.RECORD_SIZE)]


class SingleInstanceTests(CacheCase):
    """One instance behaves like the in-memory ReplayCache."""

    def test_second_sight_refused(self) -> None:
        """A hash is accepted once and refused afterwards."""
        c = self.cache()
        self.assertTrue(c.check_and_add(digest(1), NOW))
        self.assertFalse(c.check_and_add(digest(1), NOW))
        self.assertTrue(c.check_and_add(digest(2), NOW))
        self.assertEqual(len(c), 2)

    def test_file_layout(self) -> None:
        """The file is the 16-byte header then 40-byte records (hash, LE64 timestamp)."""
        c = self.cache()
        c.check_and_add(digest(7), NOW + 5)
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertEqual(data, b"TTREPLAY" + struct.pack("<II", 1, 40)
                         + digest(7) + struct.pack("<Q", NOW + 5))

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
            first = ServerHandshake({5: psk}, replay_cache=cache,  # type: ignore[arg-type]
                                    now=self.clock).feed(hello)
            again = ServerHandshake({5: psk}, replay_cache=cache,  # type: ignore[arg-type]
                                    now=self.clock).feed(hello)
            self.assertEqual(type(first).__name__, "Accepted")
            self.assertEqual(type(again).__name__, "Rejected")
            self.assertIn("replayed", again.reason)  # type: ignore[union-attr]

    def test_bad_arguments(self) -> None:
        """A digest of the wrong size, a negative timestamp or max_entries 0 are programming errors."""
        c = self.cache()
        self.assertRaises(ValueError, c.check_and_add, b"short", NOW)
        self.assertRaises(ValueError, c.check_and_add, digest(1), -1)
        self.assertRaises(ValueError, FileReplayCache, self.path, 0)

    def test_default_path(self) -> None:
        """The default cache sits next to the pidfile."""
        self.assertEqual(replay.default_path("/run/tt/tt-server.pid"),
                         "/run/tt/tt-server.pid.replay")


class SharingTests(CacheCase):
    """Two instances on one file stand for two workers; a new instance for a restart."""

    def test_two_workers(self) -> None:
        """A hello seen by one worker is refused by the other, both ways."""
        a, b = self.cache(), self.cache()
        self.assertTrue(a.check_and_add(digest(1), NOW))
        self.assertFalse(b.check_and_add(digest(1), NOW))
        self.assertTrue(b.check_and_add(digest(2), NOW))
        self.assertFalse(a.check_and_add(digest(2), NOW))
        self.assertEqual(self.records(), [digest(1), digest(2)])

    def test_replay_refused_after_restart(self) -> None:
        """After the process is gone, a new instance loads the file and refuses the replay."""
        a = self.cache()
        for n in range(10):
            a.check_and_add(digest(n), NOW)
        a.close()
        restarted = self.cache()
        self.assertEqual(len(restarted), 10)
        for n in range(10):
            self.assertFalse(restarted.check_and_add(digest(n), NOW))
        self.assertTrue(restarted.check_and_add(digest(10), NOW))

    def test_expired_entries_dropped(self) -> None:
        """Entries whose timestamp left the ±3600 s window are forgotten at load and later."""
        a = self.cache()
        a.check_and_add(digest(1), NOW - 3000)
        a.check_and_add(digest(2), NOW)
        self.clock.now = NOW + 700
        self.assertEqual(len(self.cache()), 1)
        a.check_and_add(digest(3), NOW + 700)
        self.assertEqual(len(a), 2)

    def test_compaction_seen_by_other_worker(self) -> None:
        """When one worker compacts the file, the other keeps refusing live hellos and adding new ones."""
        a, b = self.cache(), self.cache()
        old = replay.COMPACT_MIN_RECORDS
        for n in range(old):
            self.assertTrue(a.check_and_add(digest(n), NOW - 3500))
        self.clock.now = NOW + 200  # every record above is now expired
        live = [digest(100_000 + n) for n in range(5)]
        for d in live:
            self.assertTrue(a.check_and_add(d, NOW + 200))
        self.assertLess(len(self.records()), 10)  # compacted
        for d in live:
            self.assertFalse(b.check_and_add(d, NOW + 200))
        self.assertTrue(b.check_and_add(digest(999_999), NOW + 200))
        self.assertFalse(a.check_and_add(digest(999_999), NOW + 200))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual([n for n in os.listdir(self.dir) if n.endswith(".tmp")], [])

    def test_file_bounded_by_max_entries(self) -> None:
        """Past max_entries the oldest entries are dropped and the file stays bounded."""
        a = self.cache(max_entries=100)
        for n in range(5000):
            a.check_and_add(digest(n), NOW)
        self.assertEqual(len(a), 100)
        self.assertLessEqual(len(self.records()), max(replay.COMPACT_MIN_RECORDS, 200))
        self.assertFalse(a.check_and_add(digest(4999), NOW))
        self.assertEqual(len(self.cache(max_entries=100)), 100)

    @settings(max_examples=30)
    @given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30)), max_size=60))
    def test_three_workers_agree(self, ops: List[Tuple[int, int]]) -> None:
        """Across three instances each hash is accepted exactly once, whatever the interleaving."""
        path = os.path.join(self.dir, f"p{len(os.listdir(self.dir))}.replay")
        caches = [FileReplayCache(path, now=self.clock) for _ in range(3)]
        try:
            accepted: List[int] = []
            for worker, n in ops:
                if caches[worker].check_and_add(digest(n), NOW):
                    accepted.append(n)
            self.assertEqual(sorted(accepted), sorted(set(n for _, n in ops)))
        finally:
            for c in caches:
                c.close()


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
            f.write(b"TTREPLAY" + struct.pack("<II", 2, 40))
        os.chmod(self.path, 0o600)
        error = self.assertRaises(ReplayCacheError, FileReplayCache, self.path)
        self.assertIn("version 2", str(error))

    def test_torn_append_repaired(self) -> None:
        """A partial record at the end (a killed process) is cut off; the records before it stay."""
        a = self.cache()
        a.check_and_add(digest(1), NOW)
        a.close()
        with open(self.path, "ab") as f:
            f.write(digest(2)[:17])
        b = self.cache()
        self.assertEqual(len(b), 1)
        self.assertFalse(b.check_and_add(digest(1), NOW))
        self.assertTrue(b.check_and_add(digest(2), NOW))
        self.assertEqual(self.records(), [digest(1), digest(2)])

    def test_empty_file_initialised(self) -> None:
        """An empty file (created, header never written) is initialised."""
        open(self.path, "wb").close()
        os.chmod(self.path, 0o600)
        self.assertTrue(self.cache().check_and_add(digest(1), NOW))

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

    def test_removed_file_recreated(self) -> None:
        """If the file is deleted under a running instance, the next check recreates it and keeps working."""
        a = self.cache()
        a.check_and_add(digest(1), NOW)
        os.unlink(self.path)
        self.assertTrue(a.check_and_add(digest(2), NOW))
        self.assertEqual(self.records(), [digest(2)])

    def test_io_error_falls_back_to_memory(self) -> None:
        """A write error keeps the hello in memory, refuses its replay, and is reported."""
        a = self.cache()
        real = os.pwrite

        def failing(fd: int, data: bytes, offset: int) -> int:
            raise OSError(28, "No space left on device")

        self.patch(os, "pwrite", failing)
        self.assertTrue(a.check_and_add(digest(1), NOW))
        self.assertFalse(a.check_and_add(digest(1), NOW))
        self.assertEqual(a.io_errors, 1)
        self.assertIn("No space left on device", a.last_error or "")
        self.patch(os, "pwrite", real)
        self.assertTrue(a.check_and_add(digest(2), NOW))
