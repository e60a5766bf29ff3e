"""Accept balancing: a new connection goes to the worker that serves fewest.

The workers of a tunnel end accept on shared listening sockets (see
:mod:`tigertunnel.ops.workers`). Left to the kernel, every idle worker is
woken by a new connection and the first to run takes it; on a busy machine
that can be the same worker every time. So the workers keep an *accept
board*: a small shared memory (a ``memfd`` that worker 0 creates and hands
to the workers with the listening sockets) holding, for each proxy pair and each
worker, how many connections that worker serves on that pair and when it
last said so.

At each accept a worker takes one connection, and only if no other live
worker accepting on that pair serves fewer; otherwise it stops reading that
socket and leaves the connection to the others, looking again every
:data:`~tigertunnel.ops.workers.balance.POLL_PAUSED` seconds. Ties accept, so equally loaded
workers race as
before. Nothing here can hold a connection back for long:

* a worker that has not written its slot for :data:`~tigertunnel.ops.workers.balance.STALE_NS`
  (hung,
  starved of CPU, stopped) is left out of every decision;
* a worker that exits is withdrawn by its supervisor at once;
* a worker that cannot serve a pair (a client worker without an established
  pool connection, a stopping one) writes :data:`NOT_ACCEPTING` and leaves
  that pair's connections to any live worker that can; with none, it takes
  them itself (and refuses them, as one process would).

The board is advisory. Two workers may decide at once and one of them finds
nothing to accept; a slot read while it is being written can give one wrong
decision, which the next look corrects. It carries counts and times only.

:class:`AcceptBoard` is the board over any writable buffer (pure, tested
with a ``bytearray``); :func:`create_board` and :func:`open_board` put it in
a memfd; :class:`AcceptBalancer` is the service of each worker that keeps
its slots written and resumes the sockets it paused.
"""

import mmap
import os
import struct
import time
from typing import Any, Callable, List, Optional, Protocol, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from tigertunnel.errors import ConfigError

#: One slot: connections served (or NOT_ACCEPTING), CLOCK_MONOTONIC ns of
#: the last write.
SLOT = struct.Struct("=qq")
#: The count of a worker that does not take connections on a pair now.
NOT_ACCEPTING = -1
#: A slot not written for this long is left out (nanoseconds).
STALE_NS = 1_000_000_000
#: Seconds between two writes of a worker's slots (its heartbeat).
HEARTBEAT = 0.25
#: Seconds between two looks while a socket is left to the other workers.
POLL_PAUSED = 0.02


class AcceptBoard:
    """The accept board over ``memory`` (a writable buffer shared by the
    workers of a tunnel end).

    :param pairs: proxy pairs of the tunnel end.
    :param workers: worker processes of the tunnel end.
    :param now_ns: the system-wide monotonic clock, in nanoseconds.
    :raises ValueError: ``memory`` is smaller than the board.
    """

    def __init__(self, memory: Any, pairs: int, workers: int,
                 now_ns: Callable[[], int] = time.monotonic_ns) -> None:
        if len(memory) < board_size(pairs, workers):
            raise ValueError(f"an accept board of {pairs} pairs and {workers} "
                             f"workers needs {board_size(pairs, workers)} bytes, "
                             f"not {len(memory)}")
        self.memory = memory
        self.pairs = pairs
        self.workers = workers
        self.now_ns = now_ns

    def _offset(self, pair: int, worker: int) -> int:
        if not (0 <= pair < self.pairs and 0 <= worker < self.workers):
            raise IndexError(f"no slot for pair {pair}, worker {worker}")
        return (pair * self.workers + worker) * SLOT.size

    def publish(self, pair: int, worker: int, count: Optional[int]) -> None:
        """Write ``worker``'s count on ``pair`` (``None``: not accepting)."""
        value = NOT_ACCEPTING if count is None else max(0, count)
        SLOT.pack_into(self.memory, self._offset(pair, worker), value, self.now_ns())

    def withdraw(self, worker: int) -> None:
        """Mark ``worker`` as not accepting on every pair (it exited or stops)."""
        for pair in range(self.pairs):
            SLOT.pack_into(self.memory, self._offset(pair, worker), NOT_ACCEPTING, 0)

    def read(self, pair: int, worker: int) -> Tuple[int, int]:
        """``(count, written at ns)`` of a slot."""
        count, written = SLOT.unpack_from(self.memory, self._offset(pair, worker))
        return int(count), int(written)

    def live_counts(self, pair: int, but: int) -> List[int]:
        """The counts of the workers other than ``but`` that accept on
        ``pair`` and wrote their slot within :data:`~tigertunnel.ops.workers.balance.STALE_NS`."""
        now = self.now_ns()
        counts = []
        for worker in range(self.workers):
            if worker == but:
                continue
            count, written = self.read(pair, worker)
            if count >= 0 and 0 <= now - written <= STALE_NS:
                counts.append(count)
        return counts

    def may_accept(self, pair: int, worker: int, count: Optional[int]) -> bool:
        """Whether ``worker``, serving ``count`` connections on ``pair``
        (``None``: it cannot serve now), takes the next connection: yes unless
        another live accepting worker serves fewer (or, for ``None``, unless
        any live worker accepts)."""
        others = self.live_counts(pair, worker)
        if count is None:
            return not others
        return all(count <= other for other in others)


def board_size(pairs: int, workers: int) -> int:
    """Bytes of an accept board."""
    return max(1, pairs * workers) * SLOT.size


def create_board(pairs: int, workers: int) -> Tuple[int, AcceptBoard]:
    """Worker 0: a new board in a memfd, every slot not accepting.

    :returns: the memfd (handed to the workers) and the board.
    """
    size = board_size(pairs, workers)
    fd = os.memfd_create("tigertunnel-accept-board", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        board = AcceptBoard(mmap.mmap(fd, size), pairs, workers)
    except BaseException:
        os.close(fd)
        raise
    for worker in range(workers):
        board.withdraw(worker)
    return fd, board


def open_board(fd: int, pairs: int, workers: int) -> AcceptBoard:
    """A worker: the board worker 0 handed over as descriptor ``fd``.

    :raises ConfigError: ``fd`` is not open or is too small for the board.
    """
    size = board_size(pairs, workers)
    try:
        have = os.fstat(fd).st_size
        if have < size:
            raise ConfigError(f"--worker-index: inherited descriptor {fd} holds "
                              f"{have} bytes, not an accept board of {size}")
        return AcceptBoard(mmap.mmap(fd, size), pairs, workers)
    except OSError as e:
        raise ConfigError(f"--worker-index: inherited descriptor {fd}: "
                          f"{e.strerror or e}") from None


class GatedListener(Protocol):
    """What the balancer uses of a pair's listener
    (:class:`~tigertunnel.net.listeners.ListenerService`)."""

    #: Left to the other workers by the gate until :meth:`resume`.
    paused: bool

    def resume(self) -> None:
        """Accept again after a pause."""


class BalancedPair(Protocol):
    """A proxy pair as the balancer sees it (a multiplexer)."""

    def accept_load(self) -> Optional[int]:
        """Connections this worker serves on the pair, or ``None`` when it
        cannot take one now."""


class PairGate:
    """The accept decision of one pair's listener in one worker."""

    def __init__(self, board: AcceptBoard, pair: int, worker: int,
                 owner: BalancedPair) -> None:
        self.board = board
        self.pair = pair
        self.worker = worker
        self.owner = owner
        #: Called when the listener leaves a connection to the other workers.
        self.on_pause: Callable[[], None] = lambda: None

    def publish(self) -> Optional[int]:
        """Write this worker's current count; returns it."""
        count = self.owner.accept_load()
        self.board.publish(self.pair, self.worker, count)
        return count

    def may_accept(self) -> bool:
        """Whether to take the next connection now (writes the count first)."""
        return self.board.may_accept(self.pair, self.worker, self.publish())

    def accepted(self) -> None:
        """A connection was taken: write the new count."""
        self.publish()

    def paused(self) -> None:
        """The listener stopped reading, leaving connections to the others."""
        self.on_pause()


class AcceptBalancer(Service):
    """A worker's part of the board: writes its slots every
    :data:`~tigertunnel.ops.workers.balance.HEARTBEAT` seconds, resumes a paused listener once
    the board
    gives it the turn (looking every :data:`~tigertunnel.ops.workers.balance.POLL_PAUSED`
    seconds while one
    is paused), and withdraws the worker when it stops.

    :param gates: each pair's gate with the listener it decides for.
    """

    name = "accept-balancer"

    def __init__(self, board: AcceptBoard, worker: int, clock: IReactorTime,
                 gates: Sequence[Tuple[PairGate, GatedListener]]) -> None:
        self.board = board
        self.worker = worker
        self.clock = clock
        self.gates = list(gates)
        self._call: Optional[IDelayedCall] = None
        for gate, _ in self.gates:
            gate.on_pause = self.look_soon

    def startService(self) -> None:
        super().startService()
        self.tick()

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.board.withdraw(self.worker)
        return None

    def look_soon(self) -> None:
        """A listener paused: look again within
        :data:`~tigertunnel.ops.workers.balance.POLL_PAUSED`."""
        call = self._call
        if (call is not None and call.active()
                and call.getTime() - self.clock.seconds() > POLL_PAUSED):
            call.cancel()
            self._call = self.clock.callLater(POLL_PAUSED, self.tick)

    def tick(self) -> None:
        """Write every slot, resume the listeners whose turn it is, and
        schedule the next look."""
        self._call = None
        if not self.running:
            return
        paused = False
        for gate, listener in self.gates:
            count = gate.publish()
            if listener.paused:
                if self.board.may_accept(gate.pair, self.worker, count):
                    listener.resume()
                else:
                    paused = True
        self._call = self.clock.callLater(POLL_PAUSED if paused else HEARTBEAT,
                                          self.tick)
