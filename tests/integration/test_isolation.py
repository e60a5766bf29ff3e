"""A TB client that stops reading and a slow backend do not slow the other sessions of their pool connection.
"""

import statistics
import time

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.integration.tbpeers import FLOOD, SLOW, control_frame
from tests.integration.tunnels import DEADLINE, InProcessTunnel, echo_rtt, ms, record


class IsolationTests(TestCase):
    """A stopped TB client and a slow backend do not slow their neighbours."""

    timeout = 60

    async def test_stopped_client_and_slow_backend(self) -> None:
        """With one TB client that never reads and one backend taking 2 s per reply, another session on the same pool connection keeps its latency."""
        t = await InProcessTunnel(self, pool_size=1).start()
        normal, _ = await t.session()
        baseline = [await echo_rtt(normal, i) for i in range(1, 31)]
        stopped, stopped_backend = await t.session()
        stopped.transport.pauseProducing()  # never reads again
        slow, _ = await t.session()
        self.assertEqual(len(t.client_mux.pool_connections), 1)
        stopped.send(control_frame(FLOOD, count=32, size=1 << 20, tag=500))
        slow.send(*[control_frame(SLOW, delay=2.0, tag=600 + i) for i in range(3)])
        slow_sent = time.monotonic()
        during = []
        tag = 100
        while time.monotonic() - slow_sent < 2.5:
            tag += 1
            during.append(await echo_rtt(normal, tag))
        await slow.wait_frames(3, DEADLINE)
        slow_delay = slow.arrivals[0] - slow_sent
        # The stopped TB client itself cannot notice the close (it does not
        # read, so its own reactor never polls the socket); what matters is
        # that the tunnel dropped the session and its backend connection.
        try:
            await stopped_backend.wait_lost(DEADLINE)
            stopped_note = ("its session closed by the tunnel after "
                            f"{ms(stopped_backend.lost_at - slow_sent)}")  # type: ignore
        except defer.TimeoutError:
            stopped_note = (f"its session still open {DEADLINE + 2.5:.1f} s later; "
                            f"{len(t.client_mux.sessions)} sessions in the tunnel client")
        self.assertFalse(normal.is_lost)
        median_before, median_during = statistics.median(baseline), statistics.median(during)
        worst = max(during)
        record("isolation", f"pool of 1 connection; normal session RTT median {ms(median_before)} "
               f"(max {ms(max(baseline))}) before, median {ms(median_during)} "
               f"(max {ms(worst)}, {len(during)} round trips) while a stopped TB "
               f"client was flooded with 32 MiB ({stopped_note}) and a backend "
               f"answered after {ms(slow_delay)}")
        self.assertGreaterEqual(slow_delay, 1.9)
        self.assertLess(worst, 0.5, f"RTTs during the faults: {[ms(r) for r in during]}")
        self.assertLess(median_during, median_before + 0.05)
        # README: "a TB peer that stops reading loses its own session once
        # 8 MiB are queued for it".
        self.assertTrue(stopped_backend.is_lost, f"stopped TB client: {stopped_note}")
        self.assertEqual(len(t.client_mux.sessions), 2, stopped_note)
