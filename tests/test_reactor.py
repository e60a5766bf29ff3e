"""The lean epoll reactor's event dispatch (:mod:`tigertunnel.net.reactor`), with a scripted poller."""

import errno
from typing import Dict, List, Optional, Tuple

from twisted.internet.epollreactor import EPOLLIN, EPOLLOUT
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.net.reactor import NAME, LeanEPollReactor


class ScriptedPoller:
    """An epoll stand-in: ``poll`` returns the next scripted result (or raises it)."""

    def __init__(self) -> None:
        self.script: List[object] = []
        self.registered: Dict[int, int] = {}
        self.polls: List[Tuple[float, int]] = []

    def poll(self, timeout: float, maxevents: int) -> List[Tuple[int, int]]:
        self.polls.append((timeout, maxevents))
        result = self.script.pop(0)
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, list)
        return result

    def register(self, fd: int, events: int) -> None:
        self.registered[fd] = events

    def modify(self, fd: int, events: int) -> None:
        self.registered[fd] = events

    def unregister(self, fd: int) -> None:
        del self.registered[fd]

    def close(self) -> None:
        pass


class Socketish:
    """A reader the reactor polls: it records calls and can fail or act on others."""

    def __init__(self, fd: int, log: List[str]) -> None:
        self.fd = fd
        self.log = log
        self.fail = False
        self.on_read: Optional[object] = None
        self.lost: Optional[Failure] = None

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return f"socketish{self.fd}"

    def doRead(self) -> None:
        self.log.append(f"read {self.fd}")
        if callable(self.on_read):
            self.on_read()
        if self.fail:
            raise RuntimeError(f"reader {self.fd} broke")

    def doWrite(self) -> None:
        self.log.append(f"write {self.fd}")

    def connectionLost(self, reason: Failure) -> None:
        self.log.append(f"lost {self.fd}")
        self.lost = reason


class LeanDispatchTests(SynchronousTestCase):
    """doPoll hands every event to _doReadOrWrite, with no logging context, and keeps serving."""

    def setUp(self) -> None:
        self.reactor = LeanEPollReactor()
        real = self.reactor._poller
        self.addCleanup(real.close)
        self.addCleanup(self.reactor.waker.connectionLost, None)
        self.poller = ScriptedPoller()
        # The waker registered itself with the real poller; keep it out of the script.
        self.reactor._selectables.clear()
        self.reactor._reads.clear()
        self.reactor._poller = self.poller
        self.log: List[str] = []

    def reader(self, fd: int) -> Socketish:
        s = Socketish(fd, self.log)
        self.reactor.addReader(s)  # type: ignore[arg-type]
        return s

    def test_name(self) -> None:
        """The twistd --reactor short name."""
        self.assertEqual(NAME, "tigertunnel-epoll")

    def test_events_in_order(self) -> None:
        """Every event of a poll is handled, reads and writes, in the poller's order."""
        a, b = self.reader(10), self.reader(11)
        self.reactor.addWriter(b)  # type: ignore[arg-type]
        self.poller.script.append([(11, EPOLLIN | EPOLLOUT), (10, EPOLLIN)])
        self.reactor.doPoll(0.5)
        self.assertEqual(self.log, ["read 11", "write 11", "read 10"])
        self.assertEqual(self.poller.polls, [(0.5, 2)])
        self.assertIsNone(a.lost)

    def test_no_timeout_waits_indefinitely(self) -> None:
        """A timeout of None polls with -1."""
        self.reader(10)
        self.poller.script.append([])
        self.reactor.doPoll(None)
        self.assertEqual(self.poller.polls, [(-1, 1)])

    def test_failing_reader_loses_only_itself(self) -> None:
        """A reader that raises is logged and disconnected; the next event of the same poll is still handled."""
        bad, good = self.reader(10), self.reader(11)
        bad.fail = True
        self.poller.script.append([(10, EPOLLIN), (11, EPOLLIN)])
        self.reactor.doPoll(0)
        self.assertEqual(self.log, ["read 10", "lost 10", "read 11"])
        assert bad.lost is not None
        self.assertIsInstance(bad.lost.value, RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn(10, self.poller.registered)
        self.assertIn(11, self.poller.registered)
        self.assertIsNone(good.lost)

    def test_reader_removed_by_an_earlier_event_is_skipped(self) -> None:
        """An fd an earlier handler of the same poll removed is not touched (no KeyError, no read)."""
        first, second = self.reader(10), self.reader(11)
        first.on_read = lambda: self.reactor.removeReader(second)  # type: ignore[arg-type]
        self.poller.script.append([(10, EPOLLIN), (11, EPOLLIN), (99, EPOLLIN)])
        self.reactor.doPoll(0)
        self.assertEqual(self.log, ["read 10"])

    def test_eintr_returns_other_errors_raise(self) -> None:
        """An interrupted poll is a no-op; any other poll error is a bug and raises."""
        self.reader(10)
        self.poller.script += [OSError(errno.EINTR, "interrupted"), OSError(errno.EBADF, "bad fd")]
        self.reactor.doPoll(0)
        self.assertEqual(self.log, [])
        self.assertRaises(OSError, self.reactor.doPoll, 0)

    def test_broken_disconnect_is_logged_and_serving_goes_on(self) -> None:
        """If even the disconnect path fails, the error is logged and later events are handled."""
        bad, good = self.reader(10), self.reader(11)
        bad.fail = True

        def broken_lost(reason: Failure) -> None:
            raise ValueError("connectionLost broke")
        bad.connectionLost = broken_lost  # type: ignore[method-assign]
        self.poller.script.append([(10, EPOLLIN), (11, EPOLLIN)])
        self.reactor.doPoll(0)
        self.assertEqual(self.log, ["read 10", "read 11"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIsNone(good.lost)


class LoopTests(SynchronousTestCase):
    """mainLoop: timed calls, thread calls, stop and errors, on a real (not
    installed) LeanEPollReactor."""

    def setUp(self) -> None:
        self.reactor = LeanEPollReactor()
        self.log: List[str] = []

    def run_reactor(self, limit: float = 10.0) -> None:
        """Run until the test stops the reactor; fail if a guard call had to."""
        guard = self.reactor.callLater(limit, self.reactor.stop)
        self.reactor.run(installSignalHandlers=False)
        if not guard.active():
            self.fail(f"the loop ran {limit} s without being stopped")
        guard.cancel()

    def test_timed_calls_in_order_and_chained(self) -> None:
        """Due calls run in time order, a call made by a call runs on a later turn, a cancelled one never, and stop fires the shutdown triggers."""
        r = self.reactor
        r.addSystemEventTrigger("before", "shutdown", self.log.append, "shutdown")

        def second() -> None:
            self.log.append("second")
            r.callLater(0, lambda: (self.log.append("chained"), r.stop()))
        r.callLater(0.02, second)
        r.callLater(0.01, self.log.append, "first")
        cancelled = r.callLater(0.015, self.log.append, "cancelled")
        cancelled.cancel()
        self.run_reactor()
        self.assertEqual(self.log, ["first", "second", "chained", "shutdown"])

    def test_poll_never_sleeps_past_the_next_call(self) -> None:
        """With a call 50 ms away and no socket events, the call runs once it is due, not at some later wakeup."""
        import time

        r = self.reactor
        start = time.monotonic()
        ran: List[float] = []
        r.callLater(0.05, lambda: (ran.append(time.monotonic() - start), r.stop()))
        self.run_reactor()
        self.assertEqual(len(ran), 1)
        self.assertGreaterEqual(ran[0], 0.049)
        self.assertLess(ran[0], 5.0)

    def test_call_from_thread_wakes_the_loop(self) -> None:
        """A call queued from another thread while the loop sleeps in poll runs."""
        import threading

        r = self.reactor

        def from_thread() -> None:
            r.callFromThread(lambda: (self.log.append("thread call"), r.stop()))
        r.callWhenRunning(lambda: threading.Timer(0.05, from_thread).start())
        self.run_reactor()
        self.assertEqual(self.log, ["thread call"])

    def test_error_escaping_a_turn_is_logged_and_the_loop_goes_on(self) -> None:
        """An exception out of a turn (here the poll itself) is logged; the loop keeps turning and later calls run."""
        r = self.reactor
        real = r.doPoll
        fails = [True]

        def flaky(timeout: Optional[float]) -> None:
            if fails:
                fails.pop()
                raise ZeroDivisionError("a broken turn")
            real(timeout)
        r.doPoll = flaky  # type: ignore[method-assign]
        r.callLater(0.01, lambda: (self.log.append("later"), r.stop()))
        self.run_reactor()
        self.assertEqual(self.log, ["later"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_poll_timeouts(self) -> None:
        """Each turn polls for the time until the earliest call: None with no call, never negative (a late call runs first), at most epoll's limit, 0 once stopping."""
        from tigertunnel.net.reactor import LONGEST_WAIT

        r = self.reactor
        now = [1000.0]
        r.seconds = lambda: now[0]  # type: ignore[method-assign]
        waits: List[Optional[float]] = []
        steps: List[object] = [
            lambda: r.callLater(3, self.log.append, "soon"),
            lambda: now.__setitem__(0, now[0] + 5),  # the poll overslept
            lambda: r.callLater(LONGEST_WAIT * 2, self.log.append, "far"),
            r.stop,
        ]

        def poll(timeout: Optional[float]) -> None:
            waits.append(timeout)
            if not steps:
                r._started = False  # the script is over (stop should have ended it)
                return
            step = steps.pop(0)
            assert callable(step)
            step()
        r.doPoll = poll  # type: ignore[method-assign]
        r._started = r.running = True
        r._stopped = False  # as run() leaves it
        r.mainLoop()
        self.assertEqual(waits, [None, 3.0, None, LONGEST_WAIT, 0.0])
        self.assertEqual(self.log, ["soon"])
