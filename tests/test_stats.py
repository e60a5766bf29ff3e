"""Tests for :mod:`tigertunnel.stats` (the typed counters and their labels)."""

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.stats import HandshakeFailure, Refusal, Stats
from tigertunnel.wire.handshake import RejectKind, Status


class HandshakeFailureTests(SynchronousTestCase):
    """Failed handshakes map to the metric labels the dashboards use."""

    def test_client_labels(self) -> None:
        """A refusal status becomes rejected_<status>, an unknown status invalid_status, no status server_auth."""
        self.assertEqual([HandshakeFailure.refused(s).value for s in Status if s is not Status.OK],
                         [f"rejected_{s.name.lower()}" for s in Status if s is not Status.OK])
        self.assertIs(HandshakeFailure.refused(9), HandshakeFailure.INVALID_STATUS)
        self.assertIs(HandshakeFailure.refused(0), HandshakeFailure.INVALID_STATUS)
        self.assertIs(HandshakeFailure.refused(None), HandshakeFailure.SERVER_AUTH)

    def test_server_labels(self) -> None:
        """Each rejection kind keeps its own label."""
        for kind in RejectKind:
            self.assertEqual(HandshakeFailure.rejected(kind).value, kind.value)

    def test_label_set(self) -> None:
        """The labels are exactly the reasons /metrics reports."""
        self.assertEqual({f.value for f in HandshakeFailure}, {
            "timeout", "server_auth", "invalid_status", "rejected_unknown_key",
            "rejected_server_error", "rejected_unknown_kem_key",
            "rejected_client_auth_failed", "rejected_timestamp_invalid",
            "bad_version", "bad_operation", "unknown_key", "bad_hash", "timestamp",
            "replay", "replay_cache_full", "replay_cache_error", "kem_required",
            "kem"})
        self.assertEqual({r.value for r in Refusal}, {"stopping", "no_pool", "max_sessions"})


class StatsTests(SynchronousTestCase):
    """The counters of a pair."""

    def test_start_at_zero(self) -> None:
        """A new Stats has every counter at zero and no reasons."""
        stats = Stats()
        self.assertEqual((stats.frames_to_tunnel, stats.pool_failures, stats.sessions_opened),
                         (0, 0, 0))
        self.assertEqual(sum(stats.handshake_failures.values()), 0)
        self.assertEqual(stats.sessions_refused[Refusal.NO_POOL], 0)

    def test_no_stray_attributes(self) -> None:
        """A misspelt counter is an error, not a new counter nobody reads."""
        stats = Stats()
        with self.assertRaises(AttributeError):
            stats.frames_too_tunnel = 1  # type: ignore[attr-defined]
