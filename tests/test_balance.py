"""Tests for :mod:`tigertunnel.ops.workers.balance` (the accept board of
``--workers``): the rule on a plain buffer, the board in a real memfd, the
balancer on a Clock, the supervisor's part, and two listeners on one real
listening socket taking turns."""

import os
import socket
from typing import Any, List, Optional

from hypothesis import given, strategies as st
from twisted.internet import defer, protocol
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tigertunnel.errors import ConfigError
from tigertunnel.net.listeners import ListenerService
from tigertunnel.ops.workers.balance import (
    HEARTBEAT,
    NOT_ACCEPTING,
    POLL_PAUSED,
    STALE_NS,
    AcceptBalancer,
    AcceptBoard,
    PairGate,
    board_size,
    create_board,
    open_board,
)
from tigertunnel.ops.workers.bootstrap import BOARD_FD_ENV, inherited_board

SECOND = 1_000_000_000


class FakeTime:
    """A settable monotonic clock in nanoseconds."""

    def __init__(self) -> None:
        self.ns = 10 * SECOND

    def __call__(self) -> int:
        return self.ns


def board(pairs: int = 1, workers: int = 3) -> "tuple[AcceptBoard, FakeTime]":
    """A board over a bytearray with every slot withdrawn, and its clock."""
    now = FakeTime()
    b = AcceptBoard(bytearray(board_size(pairs, workers)), pairs, workers, now)
    for w in range(workers):
        b.withdraw(w)
    return b, now


class BoardRuleTests(SynchronousTestCase):
    """Who takes the next connection."""

    def test_fewest_takes_it_ties_race(self) -> None:
        """The worker serving fewest may accept; one serving more may not; equal counts both may."""
        b, _ = board()
        b.publish(0, 0, 3)
        b.publish(0, 1, 2)
        b.publish(0, 2, 2)
        self.assertFalse(b.may_accept(0, 0, 3))
        self.assertTrue(b.may_accept(0, 1, 2))
        self.assertTrue(b.may_accept(0, 2, 2))

    def test_alone_always_accepts(self) -> None:
        """With no other live accepting worker, a worker takes connections, even one that cannot serve them (it refuses them, as one process would)."""
        b, _ = board()
        self.assertTrue(b.may_accept(0, 0, 50))
        self.assertTrue(b.may_accept(0, 0, None))

    def test_stale_worker_left_out(self) -> None:
        """A worker that has not written for more than STALE_NS does not hold the others back."""
        b, now = board(workers=2)
        b.publish(0, 1, 0)
        self.assertFalse(b.may_accept(0, 0, 4))
        now.ns += STALE_NS
        self.assertFalse(b.may_accept(0, 0, 4))
        now.ns += 1
        self.assertTrue(b.may_accept(0, 0, 4))

    def test_withdrawn_and_not_accepting_left_out(self) -> None:
        """A withdrawn worker (exited) and one that cannot serve are left out; a worker that cannot serve leaves connections to a live one that can."""
        b, _ = board()
        b.publish(0, 1, None)
        self.assertEqual(b.read(0, 1)[0], NOT_ACCEPTING)
        b.publish(0, 2, 0)
        b.withdraw(2)
        self.assertTrue(b.may_accept(0, 0, 9))
        b.publish(0, 2, 0)
        self.assertFalse(b.may_accept(0, 1, None))
        self.assertTrue(b.may_accept(0, 2, 0))

    def test_pairs_are_separate(self) -> None:
        """Counts on one pair do not decide for another."""
        b, _ = board(pairs=2, workers=2)
        b.publish(0, 1, 0)
        b.publish(1, 1, 5)
        self.assertFalse(b.may_accept(0, 0, 1))
        self.assertTrue(b.may_accept(1, 0, 1))

    def test_bad_slot_and_small_buffer(self) -> None:
        """A slot outside the board and a buffer too small are errors, not silent writes."""
        b, _ = board(pairs=1, workers=2)
        with self.assertRaises(IndexError):
            b.publish(0, 2, 1)
        with self.assertRaises(IndexError):
            b.publish(1, 0, 1)
        with self.assertRaises(ValueError) as ctx:
            AcceptBoard(bytearray(31), 1, 2)
        self.assertIn("needs 32 bytes, not 31", str(ctx.exception))

    @given(st.lists(st.one_of(st.none(), st.integers(0, 1000)), min_size=1,
                    max_size=8),
           st.lists(st.booleans(), min_size=8, max_size=8))
    def test_somebody_always_accepts(self, counts: List[Optional[int]],
                                     fresh: List[bool]) -> None:
        """Whatever the board says, some live worker may take the next connection: the accepting one serving fewest; a worker serving more than another live one may not."""
        b, now = board(workers=len(counts))
        for w, count in enumerate(counts):
            b.publish(0, w, count)
        now.ns += STALE_NS // 2
        for w in range(len(counts)):
            if fresh[w]:
                b.publish(0, w, counts[w])
        now.ns += STALE_NS // 2 + 1
        live = [w for w in range(len(counts)) if fresh[w]]
        deciding = live or [0]  # with nobody live, anyone asking may accept
        takers = [w for w in deciding if b.may_accept(0, w, counts[w])]
        self.assertTrue(takers)
        accepting = [counts[w] for w in live if counts[w] is not None]
        for w in live:
            count = counts[w]
            if count is not None and accepting and count == min(accepting):
                self.assertIn(w, takers)
            if count is not None and accepting and count > min(accepting):
                self.assertNotIn(w, takers)


class MemfdTests(SynchronousTestCase):
    """The board in a memfd, as worker 0 hands it to the workers."""

    def test_shared_between_mappings(self) -> None:
        """What one mapping writes another reads; a new board starts withdrawn."""
        fd, b = create_board(2, 3)
        self.addCleanup(os.close, fd)
        self.assertEqual(os.fstat(fd).st_size, board_size(2, 3))
        self.assertEqual(b.read(1, 2), (NOT_ACCEPTING, 0))
        other = open_board(fd, 2, 3)
        b.publish(1, 2, 4)
        self.assertEqual(other.read(1, 2)[0], 4)
        other.withdraw(2)
        self.assertEqual(b.read(1, 2)[0], NOT_ACCEPTING)

    def test_open_errors(self) -> None:
        """A descriptor that is closed or too small is refused in one line naming it."""
        fd, _ = create_board(1, 2)
        self.addCleanup(os.close, fd)
        with self.assertRaises(ConfigError) as ctx:
            open_board(fd, 4, 2)
        self.assertEqual(str(ctx.exception), f"--worker-index: inherited descriptor "
                         f"{fd} holds 32 bytes, not an accept board of 128")
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        with self.assertRaises(ConfigError) as ctx:
            open_board(r, 1, 2)
        self.assertEqual(str(ctx.exception),
                         f"--worker-index: inherited descriptor {r}: Bad file descriptor")

    def test_inherited_board(self) -> None:
        """A worker finds its board through BOARD_FD_ENV; without it, one line says so."""
        fd, b = create_board(1, 2)
        self.addCleanup(os.close, fd)
        inherited_board(1, 2, {BOARD_FD_ENV: str(fd)}).publish(0, 1, 3)
        self.assertEqual(b.read(0, 1)[0], 3)
        with self.assertRaises(ConfigError) as ctx:
            inherited_board(1, 2, {BOARD_FD_ENV: "x"})
        self.assertIn("TIGERTUNNEL_BOARD_FD='x' does not name the accept board",
                      str(ctx.exception))


class Owner:
    """A pair's count as the multiplexer would give it."""

    def __init__(self, load: Optional[int] = 0) -> None:
        self.load = load

    def accept_load(self) -> Optional[int]:
        return self.load


class FakeListener:
    """A listener that records resumes."""

    def __init__(self) -> None:
        self.paused = False
        self.resumes = 0

    def resume(self) -> None:
        self.paused = False
        self.resumes += 1


class BalancerTests(SynchronousTestCase):
    """A worker's balancer on a Clock."""

    def setUp(self) -> None:
        self.board, self.now = board(workers=2)
        self.clock = Clock()
        self.owner = Owner(2)
        self.gate = PairGate(self.board, 0, 0, self.owner)
        self.listener = FakeListener()
        self.balancer = AcceptBalancer(self.board, 0, self.clock,
                                       [(self.gate, self.listener)])

    def test_heartbeat_writes_the_count(self) -> None:
        """Started, the balancer writes its count at once and every HEARTBEAT seconds."""
        self.balancer.startService()
        self.assertEqual(self.board.read(0, 0), (2, self.now.ns))
        self.owner.load = 5
        self.now.ns += SECOND
        self.clock.advance(HEARTBEAT)
        self.assertEqual(self.board.read(0, 0), (5, self.now.ns))

    def test_paused_listener_resumed_on_its_turn(self) -> None:
        """A paused listener is looked at every POLL_PAUSED and resumed once no live worker serves fewer."""
        self.board.publish(0, 1, 1)
        self.balancer.startService()
        self.listener.paused = True
        self.gate.paused()  # what the listener calls when it pauses
        self.clock.advance(POLL_PAUSED)
        self.assertEqual(self.listener.resumes, 0)
        self.board.publish(0, 1, 2)  # worker 1 took one
        self.clock.advance(POLL_PAUSED)
        self.assertEqual(self.listener.resumes, 1)
        self.assertFalse(self.listener.paused)

    def test_paused_listener_resumed_when_other_goes_stale(self) -> None:
        """A worker that stops writing (hung) holds a paused listener back for STALE_NS at most."""
        self.board.publish(0, 1, 0)
        self.balancer.startService()
        self.listener.paused = True
        self.gate.paused()
        for _ in range(10):
            self.clock.advance(POLL_PAUSED)
        self.assertEqual(self.listener.resumes, 0)
        self.now.ns += STALE_NS + 1
        self.clock.advance(POLL_PAUSED)
        self.assertEqual(self.listener.resumes, 1)

    def test_stop_withdraws(self) -> None:
        """Stopped, the worker is withdrawn and nothing more is scheduled."""
        self.balancer.startService()
        self.balancer.stopService()
        self.assertEqual(self.board.read(0, 0)[0], NOT_ACCEPTING)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SupervisorBoardTests(SynchronousTestCase):
    """The supervisor hands the board over and withdraws a worker that exits."""

    def test_board_handed_over_and_withdrawn(self) -> None:
        """A worker gets the memfd after its sockets (named in BOARD_FD_ENV); when it exits its slots say not accepting."""
        from tests.test_workers import ProcessClock, exited
        from tigertunnel.ops.workers.supervisor import WorkerSupervisor

        clock = ProcessClock()
        b, _ = board(pairs=2, workers=2)
        sup = WorkerSupervisor(clock, ["python", "-m", "tigertunnel", "client"], 2,
                               lambda: [7, 9], "/", shutdown_timeout=1.0,
                               publish=lambda event: None, environ={},
                               board=(42, b))
        sup.startService()
        proto, _, env, fds = clock.spawned[0]
        self.assertEqual(fds[5], 42)
        self.assertEqual(env[BOARD_FD_ENV], "5")
        b.publish(0, 1, 3)
        b.publish(1, 1, 1)
        proto.processEnded(exited(1))
        self.assertEqual([b.read(p, 1)[0] for p in (0, 1)],
                         [NOT_ACCEPTING, NOT_ACCEPTING])
        sup.stopService()


class Counting(protocol.Factory):
    """Counts the connections it accepted that are still open."""

    def __init__(self) -> None:
        self.open: List[protocol.Protocol] = []
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        factory = self

        class Held(protocol.Protocol):
            def connectionLost(self, reason: Any = None) -> None:
                if self in factory.open:
                    factory.open.remove(self)

        p = Held()
        self.open.append(p)
        self.accepted += 1
        return p

    def accept_load(self) -> Optional[int]:
        return len(self.open)


class SharedSocketTests(TestCase):
    """Two listeners on one real listening socket (as two workers inherit
    it), each gated by the same board: they take turns."""

    timeout = 20

    def shared(self) -> "tuple[socket.socket, AcceptBoard]":
        """A listening socket on loopback and a board of one pair, two workers."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        self.addCleanup(sock.close)
        fd, b = create_board(1, 2)
        self.addCleanup(os.close, fd)
        return sock, b

    def listener(self, sock: socket.socket, worker: int, b: AcceptBoard,
                 reactor: Any) -> Counting:
        factory = Counting()
        endpoint = AdoptedStreamServerEndpoint(reactor, os.dup(sock.fileno()),
                                               socket.AF_INET)
        service = ListenerService(endpoint, factory)
        gate = PairGate(b, 0, worker, factory)
        service.gate = gate
        balancer = AcceptBalancer(b, worker, reactor, [(gate, service)])
        service.privilegedStartService()
        service.startService()
        balancer.startService()
        self.addCleanup(service.stopService)
        self.addCleanup(balancer.stopService)
        return factory

    async def test_connections_alternate(self) -> None:
        """Twelve connections made one after another, none closed, split six and six, whichever listener the reactor asks first."""
        from twisted.internet import reactor

        sock, b = self.shared()
        workers = [self.listener(sock, w, b, reactor) for w in (0, 1)]
        clients: List[socket.socket] = []
        self.addCleanup(lambda: [c.close() for c in clients])
        port = sock.getsockname()[1]
        for _ in range(12):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(c)
            total = len(clients)
            for _ in range(200):
                if sum(f.accepted for f in workers) == total:
                    break
                d: "defer.Deferred[None]" = defer.Deferred()
                reactor.callLater(0.005, d.callback, None)
                await d
            self.assertEqual(sum(f.accepted for f in workers), total,
                             f"connection {total} was not accepted")
        self.assertEqual([f.accepted for f in workers], [6, 6])

    async def test_worker_that_cannot_serve_leaves_connections(self) -> None:
        """A listener whose worker cannot serve (no pool) takes nothing while another live worker can."""
        from twisted.internet import reactor

        sock, b = self.shared()
        broken, healthy = [self.listener(sock, w, b, reactor) for w in (0, 1)]
        broken.accept_load = lambda: None  # type: ignore[method-assign]
        clients = []
        self.addCleanup(lambda: [c.close() for c in clients])
        for _ in range(6):
            clients.append(socket.create_connection(
                ("127.0.0.1", sock.getsockname()[1]), timeout=5))
        for _ in range(400):
            if healthy.accepted == 6:
                break
            d: "defer.Deferred[None]" = defer.Deferred()
            reactor.callLater(0.005, d.callback, None)
            await d
        self.assertEqual((broken.accepted, healthy.accepted), (0, 6))
