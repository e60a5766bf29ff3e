"""File-descriptor exhaustion (EMFILE on accept) is survived.

Real processes on 127.0.0.1: an echo backend (``python -m tigertunnel.tools.echo``),
a tunnel server and a tunnel client (the ``tigertunnel server|client``
console script, logging to stderr), one of the two ends started with a low
``RLIMIT_NOFILE`` (:func:`procs.with_fd_limit`). The test holds a few
established TB connections (the *veterans*), then opens more connections to
the limited end's listener than its descriptors allow: TB connections to the
client's listener, raw TCP connections (that never send a hello) to the
server's, from :data:`SOURCES` addresses (the server admits at most 16
pending handshakes per IPv4 address, so from one address the flood would
be evicted before it could use up the descriptors). It then checks:

1. the process keeps running and does not spin: its CPU time over a second
   in which more excess connections arrive, read from ``/proc/<pid>/stat``,
   stays under :data:`MAX_CPU_FRACTION` of that second;
2. the veterans keep echoing frames (on the client, so do the excess TB
   connections it accepted), and a TB connection made while the server is
   flooded is closed promptly or served (never left hanging);
3. the log does not grow with the number of refused connections: at most
   :data:`MAX_EMFILE_LINES` lines about descriptor exhaustion in all, and at
   least one (the operator must learn why connections are refused);
4. once the excess connections are closed, new TB connections work again.

Each test prints what it measured (lines starting ``[emfile ...]``) and
appends them to ``emfile-measurements.txt`` in trial's working directory.
"""

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, List, Sequence

from twisted.internet import defer, task
from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.tbpeers import TBPeer, digest, filler, make_frame, tb_connect
from tigertunnel.keys.generate import keygen

#: RLIMIT_NOFILE of the limited tunnel end. An idle end holds about a dozen
#: descriptors, so some 50 connections fit before accept() fails.
FD_LIMIT = 64
#: Established TB connections that must keep working throughout.
VETERANS = 4
#: Connections of the first wave beyond what the limited end can accept.
FIRST_WAVE_EXCESS = 8
#: Connections opened after the limited end is saturated, while its CPU time
#: is measured. With the first wave's excess this stays within the listen
#: backlog (50), so every connect() completes even if the end stops
#: accepting and the test can measure what it does then.
SECOND_WAVE = 40
#: Connections opened at once (the listen backlog is 50).
BATCH = 20
#: Seconds within which anything the test waits for must happen.
DEADLINE = 5.0
#: The window over which the CPU time is measured, in seconds.
CPU_WINDOW = 1.0
#: A process that spins on a readable listener uses about 1.0.
MAX_CPU_FRACTION = 0.5
#: Required bound on log lines about descriptor exhaustion, however many
#: connections were refused (about fifty here).
MAX_EMFILE_LINES = 4
#: Source addresses of the flood of raw connections to a tunnel server.
SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]
#: What marks a log line as being about descriptor exhaustion.
EMFILE_MARKERS = ("emfile", "file descriptor", "too many open files")


def _reactor() -> Any:
    from twisted.internet import reactor
    return reactor


def record(label: str, text: str) -> None:
    """Print a measurement and append it to ``emfile-measurements.txt``."""
    line = f"[emfile {label}] {text}"
    print(line)
    with open("emfile-measurements.txt", "a") as f:
        f.write(line + "\n")


def emfile_lines(output: str) -> List[str]:
    """The log lines of ``output`` that are about descriptor exhaustion."""
    return [line for line in output.splitlines()
            if any(marker in line.lower() for marker in EMFILE_MARKERS)]


def established(pid: int, port: int) -> int:
    """How many ESTABLISHED TCP sockets ``pid`` holds with local port ``port``."""
    return sum(1 for s in procs.tcp_sockets(pid)
               if s.state == "ESTABLISHED" and s.local_port == port)


async def connect_many(port: int, count: int,
                       sources: Sequence[str] = ("127.0.0.1",)) -> List[TBPeer]:
    """Open ``count`` connections to ``port`` from ``sources`` in turn, :data:`BATCH` at a time."""
    peers: List[TBPeer] = []
    while len(peers) < count:
        batch = [defer.ensureDeferred(tb_connect(port, DEADLINE,
                                                 sources[(len(peers) + i) % len(sources)]))
                 for i in range(min(BATCH, count - len(peers)))]
        peers += await defer.gatherResults(batch, consumeErrors=True)
    return peers


async def echo(peer: TBPeer, tag: int) -> float:
    """Send one 1 KiB TB frame on ``peer``; return the seconds until it came back."""
    count = len(peer.digests)
    frame = make_frame(filler(768, tag), tag)
    started = time.monotonic()
    peer.send(frame)
    await peer.wait_frames(count + 1, DEADLINE)
    if peer.digests[count] != digest(frame):
        raise AssertionError(f"the echo of frame {tag} is not byte-identical")
    return time.monotonic() - started


async def pause(seconds: float) -> None:
    """Let the reactor run for ``seconds`` (only to measure over a window)."""
    await task.deferLater(_reactor(), seconds, lambda: None)


class Ends:
    """An echo backend, a tunnel server and a tunnel client, as child processes.

    :ivar limited: ``"server"`` or ``"client"``: the end started with
        :data:`FD_LIMIT` descriptors.
    """

    def __init__(self, case: TestCase, limited: str) -> None:
        self.case = case
        self.limited = limited
        self.dir = procs.fresh_dir(case.mktemp())
        self.psk = os.path.join(self.dir, "psk.key")
        keygen(self.psk)
        self.backend_port, self.server_port, self.client_port = procs.free_ports(3)
        self.children: List[procs.Child] = []
        self.peers: List[TBPeer] = []
        case.addCleanup(self.stop)

    def _command(self, role: str, args: Sequence[str]) -> List[str]:
        command = [procs.executable("tigertunnel"), role, *args]
        if role == self.limited:
            return procs.with_fd_limit(command, FD_LIMIT)
        return command

    def _spawn(self, args: Sequence[str]) -> procs.Child:
        child = procs.spawn(args)
        self.children.append(child)
        return child

    async def start(self) -> "Ends":
        """Start the three processes; return once the client's pool is up."""
        self.echo = self._spawn([sys.executable, "-m", "tigertunnel.tools.echo",
                                 str(self.backend_port)])
        self.server = self._spawn(self._command("server", [
            "-p", f"127.0.0.1:{self.server_port},127.0.0.1:{self.backend_port}",
            "-k", self.psk, "--handshake-timeout", "30"]))
        await procs.wait_for_output(self.server, f"starting on {self.server_port}",
                                    DEADLINE * 2)
        self.client = self._spawn(self._command("client", [
            "-p", f"127.0.0.1:{self.client_port},127.0.0.1:{self.server_port}",
            "-k", self.psk, "-n", "2"]))
        await procs.wait_until(
            lambda: self.client.output.count(" up (key id ") >= 2
            or not self.client.running, DEADLINE * 2, "the client's 2 pool connections")
        self.case.assertTrue(self.client.running, self.client.output[-2000:])
        return self

    @property
    def target(self) -> procs.Child:
        """The limited end."""
        return self.server if self.limited == "server" else self.client

    @property
    def target_port(self) -> int:
        """The listening port of the limited end."""
        return self.server_port if self.limited == "server" else self.client_port

    async def tb_client(self) -> TBPeer:
        """Connect a TB client to the tunnel client (closed in the cleanup)."""
        peer = await tb_connect(self.client_port, DEADLINE)
        self.peers.append(peer)
        return peer

    async def stop(self) -> None:
        """Close every test-side connection, kill the processes, keep their logs.

        Each child's output is left in ``<role>.log`` in the test's directory.
        """
        for peer in self.peers:
            if not peer.is_lost:
                peer.transport.abortConnection()
        for child in reversed(self.children):
            await child.kill(signal.SIGKILL)
        for role, child in zip(("echo", "server", "client"), self.children):
            with open(os.path.join(self.dir, f"{role}.log"), "w") as f:
                f.write(child.output)


@dataclass(frozen=True)
class Exhaustion:
    """What one run of :meth:`EmfileTests.exhaust` left to check.

    :ivar refused: excess connections the limited end closed at once.
    :ivar emfile_lines: its log lines about descriptor exhaustion.
    """

    limited: str
    refused: int
    emfile_lines: List[str]


class EmfileTests(TestCase):
    """A tunnel end out of descriptors keeps serving, logs briefly and recovers."""

    timeout = 60

    async def exhaust(self, limited: str) -> "Exhaustion":
        """Exhaust the descriptors of the ``limited`` end; check requirements 1, 2 and 4.

        :returns: what requirement 3 is checked on.
        """
        ends = await Ends(self, limited).start()
        target, port = ends.target, ends.target_port
        label = f"{limited} listener, {FD_LIMIT} descriptors"

        veterans = [await ends.tb_client() for _ in range(VETERANS)]
        for i, peer in enumerate(veterans):
            await echo(peer, i)
        idle_fds = procs.fd_count(target.pid)
        idle_established = established(target.pid, port)

        def resolved(peers: List[TBPeer]) -> bool:
            """Every excess connection was either accepted or closed by the end."""
            accepted = established(target.pid, port) - idle_established
            return accepted + sum(p.is_lost for p in peers) >= len(peers)

        sources = SOURCES if limited == "server" else ["127.0.0.1"]
        # First wave: a few more connections than the end has descriptors left.
        first = await connect_many(port, FD_LIMIT - idle_fds + FIRST_WAVE_EXCESS, sources)
        ends.peers += first
        await procs.wait_until(
            lambda: resolved(first) or procs.fd_count(target.pid) >= FD_LIMIT,
            DEADLINE, f"the {limited} to use all its descriptors")

        # Second wave, while the CPU time is measured.
        lines_before = len(emfile_lines(target.output))
        cpu_before = procs.cpu_seconds(target.pid)
        started = time.monotonic()
        second = await connect_many(port, SECOND_WAVE, sources)
        ends.peers += second
        await pause(max(0.0, CPU_WINDOW - (time.monotonic() - started)))
        self.assertTrue(target.running and procs.pid_running(target.pid),
                        f"the {limited} died: {target.output[-2000:]}")
        cpu = procs.cpu_seconds(target.pid) - cpu_before
        window = time.monotonic() - started
        record(label, f"CPU {cpu:.3f} s over {window:.2f} s while {len(second)} more "
                      f"connections arrived; still running")
        self.assertLess(cpu / window, MAX_CPU_FRACTION,
                        f"the {limited} used {cpu:.2f} CPU-s in {window:.2f} s "
                        f"(spinning on its listener?); every excess connection "
                        f"accepted or closed: {resolved(first) and resolved(second)}")
        await procs.wait_until(lambda: resolved(first), DEADLINE,
                               "every connection of the first wave accepted or closed")
        refused_first = sum(p.is_lost for p in first)
        await procs.wait_until(lambda: resolved(second), DEADLINE,
                               "every connection of the second wave accepted or closed")
        lines_second = len(emfile_lines(target.output)) - lines_before
        excess = first + second
        held = [p for p in excess if not p.is_lost]
        refused = len(excess) - len(held)
        record(label, f"{len(first)} + {len(second)} excess connections: "
                      f"{len(held)} accepted and held, {refused_first} + "
                      f"{refused - refused_first} closed at once by the end; "
                      f"descriptors {idle_fds} idle, {procs.fd_count(target.pid)} "
                      f"exhausted (limit {FD_LIMIT})")
        self.assertGreater(refused_first, 0, "the limit was never reached")

        # The veterans (and, on the client, the accepted excess sessions) still echo.
        rtts = [await echo(peer, 100 + i) for i, peer in enumerate(veterans)]
        if limited == "client":
            rtts += [await echo(peer, 200 + i) for i, peer in enumerate(held)]
        record(label, f"{len(rtts)} held sessions echoed while exhausted, "
                      f"max RTT {max(rtts) * 1000:.1f} ms")
        if limited == "server":
            await self.late_session(ends, label)

        # Closing the excess connections gives the descriptors back.
        closed_at = time.monotonic()
        for peer in excess:
            if not peer.is_lost:
                peer.transport.abortConnection()
        await procs.wait_until(lambda: procs.fd_count(target.pid) <= idle_fds,
                               DEADLINE, f"the {limited} to close the excess connections")
        freed_at = time.monotonic()
        fresh = [await ends.tb_client() for _ in range(VETERANS)]
        for i, peer in enumerate(fresh):
            await echo(peer, 300 + i)
        recovered_at = time.monotonic()
        record(label, f"recovery: descriptors back to {procs.fd_count(target.pid)} "
                      f"{(freed_at - closed_at) * 1000:.0f} ms after the close, "
                      f"{VETERANS} new TB connections echoed "
                      f"{(recovered_at - closed_at) * 1000:.0f} ms after it")

        output = target.output
        lines = emfile_lines(output)
        kinds = sorted({line.partition("] ")[2].split(" from ")[0] for line in lines})
        record(label, f"log: {len(output.splitlines())} lines in all, "
                      f"{len(lines)} about EMFILE for {refused} refused "
                      f"connections ({lines_second} of them logged while the "
                      f"{len(second)} of the second wave arrived); distinct "
                      f"messages: {kinds}")
        self.assertNotIn("Traceback", output)
        return Exhaustion(limited, refused, lines)

    async def late_session(self, ends: Ends, label: str) -> None:
        """A TB connection opened while the server is flooded is closed promptly, or served.

        The flood is silent connects from one address, so the server's fair
        admission evicts most of them (16 pending per source) and may have
        descriptors again for the session's backend; either way the
        session must not hang.
        """
        before = len(ends.server.output.splitlines())
        late = await ends.tb_client()
        started = time.monotonic()
        frame = make_frame(filler(768, 400), 400)
        late.send(frame)
        await procs.wait_until(lambda: late.is_lost or late.digests == [digest(frame)],
                               DEADLINE, "the late TB connection to be closed or served")
        outcome = "served (its frame echoed)" if late.digests else "closed"
        if not late.is_lost:
            late.transport.loseConnection()
            await late.wait_lost(DEADLINE)
        new_lines = ends.server.output.splitlines()[before:]
        record(label, f"a TB connection made while the server was flooded: "
                      f"{outcome} after {(time.monotonic() - started) * 1000:.0f} ms; "
                      f"server log: {new_lines}")

    def assert_log_bounded(self, run: "Exhaustion") -> None:
        """Check requirement 3 on what :meth:`exhaust` measured."""
        lines = run.emfile_lines
        self.assertGreater(len(lines), 0,
                           f"the {run.limited} refused connections without saying why")
        self.assertLessEqual(
            len(lines), MAX_EMFILE_LINES,
            f"the {run.limited} logged {len(lines)} lines about EMFILE for "
            f"{run.refused} refused connections (required: at most "
            f"{MAX_EMFILE_LINES}, however many), e.g. {lines[:3] + lines[-2:]}")

    async def test_client_survives(self) -> None:
        """A tunnel client out of descriptors stays up without spinning, keeps its TB sessions echoing and accepts TB connections again once descriptors are freed."""
        await self.exhaust("client")

    async def test_client_log_bounded(self) -> None:
        """A tunnel client refusing TB connections for lack of descriptors logs it a bounded number of times, not once per connection."""
        self.assert_log_bounded(await self.exhaust("client"))

    async def test_server_survives(self) -> None:
        """A tunnel server flooded past its descriptor limit stays up without spinning, keeps its sessions echoing, closes new sessions promptly and serves new TB connections again once descriptors are freed."""
        await self.exhaust("server")

    async def test_server_log_bounded(self) -> None:
        """A tunnel server refusing connections for lack of descriptors logs it a bounded number of times, not once per connection."""
        self.assert_log_bounded(await self.exhaust("server"))
