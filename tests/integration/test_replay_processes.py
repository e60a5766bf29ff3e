"""The replay cache shared by real processes: racing on one file, and the
console script's workers without a replay file."""

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.integration import procs
from tests.integration.tbpeers import the_reactor
from tests.integration.tunnels import (
    DEADLINE,
    RawPeer,
    listening_backend,
    psk_file,
    raw_connect,
    record,
)
from tigertunnel.keys.files import load_psk_file
from tigertunnel.ops import replay
from tigertunnel.ops.replay import FileReplayCache
from tigertunnel.wire.handshake import build_connect_hello
from tigertunnel.wire.replaywindow import Verdict

#: Each child: open the cache, say "ready", wait for "go" on stdin, then
#: check_and_add its digests and print what it accepted as JSON.
CHILD = r"""
import hashlib, json, random, sys, time
from tigertunnel.ops.replay import FileReplayCache
from tigertunnel.wire.replaywindow import Verdict
path, seed, shared, own, buckets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
# A generous lock wait: these children race flat out on a loaded machine,
# and the point here is that the processes share one table (the bound on
# the wait is tested in tests/test_replay.py).
cache = FileReplayCache(path, buckets=buckets, slots=16, lock_wait=30.0)
names = [("s", n) for n in range(shared)] + [("o%d" % seed, n) for n in range(own)]
random.Random(seed).shuffle(names)
print("ready", flush=True)
sys.stdin.readline()
accepted, full = [], []
now = int(time.time())
for tag, n in names:
    d = hashlib.sha256(("%s-%d" % (tag, n)).encode()).digest()
    verdict = cache.check_and_add(d, now)
    if verdict is Verdict.FRESH:
        accepted.append("%s-%d" % (tag, n))
    elif verdict is Verdict.FULL:
        full.append("%s-%d" % (tag, n))
print(json.dumps({"accepted": accepted, "full": full, "io_errors": cache.io_errors,
                  "last_error": cache.last_error}), flush=True)
"""

#: Seconds a child may take in all.
TIMEOUT = 120


class SharedFileTests(SynchronousTestCase):
    """Several processes use one cache file concurrently."""

    def run_children(self, path: str, count: int, shared: int, own: int,
                     buckets: int = 8192) -> List[Dict[str, Any]]:
        """Start ``count`` children, release them together, return their reports."""
        children = [subprocess.Popen(
            [sys.executable, "-c", CHILD, path, str(seed), str(shared), str(own),
             str(buckets)],
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

    def test_full_table_under_concurrency(self) -> None:
        """Three processes overfilling a small table: each hello is accepted at most once, the rest are refused as FULL (never accepted twice), and the file keeps its size."""
        directory = self.mktemp()
        os.mkdir(directory)
        path = os.path.join(directory, "tt.pid.replay")
        reports = self.run_children(path, count=3, shared=600, own=200, buckets=16)
        self.assertEqual([r["io_errors"] for r in reports], [0, 0, 0], reports)
        accepted = [name for r in reports for name in r["accepted"]]
        self.assertEqual(len(accepted), len(set(accepted)))
        self.assertEqual(len(accepted), 16 * 16)  # every slot taken, none twice
        self.assertEqual(os.path.getsize(path), replay.HEADER_SIZE + 16 * 16 * 40)
        self.assertEqual(os.listdir(directory), ["tt.pid.replay"])
        reloaded = FileReplayCache(path)
        self.addCleanup(reloaded.close)
        self.assertEqual(len(reloaded), 16 * 16)


async def handshake(port: int, hello: bytes) -> Tuple[RawPeer, int]:
    """Send ``hello`` to ``port``; return the peer and the first byte of the
    reply (0 for a ServerHello, else the refusal status), waiting at most
    :data:`DEADLINE` seconds."""
    peer = await raw_connect(port)
    peer.transport.write(hello)
    await procs.wait_until(lambda: bool(peer.received) or peer.lost.called,
                           DEADLINE, "the server's answer to a hello")
    return peer, peer.received[0] if peer.received else -1


class ConsoleWorkersTests(TestCase):
    """The console script with ``--workers 2`` and no ``--replay-file``."""

    timeout = 180

    async def test_replays_refused_by_every_worker(self) -> None:
        """30 fresh hellos are each accepted once; each replayed once while its first connection is still open (so the accept board gives the replay to the other worker) is refused with status 4, by both workers."""
        backend = listening_backend(self)
        key = psk_file(procs.fresh_dir(self.mktemp()))
        key_id, psk = load_psk_file(key).first()
        port, = procs.free_ports(1)
        child = procs.spawn([procs.executable("tigertunnel"), "server", "-p",
                             f"127.0.0.1:{port},127.0.0.1:{backend.port_number}",
                             "-k", key, "--workers", "2"])
        self.addCleanup(child.kill, signal.SIGKILL, 15)
        await procs.wait_for_output(child, "[worker 1/tigertunnel.ops.replay#info] "
                                    "replay cache", 30)

        def fresh() -> bytes:
            return build_connect_hello(1, key_id, psk, os.urandom(16), int(time.time()))

        def worker_1_served() -> bool:
            return any("[worker 1/" in line and " up (key id" in line
                       for line in child.output.splitlines())

        # Until worker 1 is on the accept board, every connection goes to
        # worker 0: hold one connection and make another until worker 1
        # takes one.
        deadline = time.monotonic() + 30
        while not worker_1_served():
            self.assertLess(time.monotonic(), deadline, "worker 1 took no connection")
            held, _ = await handshake(port, fresh())
            other, _ = await handshake(port, fresh())
            await task.deferLater(the_reactor(), 0.1, lambda: None)
            for peer in (held, other):
                peer.transport.abortConnection()
        answers: List[Tuple[int, int]] = []
        for n in range(30):
            hello = fresh()
            first, accepted = await handshake(port, hello)
            again, replayed = await handshake(port, hello)
            answers.append((accepted, replayed))
            for peer in (first, again):
                peer.transport.abortConnection()
        accepted_twice = sum(1 for _, replayed in answers if replayed == 0)
        self.assertEqual([accepted for accepted, _ in answers], [0] * 30, answers)
        self.assertEqual(accepted_twice, 0, f"{accepted_twice} of 30 replays accepted")
        self.assertEqual([replayed for _, replayed in answers], [4] * 30, answers)
        lines = [line for line in child.output.splitlines()
                 if "replayed ClientHello" in line]
        self.assertTrue(any("[worker 1/" in line for line in lines), lines)
        self.assertTrue(any("[worker 1/" not in line for line in lines), lines)
        self.assertEqual(await child.kill(signal.SIGTERM, 20), 0, child.output[-2000:])
        record("replay", "console script --workers 2 without --replay-file "
                         "(shared memory): 30 fresh hellos accepted once, "
                         f"{30 - accepted_twice} of 30 replays refused")
