"""Any number of frames either way, solicited or not, arrive in order with no stall.
"""

import random
import time

from twisted.trial.unittest import TestCase

from tests.integration.tbpeers import (
    REPLY,
    UNSOLICITED,
    ControlScript,
    control_frame,
    digest,
    reply_frame,
)
from tests.integration.tunnels import DEADLINE, InProcessTunnel, ms, record


class FullDuplexTests(TestCase):
    """Any number of frames either way, in order, with no stall."""

    timeout = 60

    async def test_zero_one_three_and_unsolicited(self) -> None:
        """A backend answering 0, 1 or 3 frames per request and sending unsolicited frames has every frame delivered in order."""
        t = await InProcessTunnel(self, script=ControlScript(greeting=2)).start()
        sessions = [await t.session() for _ in range(3)]
        expected = []
        started = time.monotonic()
        for i, (tb, _) in enumerate(sessions):
            counts = [0, 1, 3] * 10
            random.Random(i).shuffle(counts)
            requests = [control_frame(UNSOLICITED, count=20, delay=0.01, size=500 + i,
                                      tag=1000 * i)]
            requests += [control_frame(REPLY, count=c, size=300 + 97 * j,
                                       tag=1000 * i + j + 1) for j, c in enumerate(counts)]
            tb.send(*requests)  # pipelined: no waiting for answers
            expected.append(2 + 20 + sum(counts))
        for (tb, _), count in zip(sessions, expected):
            await tb.wait_frames(count, DEADLINE)
        elapsed = time.monotonic() - started
        # A request answered by nothing does not hold back the next one.
        tb, conn = sessions[0]
        before = len(tb.digests)
        sent_at = time.monotonic()
        tb.send(control_frame(REPLY, count=0, tag=9001),
                control_frame(REPLY, count=1, size=256, tag=9002))
        await tb.wait_frames(before + 1, DEADLINE)
        rtt = time.monotonic() - sent_at
        self.assertEqual(tb.digests[before], digest(reply_frame(9002, 0, 256)))
        for i, (tb, conn) in enumerate(sessions):
            self.assertEqual(conn.digests, tb.sent, f"session {i}: requests differ")
            self.assertEqual(tb.digests, conn.sent, f"session {i}: backend frames differ")
        record("full duplex", f"3 sessions, 31 pipelined requests each answered by 0/1/3 frames, "
               f"2 greeting + 20 unsolicited frames per backend connection: "
               f"{sum(expected)} frames delivered in order in {ms(elapsed)}; a "
               f"0-frame request then a 1-frame request answered in {ms(rtt)}")
