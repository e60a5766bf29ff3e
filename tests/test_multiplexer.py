"""Tests for :mod:`tigertunnel.net.multiplexer` (pool slots, placement, limits, PROTOCOL.md 7.3, 7.8)."""

from typing import List

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import send_frame
from tests.memnet import BackendFactory, TBPeer, Tunnel
from tests.strategies import make_tb_frame
from tigertunnel.config.model import Address, ProxyPair
from tigertunnel.net.backoff import BACKOFF_INITIAL, BACKOFF_MAX, backoff_policy
from tigertunnel.net.admission import DEFAULT_PER_GROUP
from tigertunnel.net.multiplexer import target_host


def tb_frame(tag: int) -> bytes:
    """A small valid TB frame that crosses the tunnel unchanged."""
    fill = bytearray((tag + i) & 0xFF for i in range(256))
    fill[64:80] = bytes(16)
    return make_tb_frame(bytes([tag]) * 20, bytes(fill))


class NearTestCase(SynchronousTestCase):
    """Adds a tolerance comparison (trial's assertAlmostEqual has no ``delta``)."""

    def assert_near(self, got: float, want: float, tolerance: float) -> None:
        """Assert ``|got - want| <= tolerance``."""
        self.assertTrue(abs(got - want) <= tolerance, f"{got} is not {want} +- {tolerance}")


class BackoffPolicyTests(SynchronousTestCase):
    """The reconnect delays: 100 ms doubling to 10 s, with +-20 % jitter."""

    def test_without_jitter(self) -> None:
        """With the jitter at its midpoint the delays are 0.1, 0.2, 0.4 ... capped at 10 s."""
        policy = backoff_policy(rand=lambda: 0.5)
        delays = [policy(n) for n in range(1, 12)]
        expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0, 10.0]
        for got, want in zip(delays, expected):
            self.assertAlmostEqual(got, want)
        self.assertEqual((BACKOFF_INITIAL, BACKOFF_MAX), (0.1, 10.0))

    def test_huge_attempt_counts(self) -> None:
        """Attempt counts far beyond the cap stay at 10 s (no overflow)."""
        policy = backoff_policy(rand=lambda: 0.5)
        self.assertAlmostEqual(policy(10 ** 6), 10.0)
        self.assertAlmostEqual(policy(0), 0.1)

    def test_jitter_extremes(self) -> None:
        """The jitter spans 80 % to 120 % of the base delay."""
        low = backoff_policy(rand=lambda: 0.0)
        high = backoff_policy(rand=lambda: 1.0)
        self.assertAlmostEqual(low(1), 0.08)
        self.assertAlmostEqual(high(1), 0.12)
        self.assertAlmostEqual(low(50), 8.0)
        self.assertAlmostEqual(high(50), 12.0)

    @given(st.integers(1, 200), st.floats(0.0, 1.0, exclude_max=True))
    def test_within_bounds(self, attempt: int, r: float) -> None:
        """Every delay lies within +-20 % of min(0.1 * 2**(attempt-1), 10)."""
        base = min(0.1 * 2 ** min(attempt - 1, 20), 10.0)
        delay = backoff_policy(rand=lambda: r)(attempt)
        self.assertTrue(base * 0.8 - 1e-12 <= delay <= base * 1.2 + 1e-12, (attempt, r, delay))

    def test_default_random(self) -> None:
        """The default random source keeps every delay within the jitter bounds."""
        policy = backoff_policy()
        for attempt in range(1, 30):
            base = min(0.1 * 2 ** (attempt - 1), 10.0)
            for _ in range(20):
                self.assertTrue(base * 0.8 <= policy(attempt) <= base * 1.2)


class TargetHostTests(SynchronousTestCase):
    """Where pool connections and backend connections go."""

    def test_port_only_is_localhost(self) -> None:
        """A ``:PORT`` target means this machine."""
        self.assertEqual(target_host(ProxyPair(0, Address("", 1), Address("", 2))), "127.0.0.1")
        self.assertEqual(target_host(ProxyPair(0, Address("", 1), Address("db.example", 2))),
                         "db.example")


def run_until(tunnel: Tunnel, end: float) -> None:
    """Advance the clock from one scheduled call to the next until ``end``, flushing in between."""
    for _ in range(10_000):
        now = tunnel.clock.seconds()
        due = [call.getTime() for call in tunnel.clock.getDelayedCalls()]
        step = min(due, default=end) - now
        if now + step > end:
            tunnel.clock.advance(end - now)
            tunnel.net.flush()
            return
        tunnel.clock.advance(max(step, 0.0))
        tunnel.net.flush()
    raise AssertionError(f"more than 10000 scheduled calls before {end} s")


class AttemptClock:
    """Records when the tunnel client tries to connect a pool connection."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.times: List[float] = []
        original = tunnel.client.endpoint_for

        def endpoint_for(pair: ProxyPair):  # type: ignore[no-untyped-def]
            self.times.append(tunnel.clock.seconds())
            return original(pair)

        tunnel.client.endpoint_for = endpoint_for


class PoolSlotTests(NearTestCase):
    """Each pool connection reconnects with backoff and resets after success."""

    def test_refused_attempt_times(self) -> None:
        """With the server refusing, attempts happen at 0, 0.1, 0.3, 0.7, 1.5 ... (cumulative backoff)."""
        t = Tunnel(pool_size=1)
        attempts = AttemptClock(t)
        t.net.refusing.add(t.server_addr)
        t.start()
        expected = [0.0, 0.1, 0.3, 0.7, 1.5, 3.1, 6.3, 12.7, 22.7, 32.7, 42.7]
        run_until(t, 45.0)
        self.assertEqual(len(attempts.times), len(expected))
        for got, want in zip(attempts.times, expected):
            self.assert_near(got, want, 1e-9)
        self.assertEqual(t.client.pool[0].failures, len(expected))

    def test_recovery_resets_failures(self) -> None:
        """When the server comes back the pool comes up, and the next loss retries after 100 ms again."""
        t = Tunnel(pool_size=1)
        attempts = AttemptClock(t)
        t.net.refusing.add(t.server_addr)
        t.start()
        t.clock.advance(0.1)
        t.clock.advance(0.2)
        t.clock.advance(0.4)
        self.assertEqual(len(attempts.times), 4)
        self.assertEqual(t.client.pool[0].failures, 4)
        t.net.refusing.discard(t.server_addr)
        t.clock.advance(0.8)  # attempt 5 succeeds
        t.net.flush()
        self.assertEqual(len(t.client.pool_connections), 1)
        self.assertEqual(t.client.pool[0].failures, 0)
        link = t.client.pool_connections[0]
        link.transport.loseConnection()
        t.net.flush()
        self.assertEqual(t.client.pool_connections, [])
        lost_at = t.clock.seconds()
        t.clock.advance(0.099)
        self.assertEqual(len(attempts.times), 5)
        t.clock.advance(0.002)
        self.assertEqual(len(attempts.times), 6)
        self.assert_near(attempts.times[-1] - lost_at, 0.1, 0.002)
        t.net.flush()
        self.assertEqual(len(t.client.pool_connections), 1)

    def test_rejected_handshake_backs_off(self) -> None:
        """A handshake the server rejects counts as a failure: the delays keep growing."""
        t = Tunnel(pool_size=1, client_cfg={"cluster_id": 1}, server_cfg={"cluster_id": 2})
        attempts = AttemptClock(t)
        t.start()
        run_until(t, 10.0)
        gaps = [b - a for a, b in zip(attempts.times, attempts.times[1:])]
        self.assertEqual(len(gaps), 6)
        for got, want in zip(gaps, [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]):
            self.assert_near(got, want, 1e-9)
        self.assertEqual(t.client.handshake_failures, 7)
        self.assertEqual(t.client.pool_connections, [])

    def test_slots_independent(self) -> None:
        """Each slot of the pool keeps its own connection; losing one leaves the others up."""
        t = Tunnel(pool_size=3)
        t.start()
        self.assertEqual(len(t.client.pool_connections), 3)
        self.assertEqual(sorted(s.connection is not None for s in t.client.pool), [True] * 3)
        t.client.pool[1].connection.transport.loseConnection()
        t.net.flush()
        self.assertEqual(len(t.client.pool_connections), 2)
        self.assertIsNone(t.client.pool[1].connection)
        t.net.advance(0.2)
        self.assertEqual(len(t.client.pool_connections), 3)

    def test_stop_while_refused(self) -> None:
        """stopService of the client cancels the pending retry: no further attempts."""
        t = Tunnel(pool_size=2)
        attempts = AttemptClock(t)
        t.net.refusing.add(t.server_addr)
        t.start()
        t.clock.advance(0.1)
        count = len(attempts.times)
        self.successResultOf(t.client.stopService())
        for _ in range(100):
            t.clock.advance(1)
        self.assertEqual(len(attempts.times), count)
        # The server's own timers (its heap trimmer) go with the server.
        self.successResultOf(t.server.stopService())
        self.assertEqual(t.clock.getDelayedCalls(), [])

    def test_stop_while_connected(self) -> None:
        """stopService closes the pool connections, fires when they are gone, and does not reconnect."""
        t = Tunnel(pool_size=2)
        attempts = AttemptClock(t)
        t.start()
        self.assertEqual(len(t.client.pool_connections), 2)
        d = t.client.stopService()
        self.assertNoResult(d)
        t.net.flush()
        self.successResultOf(d)
        self.assertEqual(t.client.pool_connections, [])
        count = len(attempts.times)
        t.net.advance(30)
        self.assertEqual(len(attempts.times), count)
        self.assertEqual(t.server.pool_connections, [])


class PlacementTests(SynchronousTestCase):
    """New TB connections are placed round-robin on healthy pool connections."""

    def test_round_robin(self) -> None:
        """Six TB connections over three pool connections land two on each, in turn."""
        t = Tunnel(pool_size=3)
        t.start()
        links = list(t.client.pool_connections)
        for i in range(6):
            peer, _ = t.tb_client()
            self.assertFalse(peer.lost)
            self.assertEqual([len(link.streams) for link in links],
                             [(i + 3 - k) // 3 for k in range(3)])

    def test_skips_lost_pool_connection(self) -> None:
        """While one pool connection is down, new TB connections go only to the others."""
        t = Tunnel(pool_size=3)
        t.start()
        links = list(t.client.pool_connections)
        links[1].transport.loseConnection()
        t.net.flush()
        for _ in range(4):
            peer, _ = t.tb_client()
            self.assertFalse(peer.lost)
        self.assertEqual([len(link.streams) for link in links], [2, 0, 2])
        self.assertEqual([link.established for link in links], [True, False, True])

    def test_sessions_keep_their_pool_connection(self) -> None:
        """A session stays on its pool connection (sticky) and its frames come back."""
        t = Tunnel(pool_size=2)
        t.start()
        peer, _ = t.tb_client()
        session = next(iter(t.client.sessions))
        link = session.pool_connection
        for tag in range(5):
            peer.send(tb_frame(tag))
            t.net.flush()
            t.tb_client()  # other sessions come and go around it
            self.assertIs(session.pool_connection, link)
        self.assertEqual(peer.received, [tb_frame(tag) for tag in range(5)])

    def test_no_healthy_pool_connection(self) -> None:
        """With no pool connection up a TB connection is closed at once and nothing is recorded."""
        t = Tunnel(pool_size=2)
        t.net.refusing.add(t.server_addr)
        t.start()
        peer, _ = t.tb_client()
        self.assertTrue(peer.lost)
        self.assertEqual(t.client.sessions, set())


class AcceptLoadTests(SynchronousTestCase):
    """What each role counts for ``--workers`` accept balancing."""

    def test_client_counts_sessions_and_none_without_pool(self) -> None:
        """A client counts its TB sessions; with no pool connection up, or stopping, it can take none."""
        t = Tunnel(pool_size=2)
        t.net.refusing.add(t.server_addr)
        t.start()
        self.assertIsNone(t.client.accept_load())
        t.net.refusing.discard(t.server_addr)
        t.net.advance(15)
        self.assertEqual(t.client.accept_load(), 0)
        t.tb_client()
        t.tb_client()
        self.assertEqual(t.client.accept_load(), 2)
        t.client.stopping = True  # as the graceful shutdown marks it
        self.assertIsNone(t.client.accept_load())

    def test_server_counts_pool_connections(self) -> None:
        """A server counts pool connections, pending handshakes included."""
        t = Tunnel(pool_size=2)
        t.start()
        self.assertEqual(t.server.accept_load(), 2)
        t.net.dial(t.server_addr, TBPeer())
        t.net.flush()
        self.assertEqual(t.server.accept_load(), 3)
        t.server.stopping = True
        self.assertIsNone(t.server.accept_load())


class ServerLimitTests(SynchronousTestCase):
    """The server's -m limit on streams per pair."""

    def test_refuses_over_limit_with_stream_close(self) -> None:
        """Over max_sessions the server opens no backend and tells a version-2 client, which closes the TB client."""
        t = Tunnel(server_cfg={"max_sessions": 2})
        t.start()
        a, _ = t.tb_client()
        b, _ = t.tb_client()
        c, _ = t.tb_client()
        self.assertEqual(len(t.backend.peers), 2)
        self.assertEqual(len(t.server.sessions), 2)
        self.assertTrue(c.lost)
        self.assertFalse(a.lost or b.lost)
        self.assertEqual(len(t.client.sessions), 2)
        a.send(tb_frame(1))
        b.send(tb_frame(2))
        t.net.flush()
        self.assertEqual((a.received, b.received), ([tb_frame(1)], [tb_frame(2)]))

    def test_limit_frees_up(self) -> None:
        """When a stream ends its place can be taken by a new one."""
        t = Tunnel(server_cfg={"max_sessions": 1})
        t.start()
        a, _ = t.tb_client()
        a.transport.loseConnection()
        t.net.flush()
        self.assertEqual(t.server.sessions, set())
        b, _ = t.tb_client()
        self.assertFalse(b.lost)
        b.send(tb_frame(3))
        t.net.flush()
        self.assertEqual(b.received, [tb_frame(3)])

    def test_limit_counts_the_pair(self) -> None:
        """The limit applies to the pair across all its pool connections."""
        t = Tunnel(pool_size=3, server_cfg={"max_sessions": 2})
        t.start()
        peers = [t.tb_client()[0] for _ in range(4)]
        self.assertEqual([p.lost for p in peers], [False, False, True, True])
        self.assertEqual(len(t.backend.peers), 2)

    def test_pending_handshakes_bounded(self) -> None:
        """Past the per-source cap, each new silent pool connection from that source drops the source's oldest silent one."""
        t = Tunnel()
        t.start()
        silent = [TBPeer() for _ in range(DEFAULT_PER_GROUP + 3)]
        for peer in silent:
            t.net.dial(t.server_addr, peer)
        t.net.flush()
        self.assertEqual([p.lost for p in silent],
                         [True] * 3 + [False] * DEFAULT_PER_GROUP)
        self.assertEqual(t.server.evictions, 3)
        self.assertEqual(len(t.server.pending), DEFAULT_PER_GROUP)
        self.assertEqual(len(t.server.pool_connections), 2)  # the client's own pool is untouched
        client, _ = t.tb_client()
        client.send(tb_frame(5))
        t.net.flush()
        self.assertEqual(client.received, [tb_frame(5)])

    def test_reference_client_gets_no_close(self) -> None:
        """A version-1 client over the limit gets nothing back for the refused stream (no stream_close)."""
        t = Tunnel(server_cfg={"max_sessions": 1}, backend=BackendFactory())
        t.start()
        link, received = t.reference_client_link()
        self.assertTrue(link.established)
        first, second = t.client.new_session(), t.client.new_session()
        for session in (first, second):
            send_frame(link, link.open_stream(session), tb_frame(session.stream_id))
        t.net.flush()
        self.assertEqual(len(t.backend.peers), 1)
        self.assertEqual(received, [])
        self.assertIn(second.stream_id, link.streams)


class LimitLogTests(SynchronousTestCase):
    """Limit warnings: one window per pair and kind of limit."""

    def test_kinds_do_not_swallow_each_other(self) -> None:
        """An out-of-descriptors warning right after a 'no pool connection' one is still logged; repeats of each wait for the interval and then say how many were left out."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        from tigertunnel.net.multiplexer import LIMIT_LOG_INTERVAL

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        t = Tunnel(pool_size=1)
        no_pool = "client {pair}: no healthy pool connection"
        no_fds = "server {pair}: out of file descriptors"
        t.client.limit_log(no_pool, pair="pair0")
        t.client.limit_log(no_fds, pair="pair0")
        t.client.limit_log(no_pool, pair="pair0")
        t.client.limit_log(no_pool, pair="pair0")
        self.assertEqual([e["log_format"].split("{more}")[0] for e in events],
                         [no_pool, no_fds])
        t.clock.advance(LIMIT_LOG_INTERVAL)
        t.client.limit_log(no_pool, pair="pair0")
        self.assertEqual(events[-1]["held"], 2)
        self.assertIn("(2 more since the last such line)", events[-1]["more"])
