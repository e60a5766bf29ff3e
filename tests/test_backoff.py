"""Tests for tigertunnel.net.backoff: the deterministic delay both retry loops use."""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.net.backoff import exponential_delay


class ExponentialDelayTests(SynchronousTestCase):
    """initial, times factor per try, capped."""

    def test_worker_restart_delays(self) -> None:
        """1 s doubling to 30 s gives 1, 2, 4, 8, 16, 30, 30."""
        self.assertEqual([exponential_delay(n, 1.0, 30.0) for n in range(1, 8)],
                         [1, 2, 4, 8, 16, 30, 30])

    def test_first_try_and_below(self) -> None:
        """Attempts 0 and 1 both wait the initial delay."""
        self.assertEqual((exponential_delay(0, 0.1, 10.0), exponential_delay(1, 0.1, 10.0)),
                         (0.1, 0.1))

    @given(st.integers(1, 10 ** 7), st.floats(0.001, 10.0), st.floats(1.0, 100.0),
           st.floats(1.0, 4.0))
    def test_bounded_and_non_decreasing(self, attempt: int, initial: float, maximum: float,
                                        factor: float) -> None:
        """Any attempt count (even one that would overflow a float) gives a delay between
        min(initial, maximum) and maximum that never shrinks from one try to the next."""
        delay = exponential_delay(attempt, initial, maximum, factor)
        self.assertTrue(min(initial, maximum) <= delay <= maximum)
        self.assertLessEqual(delay, exponential_delay(attempt + 1, initial, maximum, factor))
