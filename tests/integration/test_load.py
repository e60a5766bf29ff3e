"""Hundreds of concurrent sessions with frames up to 1 MiB arrive byte for byte, with stable memory.
"""

import os
import random
import time
from typing import Dict, List, Tuple

from twisted.internet import defer, task
from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.tbpeers import Script, TBPeer, make_frame
from tests.integration.tunnels import LONG, Daemons, listening_backend, random_size, record


class LoadTests(TestCase):
    """Many concurrent sessions with frames up to 1 MiB, verified byte for byte."""

    timeout = 600 if LONG else 120

    async def test_concurrent_sessions(self) -> None:
        """Hundreds of concurrent sessions over 4 pool connections echo random-size frames byte-identical, with zero errors and stable memory."""
        count = 1000 if LONG else 200
        duration = 30.0 if LONG else 5.0
        backend = listening_backend(self, Script())
        d = await Daemons(self, backend.port_number, pool_size=4).start()
        pids = d.pids
        material = os.urandom(2 << 20)
        peers: List[TBPeer] = []
        for first in range(0, count, 50):
            batch = await defer.gatherResults(
                [defer.ensureDeferred(d.tb_client()) for _ in range(first, min(count, first + 50))],
                consumeErrors=True)
            peers.extend(batch)
        await procs.wait_until(
            lambda: len(backend.open_connections) == count, 10,
            f"{count} backend connections (have {len(backend.open_connections)}; "
            f"{sum(p.is_lost for p in peers)} TB connections closed; client log tail "
            f"{procs.read_text(d.path('client.log'))[-600:]!r}; server log tail "
            f"{procs.read_text(d.path('server.log'))[-600:]!r})")
        samples: List[Tuple[float, Dict[str, int]]] = []
        sampler = task.LoopingCall(lambda: samples.append(
            (time.monotonic(), {r: procs.rss_kib(p) for r, p in pids.items()})))
        started = time.monotonic()
        end = started + duration
        sampler.start(0.25)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        errors: List[str] = []
        volume = [0, 0]  # frames, bytes

        async def run(index: int, peer: TBPeer) -> None:
            rng = random.Random(index)
            while time.monotonic() < end and not peer.is_lost:
                size = random_size(rng)
                offset = rng.randrange(len(material) - size)
                tag = index << 32 | len(peer.sent)
                frame = make_frame(material[offset:offset + size - 256], tag)
                peer.send(frame)
                try:
                    await peer.wait_frames(len(peer.sent), 60)
                except Exception as e:
                    errors.append(f"session {index}: {e}")
                    return
                volume[0] += 1
                volume[1] += size

        await defer.gatherResults([defer.ensureDeferred(run(i, p)) for i, p in enumerate(peers)],
                                  consumeErrors=True)
        elapsed = time.monotonic() - started
        sampler.stop()
        # Hash both ends: what each TB client sent, what its backend connection
        # received and sent back, and what the TB client received.
        by_first = {c.digests[0]: c for c in backend.connections if c.digests}
        mismatched = 0
        largest = 0
        for i, peer in enumerate(peers):
            conn = by_first.get(peer.sent[0]) if peer.sent else None
            if conn is None or conn.digests != peer.sent or conn.sent != peer.sent \
                    or peer.digests != peer.sent:
                mismatched += 1
            self.assertFalse(peer.is_lost, f"session {i} was closed")
        self.assertEqual(errors, [])
        self.assertEqual(mismatched, 0)
        warm = [s for t_, s in samples if t_ - started >= duration * 0.4]
        self.assertGreaterEqual(len(warm), 3)
        growth = {role: max(s[role] for s in warm) - warm[0][role] for role in pids}
        peak = {role: max(s[role] for _, s in samples) for role in pids}
        record("load", f"{count} concurrent sessions over -n 4 for {elapsed:.1f} s: "
               f"{volume[0]} frames, {volume[1] / 2**20:.0f} MiB each way "
               f"({volume[1] / 2**20 / elapsed:.0f} MiB/s), 5 % of them 1 MiB; "
               f"every frame identical at both ends (SHA-256), errors {len(errors)}; "
               f"RSS KiB at the end of warm-up {warm[0]}, growth after it {growth}, "
               f"peak {peak}")
        for role in pids:
            self.assertLess(growth[role], max(64 * 1024, warm[0][role] // 4),
                            f"{role} RSS grew after warm-up: {samples}")
        for peer in peers:
            peer.transport.loseConnection()
        await procs.wait_until(lambda: not backend.open_connections, 15,
                               "every session to close")
