"""The replay cache file shared by real worker processes at the same time."""

import json
import os
import subprocess
import sys
from typing import Any, Dict, List

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.ops import replay
from tigertunnel.ops.replay import FileReplayCache

#: Each child: open the cache, say "ready", wait for "go" on stdin, then
#: check_and_add its digests and print what it accepted as JSON.
CHILD = r"""
import hashlib, json, random, sys, time
from tigertunnel.ops.replay import FileReplayCache
path, seed, shared, own, max_entries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cache = FileReplayCache(path, max_entries=max_entries)
names = [("s", n) for n in range(shared)] + [("o%d" % seed, n) for n in range(own)]
random.Random(seed).shuffle(names)
print("ready", flush=True)
sys.stdin.readline()
accepted = []
now = int(time.time())
for tag, n in names:
    d = hashlib.sha256(("%s-%d" % (tag, n)).encode()).digest()
    if cache.check_and_add(d, now):
        accepted.append("%s-%d" % (tag, n))
print(json.dumps({"accepted": accepted, "io_errors": cache.io_errors,
                  "last_error": cache.last_error}), flush=True)
"""

#: Seconds a child may take in all.
TIMEOUT = 120


class SharedFileTests(SynchronousTestCase):
    """Several processes use one cache file concurrently."""

    def run_children(self, path: str, count: int, shared: int, own: int,
                     max_entries: int = 65536) -> List[Dict[str, Any]]:
        """Start ``count`` children, release them together, return their reports."""
        children = [subprocess.Popen(
            [sys.executable, "-c", CHILD, path, str(seed), str(shared), str(own),
             str(max_entries)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for seed in range(count)]
        try:
            for child in children:
                assert child.stdout is not None
                self.assertEqual(child.stdout.readline().strip(), "ready")
            reports = []
            for child in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            for child in children:
                out, _ = child.communicate(timeout=TIMEOUT)
                self.assertEqual(child.returncode, 0)
                reports.append(json.loads(out))
            return reports
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()

    def test_each_hello_accepted_once(self) -> None:
        """Four processes racing over the same 1500 hashes accept each exactly once in all."""
        path = os.path.join(self.mktemp() + ".replay")
        reports = self.run_children(path, count=4, shared=1500, own=0)
        accepted = [name for report in reports for name in report["accepted"]]
        self.assertEqual([r["io_errors"] for r in reports], [0, 0, 0, 0])
        self.assertEqual(len(accepted), 1500)
        self.assertEqual(len(set(accepted)), 1500)
        # A restarted process refuses every one of them.
        restarted = FileReplayCache(path)
        self.addCleanup(restarted.close)
        self.assertEqual(len(restarted), 1500)

    def test_compaction_under_concurrency(self) -> None:
        """With a small bound, concurrent appends and compactions leave a well-formed, bounded file."""
        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.join(directory, "tt.pid.replay")
        reports = self.run_children(path, count=3, shared=0, own=2000, max_entries=100)
        self.assertEqual([r["io_errors"] for r in reports], [0, 0, 0], reports)
        self.assertEqual([len(r["accepted"]) for r in reports], [2000, 2000, 2000])
        size = os.path.getsize(path)
        self.assertEqual((size - replay.HEADER_SIZE) % replay.RECORD_SIZE, 0)
        records = (size - replay.HEADER_SIZE) // replay.RECORD_SIZE
        self.assertLessEqual(records, replay.COMPACT_MIN_RECORDS + 3)
        self.assertEqual(os.listdir(directory), ["tt.pid.replay"])
        reloaded = FileReplayCache(path, max_entries=100)
        self.addCleanup(reloaded.close)
        self.assertEqual(len(reloaded), 100)
