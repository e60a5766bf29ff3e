"""Past max_sessions new TB connections close at once; existing sessions carry on.
"""

import statistics
import time

from twisted.trial.unittest import TestCase

from tests.integration.tunnels import DEADLINE, InProcessTunnel, LogCapture, echo_rtt, ms, record


class SessionLimitTests(TestCase):
    """Past max_sessions new TB connections close at once; existing ones carry on."""

    timeout = 60

    async def limit(self, side: str, **limits: int) -> None:
        """Open 5 sessions, then 20 more past the limit of ``side``, and check both groups."""
        log = LogCapture(self)
        t = await InProcessTunnel(self, pool_size=2, **limits).start()
        existing = [await t.session() for _ in range(5)]
        for i, (tb, _) in enumerate(existing):
            await echo_rtt(tb, i + 1)
        before = len(t.backend.connections)
        excess = []
        for _ in range(20):
            started = time.monotonic()
            excess.append((started, await t.tb_client()))
        closed = []
        for started, tb in excess:
            closed.append(await tb.wait_lost(DEADLINE) - started)
        for i, (tb, _) in enumerate(existing):
            await echo_rtt(tb, 100 + i)
            self.assertFalse(tb.is_lost)
        lines = log.matching("max sessions (5) reached")
        self.assertEqual(len(lines), 1, lines)
        backends = len(t.backend.connections) - before
        if side == "client":
            self.assertEqual(backends, 0, "excess TB connections reached the backend")
        record("session limits", f"{side} max_sessions 5: 20 excess TB connections closed after "
               f"median {ms(statistics.median(closed))}, max {ms(max(closed))}; "
               f"{len(lines)} log line ({lines[0]!r}); backend connections made for "
               f"them: {backends}; the 5 existing sessions still echo")
        self.assertLess(max(closed), 1.0)

    async def test_client_limit(self) -> None:
        """Past the client's max_sessions excess TB connections are closed at once with one log line; existing sessions are unaffected."""
        await self.limit("client", client_max=5)

    async def test_server_limit(self) -> None:
        """Past the server's max_sessions excess streams are refused and their TB connections closed at once with one log line; existing sessions are unaffected."""
        await self.limit("server", server_max=5)
