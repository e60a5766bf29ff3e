"""The benchmark's load generator: closed-loop TB sessions on one path.

A :class:`LoadRun` opens N sessions to a port (the echo backend directly, or
the tunnel client), then keeps exactly one TB frame in flight per session
until the measured time or byte budget is used up: send, wait for the echo,
check it byte for byte, send again. Round-trip times are taken with
``time.perf_counter`` around each echo.
"""

import resource
import time
from functools import partial
from typing import Dict, List, Optional

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from tigertunnel.net.sockets import tune_socket
from tigertunnel.tools.tbframes import sized_tb_frame
from tigertunnel.wire.implementation import ACTIVE


def own_cpu() -> float:
    """This process's user+system CPU seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Session(Protocol):
    """Closed loop: one frame in flight, each echo checked byte for byte."""

    def __init__(self, run: "LoadRun", frame: bytes) -> None:
        self.run = run
        self.frame = frame
        self.parser = ACTIVE.FrameParser()
        self.sent_at = 0.0

    def connectionMade(self) -> None:
        tune_socket(self.transport)
        self.run.connected(self)

    def send(self) -> None:
        """Send the session's frame and start its round-trip clock."""
        self.sent_at = time.perf_counter()
        if self.transport is not None:
            self.transport.write(self.frame)

    def close(self) -> None:
        """Close the session's connection."""
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        for echo in self.parser.feed(data):
            if echo != self.frame:
                self.run.fail("an echoed frame differs from the one sent")
                return
            self.run.completed(self, time.perf_counter() - self.sent_at)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.run.lost(self, reason)


class LoadRun:
    """One measured workload on one path (direct or tunnel).

    :param size: the TB frame size of every session.
    :param sessions: concurrent sessions, each with its own frame.
    :param seconds: how long to measure once every session is connected.
    :param max_bytes: stop earlier once this many bytes went both ways.
    """

    def __init__(self, reactor: IReactorTCP, port: int, size: int, sessions: int,
                 seconds: float, max_bytes: int) -> None:
        self.reactor = reactor
        self.port = port
        self.size = size
        self.count = sessions
        self.seconds = seconds
        self.max_rt = max(sessions, max_bytes // (2 * size))
        self.sessions: List[Session] = []
        self.rtts: List[float] = []
        self.done: "defer.Deferred[None]" = defer.Deferred()
        self.stopping = False
        self.error: Optional[str] = None
        self.start = 0.0
        self.deadline = 0.0
        self.elapsed = 0.0

    async def go(self) -> None:
        """Connect the sessions, run until the deadline, close them.

        :raises RuntimeError: an echo differed or a session was closed.
        """
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
        for i in range(self.count):
            frame = sized_tb_frame(self.size, i + 1)
            await endpoint.connect(Factory.forProtocol(partial(Session, self, frame)))
        await self.done
        for session in self.sessions:
            session.close()
        if self.error:
            raise RuntimeError(self.error)

    def connected(self, session: Session) -> None:
        """A session is connected; the last one starts the measurement."""
        self.sessions.append(session)
        if len(self.sessions) == self.count:
            self.start = time.perf_counter()
            self.deadline = self.start + self.seconds
            for s in self.sessions:
                s.send()

    def _finish(self) -> None:
        self.stopping = True
        self.elapsed = time.perf_counter() - self.start
        self.done.callback(None)

    def completed(self, session: Session, rtt: float) -> None:
        """A round trip of ``session`` took ``rtt`` seconds."""
        if self.stopping:
            return
        self.rtts.append(rtt)
        if time.perf_counter() >= self.deadline or len(self.rtts) >= self.max_rt:
            self._finish()
            return
        session.send()

    def fail(self, message: str) -> None:
        """End the run with an error."""
        self.error = message
        if not self.done.called:
            self._finish()

    def lost(self, session: Session, reason: Optional[Failure] = None) -> None:
        """A session's connection closed (an error unless the run is over)."""
        if not self.stopping:
            why = reason.getErrorMessage() if reason is not None else "?"
            self.fail(f"a session was closed during the run ({why}; "
                      f"{len(self.rtts)} round trips done)")

    def stats(self) -> Dict[str, float]:
        """Round trips, frames/s, MB/s and round-trip p50/p99 of the run."""
        rtts = sorted(self.rtts)
        n = len(rtts)
        return {
            "round_trips": n,
            "seconds": self.elapsed,
            "frames_per_s": n / self.elapsed,
            "mb_per_s": 2 * n * self.size / self.elapsed / 1e6,
            "p50_ms": rtts[n // 2] * 1e3,
            "p99_ms": rtts[min(n - 1, int(n * 0.99))] * 1e3,
        }
