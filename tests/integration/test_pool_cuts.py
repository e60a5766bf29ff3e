"""A pool connection cut or reset mid-frame delivers no part of the frame and reconnects with backoff; a slow one is not cut.
"""

import statistics
from typing import Tuple

from twisted.trial.unittest import TestCase

from tests.integration.faults import C2S, S2C, ByteFault, Fault, UnitFault
from tests.integration.tbpeers import (
    REPLY,
    control_frame,
    digest,
    filler,
    make_frame,
    the_reactor,
)
from tests.integration.tunnels import (
    DEADLINE,
    InProcessTunnel,
    echo_rtt,
    first_link,
    ms,
    record,
)


class PoolCutTests(TestCase):
    """A pool connection cut, reset or delayed on the network."""

    timeout = 120


    async def cut_mid_frame(self, direction: str, action: str) -> None:
        """Cut (or reset) the pool connection in the middle of a 1 MiB frame, then refuse 3 reconnections."""
        def later(index: int) -> Tuple[Fault, Fault]:
            if index <= 3:  # cut as soon as the ClientHello arrives
                return ByteFault("cut", at=0), Fault()
            return Fault(), Fault()

        fault = UnitFault(action, index=1)
        t = await InProcessTunnel(self, faults=first_link(fault, direction, later)).start()
        a, backend_a = await t.session()
        f1 = make_frame(filler(1000, 1), 1)
        a.send(f1)
        await a.wait_frames(1, DEADLINE)
        if direction == C2S:
            big = make_frame(filler((1 << 20) - 256, 2), 2)
            a.send(big)
        else:
            a.send(control_frame(REPLY, count=1, size=1 << 20, tag=2))
        await fault.fired.addTimeout(DEADLINE, the_reactor())
        assert fault.fired_at is not None
        await a.wait_lost(DEADLINE)
        await backend_a.wait_lost(DEADLINE)
        if direction == C2S:
            self.assertEqual(backend_a.digests, [digest(f1)], "the partial frame was delivered")
        self.assertEqual(a.digests, [digest(f1)])
        self.assertEqual(bytes(a.splitter.buffer), b"", "a partial frame reached the TB client")
        self.assertEqual(bytes(backend_a.splitter.buffer), b"",
                         "a partial frame reached the backend")
        await t.pool_up(timeout=10)
        assert t.proxy is not None
        accepted = [link.accepted_at for link in t.proxy.links]
        self.assertEqual(len(accepted), 5)
        gaps = [accepted[1] - fault.fired_at] + [b - a_ for a_, b in zip(accepted[1:], accepted[2:])]
        for gap, base in zip(gaps, (0.1, 0.2, 0.4, 0.8)):
            self.assertGreaterEqual(gap, base * 0.8 - 0.01, f"backoff gaps {gaps}")
            self.assertLessEqual(gap, base * 1.2 + 0.1, f"backoff gaps {gaps}")
        rtt = await t.round_trip(60)
        record("pool cuts",
               f"{direction} {action} in the middle of a 1 MiB frame: TB client closed "
               f"{ms(a.lost_at - fault.fired_at)}, backend connection closed "  # type: ignore
               f"{ms(backend_a.lost_at - fault.fired_at)} after the cut; no partial "  # type: ignore
               f"frame delivered; reconnect attempts after "
               + ", ".join(ms(g) for g in gaps)
               + f" (expected 100/200/400/800 ms ±20 %); new session RTT {ms(rtt)}")
        await t.stop()

    async def test_cut_mid_frame_client_to_server(self) -> None:
        """A pool connection cut in the middle of a client-to-server frame delivers no part of it, closes its sessions and reconnects with backoff."""
        await self.cut_mid_frame(C2S, "cut")

    async def test_cut_mid_frame_server_to_client(self) -> None:
        """A pool connection cut in the middle of a server-to-client frame delivers no part of it, closes its sessions and reconnects with backoff."""
        await self.cut_mid_frame(S2C, "cut")

    async def test_delayed_pool_connection(self) -> None:
        """A pool connection whose bytes arrive 100 ms late each way is slow but never failed."""
        delay = 0.1
        t = await InProcessTunnel(self, faults=lambda i: (
            ByteFault("delay", seconds=delay), ByteFault("delay", seconds=delay))).start()
        tb, _ = await t.session()
        rtts = [await echo_rtt(tb, i, size=20_000) for i in range(1, 11)]
        frames = [make_frame(filler(5000, i), i) for i in range(20, 40)]
        tb.send(*frames)
        await tb.wait_frames(10 + len(frames), DEADLINE)
        self.assertEqual(tb.digests[10:], [digest(f) for f in frames])
        assert t.proxy is not None
        self.assertEqual(len(t.proxy.links), 1, "the delayed pool connection was replaced")
        self.assertGreaterEqual(min(rtts), 2 * delay)
        record("pool cuts", f"pool connection delayed {ms(delay)} each way: RTT median "
               f"{ms(statistics.median(rtts))}, 20 pipelined frames in order, no "
               f"failure and no reconnection")

    async def test_reset_mid_frame(self) -> None:
        """A pool connection reset (RST) in the middle of a frame behaves like a cut."""
        await self.cut_mid_frame(C2S, "reset")
