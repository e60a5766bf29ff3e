"""Thousands of short sessions through two twistd daemons leave no descriptor, socket or session behind.
"""

import random
import time
from typing import List

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.tbpeers import Script, filler, make_frame, tb_connect
from tests.integration.tunnels import (
    DEADLINE,
    LONG,
    Daemons,
    close_wait,
    listening_backend,
    ms,
    random_size,
    record,
    session_sockets,
    steady_fd_count,
)


class ChurnTests(TestCase):
    """Many short sessions leave no descriptor and no session behind."""

    timeout = 600 if LONG else 120

    async def test_short_sessions_leave_nothing_behind(self) -> None:
        """After thousands of short sessions both tunnel processes hold the same descriptors and sessions as before."""
        total = 10_000 if LONG else 2_000
        workers = 32
        backend = listening_backend(self, Script())
        d = await Daemons(self, backend.port_number, pool_size=4).start()
        pids = d.pids
        failures: List[str] = []

        async def worker(first: int, count: int) -> None:
            rng = random.Random(first)
            for i in range(first, first + count):
                peer = await tb_connect(d.client_port)
                frames = [make_frame(filler(random_size(rng, 4096) - 256, i * 4 + j), i * 4 + j)
                          for j in range(3)]
                peer.send(*frames)
                try:
                    await peer.wait_frames(3, DEADLINE)
                except Exception as e:
                    failures.append(f"session {i}: {e}")
                if peer.digests != peer.sent:
                    failures.append(f"session {i}: echoed frames differ")
                peer.transport.loseConnection()
                await peer.wait_lost(DEADLINE)

        async def churn(count: int) -> float:
            started = time.monotonic()
            share = count // workers
            await defer.gatherResults([defer.ensureDeferred(worker(k * share, share))
                                       for k in range(workers)], consumeErrors=True)
            return time.monotonic() - started

        await churn(workers * 4)  # warm-up
        await procs.wait_until(lambda: not backend.open_connections, DEADLINE,
                               "the warm-up sessions to close")
        before = {role: await steady_fd_count(pid) for role, pid in pids.items()}
        sockets_before = session_sockets(d)
        rss_before = {role: procs.rss_kib(pid) for role, pid in pids.items()}
        elapsed = await churn(total)
        done_at = time.monotonic()
        self.assertEqual(failures, [])
        await procs.wait_until(
            lambda: all(procs.fd_count(pid) == before[role] for role, pid in pids.items()),
            15, f"descriptors back to {before} (now "
                f"{ {r: procs.fd_count(p) for r, p in pids.items()} })")
        settled = time.monotonic() - done_at
        sockets_after = session_sockets(d)
        self.assertEqual(sockets_after, sockets_before)
        self.assertEqual(sockets_after["client TB sockets"], 0)
        self.assertEqual(sockets_after["server backend sockets"], 0)
        await procs.wait_until(lambda: not backend.open_connections, DEADLINE,
                               "the backend connections to close")
        rss_after = {role: procs.rss_kib(pid) for role, pid in pids.items()}
        for role, pid in pids.items():
            self.assertEqual(close_wait(pid), [], role)
        record("churn", f"{total} sessions (connect, 3 frames echoed, close; {workers} at a "
               f"time) in {elapsed:.1f} s ({total / elapsed:.0f}/s); descriptors "
               f"before {before}, the same again {ms(settled)} after the last "
               f"session; sockets from /proc {sockets_after} (same as before); RSS "
               f"KiB before {rss_before}, after {rss_after}")
