"""Thousands of short sessions through two twistd daemons leave no descriptor, socket, session or memory behind.
"""

import random
import time
from typing import Dict, List

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
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
from tigertunnel.tools.bench.churn import Churn, Relay, churn_rss
from tigertunnel.tools.echo import EchoFactory

#: What each kind of churned session must see through this tunnel.
EXPECTED = {"clean": "echoed, closed", "abandoned": "echoed, closed",
            "backend_cut": "echoed, closed by the tunnel",
            "pool_cut": "echoed, closed by the tunnel",
            "refused": "closed by the tunnel"}
#: Most a tunnel end's resident memory may grow over the churn after its
#: warm-up (MiB). Before the data-path types took part in the cyclic GC,
#: every session stayed in memory (2,400 sessions grew the client by tens of
#: MiB); now it stays within about 1 MiB on either build.
RSS_GROWTH_MIB = 16


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

    async def test_memory_does_not_grow_with_sessions(self) -> None:
        """After a warm-up, thousands more sessions of every kind (clean, abandoned mid-frame, cut by the backend, cut by the pool, refused) grow neither end's RSS by more than 16 MiB."""
        reactor = procs._reactor()
        total = 20_000 if LONG else 2_400
        echo = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(EchoFactory(hang_up=True))
        self.addCleanup(echo.stopListening)
        echo_port = echo.getHost().port
        server_b, relay_port, client_b = procs.free_ports(3)
        relay = Relay(reactor, server_b)
        await relay.listen(relay_port)
        self.addCleanup(relay.stop)
        d = await Daemons(
            self, echo_port, pool_size=2,
            server_args=["-p", f"127.0.0.1:{server_b},127.0.0.1:{echo_port}"],
            client_args=["-p", f"127.0.0.1:{client_b},127.0.0.1:{relay_port}"]).start()
        pids = d.pids
        churn = Churn(reactor, [d.client_port, client_b], relay)

        def rss() -> Dict[str, int]:
            return {f"{role}_rss_kib": procs.rss_kib(pid) for role, pid in pids.items()}

        started = time.monotonic()
        rows = await churn_rss(reactor, churn, rss, total, warmup=400, step=800)
        elapsed = time.monotonic() - started
        for kind, table in churn.outcomes.items():
            self.assertEqual(list(table), [EXPECTED[kind]], kind)
        growth = {role: (rows[-1][f"{role}_rss_kib"] - rows[0][f"{role}_rss_kib"]) / 1024
                  for role in pids}
        record("churn-memory", f"{churn.sessions} sessions ({total} after a warm-up of "
               f"400; each kind a fifth) in {elapsed:.1f} s; RSS MiB by sessions since "
               f"the warm-up: " + ", ".join(
                   f"{r['sessions']}: client {r['client_rss_kib'] / 1024:.1f} server "
                   f"{r['server_rss_kib'] / 1024:.1f}" for r in rows)
               + f"; growth {', '.join(f'{k} {v:+.1f}' for k, v in growth.items())}")
        for role, grown in growth.items():
            self.assertLessEqual(grown, RSS_GROWTH_MIB, f"{role} RSS grew {grown:.1f} MiB: {rows}")
