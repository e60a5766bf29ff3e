"""``tigertunnel demo``: the whole tunnel on 127.0.0.1, checked end to end.

Generates fresh keys in a temporary directory, starts a TB-frame echo
backend, a tunnel server (X-Wing KEM + PSK) and a tunnel client, all in this
process on loopback ports. Then several TB sessions push the client frames of
a real TigerBeetle 0.17.8 trace (7 requests from 304 B to 1 MiB, and a
ping) through the tunnel, and the same workload goes directly to the echo
backend for comparison. Every echoed frame must come back byte-identical and
in order; the demo prints what it measured and exits 1 on any mismatch.
"""

import os
import sys
import tempfile
import time
from functools import partial
from typing import List, Optional, Tuple, cast

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.python.failure import Failure

from tigertunnel.config.model import LISTEN_BACKLOG, ProxyPair, Role, TunnelConfig, parse_address
from tigertunnel.keys.files import (
    load_kem_public_file,
    load_kem_secret_file,
    load_psk_file,
)
from tigertunnel.interfaces import Reactor
from tigertunnel.keys.generate import kemgen, keygen
from tigertunnel.net.multiplexer import SessionMultiplexer, build_service
from tigertunnel.tools.echo import EchoFactory
from tigertunnel.tools.options import ExampleOptions
from tigertunnel.tools.ports import free_port
from tigertunnel.tools.traces import SINGLE, load_trace
from tigertunnel.wire.implementation import ACTIVE


class DemoOptions(ExampleOptions):
    """Options of ``tigertunnel demo``."""

    synopsis = "[--sessions N] [--rounds N]"
    longdesc = ("Loopback demo: fresh keys, an echo backend, a tunnel server "
                "and client on 127.0.0.1, real TigerBeetle frames checked byte "
                "for byte.")
    examples = """Examples:
  tigertunnel demo
  tigertunnel demo --sessions 32 --rounds 5"""

    optParameters = [
        ["sessions", "s", "8", "Concurrent TB sessions."],
        ["rounds", "r", "3", "Times each session replays the trace."],
    ]

    def postOptions(self) -> None:
        for name in ("sessions", "rounds"):
            text = self[name]
            if not (text.isdigit() and int(text) >= 1):
                raise usage.UsageError(f"--{name} must be a whole number of at "
                                       f"least 1, not {text!r}")
            self[name] = int(text)


class _Replayer(Protocol):
    """A TB client that sends frames one at a time and checks each echo."""

    def __init__(self, frames: List[bytes], rounds: int,
                 done: "defer.Deferred[Tuple[int, int, List[float]]]") -> None:
        self._frames = frames * rounds
        self._parser = ACTIVE.FrameParser()
        self._done = done
        self._index = 0
        self._sent_at = 0.0
        self.rtts: List[float] = []
        self.bytes = 0

    def connectionMade(self) -> None:
        ITCPTransport(self.transport).setTcpNoDelay(True)
        self._send()

    def _send(self) -> None:
        self._sent_at = time.perf_counter()
        if self.transport is not None:
            self.transport.write(self._frames[self._index])

    def dataReceived(self, data: bytes) -> None:
        for frame in self._parser.feed(data):
            if frame != self._frames[self._index]:
                self._finish(RuntimeError(f"frame {self._index} came back "
                                          f"different"))
                return
            self.rtts.append(time.perf_counter() - self._sent_at)
            self.bytes += 2 * len(frame)
            self._index += 1
            if self._index == len(self._frames):
                self._finish(None)
                return
            self._send()

    def _finish(self, error: Optional[Exception]) -> None:
        if self._done.called:
            return
        if self.transport is not None:
            self.transport.loseConnection()
        if error is None:
            self._done.callback((self._index, self.bytes, self.rtts))
        else:
            self._done.errback(error)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        if not self._done.called:
            self._done.errback(RuntimeError(
                f"connection closed after {self._index} of "
                f"{len(self._frames)} frames"))


async def _workload(reactor: IReactorTCP, port: int, frames: List[bytes],
                    sessions: int, rounds: int) -> Tuple[int, int, float, List[float]]:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    waits = []
    start = time.perf_counter()
    for _ in range(sessions):
        done: defer.Deferred[Tuple[int, int, List[float]]] = defer.Deferred()
        factory = Factory.forProtocol(partial(_Replayer, frames, rounds, done))
        await endpoint.connect(factory)
        waits.append(done)
    results = await defer.gatherResults(waits, consumeErrors=True)
    elapsed = time.perf_counter() - start
    count = sum(r[0] for r in results)
    nbytes = sum(r[1] for r in results)
    rtts = sorted(x for r in results for x in r[2])
    return count, nbytes, elapsed, rtts


async def _wait_links(clock: IReactorTime, service: MultiService, need: int) -> None:
    muxes = [m for m in service if isinstance(m, SessionMultiplexer)]
    for _ in range(200):
        if all(len(m.pool_connections) >= need for m in muxes):
            return
        await task.deferLater(clock, 0.05, lambda: None)
    raise RuntimeError("pool connections did not come up")


async def run_demo(reactor: IReactorTCP, sessions: int, rounds: int) -> int:
    """Run the demo; returns the exit status."""
    frames = [f.data for f in load_trace(SINGLE) if f.dir == "up"]
    with tempfile.TemporaryDirectory() as tmp:
        key = os.path.join(tmp, "secret.key")
        kem = os.path.join(tmp, "server-kem")
        keygen(key)
        kemgen(kem)
        psk = load_psk_file(key)
        echo_port = free_port()
        server_port = free_port()
        client_port = free_port()
        echo = await TCP4ServerEndpoint(reactor, echo_port, backlog=LISTEN_BACKLOG,
                                        interface="127.0.0.1").listen(EchoFactory())
        server_cfg = TunnelConfig(
            Role.SERVER, [ProxyPair(0, parse_address(f"127.0.0.1:{server_port}", ""),
                                 parse_address(f"127.0.0.1:{echo_port}", ""))],
            psk=psk, kem_secret=load_kem_secret_file(kem + ".key"))
        client_cfg = TunnelConfig(
            Role.CLIENT, [ProxyPair(0, parse_address(f"127.0.0.1:{client_port}", ""),
                                 parse_address(f"127.0.0.1:{server_port}", ""))],
            psk=psk, kem_public=load_kem_public_file(kem + ".pub"))
        server = build_service(server_cfg, cast(Reactor, reactor))
        client = build_service(client_cfg, cast(Reactor, reactor))
        server.startService()
        client.startService()
        try:
            await _wait_links(IReactorTime(reactor), client, client_cfg.pool_size)
            print(f"tigertunnel demo: echo backend 127.0.0.1:{echo_port}, "
                  f"tunnel server 127.0.0.1:{server_port} (X-Wing + PSK), "
                  f"tunnel client 127.0.0.1:{client_port} "
                  f"({client_cfg.pool_size} pool connections)")
            print(f"workload: {sessions} sessions x {rounds} rounds x "
                  f"{len(frames)} frames of a real TigerBeetle 0.17.8 trace "
                  f"({min(map(len, frames))} B to {max(map(len, frames))} B)")
            direct = await _workload(reactor, echo_port, frames, sessions, rounds)
            tunnel = await _workload(reactor, client_port, frames, sessions, rounds)
        finally:
            await client.stopService()
            await server.stopService()
            await echo.stopListening()
    for name, (count, nbytes, elapsed, rtts) in (("direct", direct),
                                                 ("tunnel", tunnel)):
        p50 = rtts[len(rtts) // 2] * 1e3
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e3
        print(f"{name:>7}: {count} frames echoed byte-identical in "
              f"{elapsed:.2f} s, {nbytes / elapsed / 1e6:.1f} MB/s, "
              f"round trip p50 {p50:.2f} ms p99 {p99:.2f} ms")
    ratio = (tunnel[1] / tunnel[2]) / (direct[1] / direct[2])
    print(f"tunnel/direct throughput ratio: {ratio:.2f} (same run)")
    print("OK: every frame came back byte-identical and in order")
    return 0


def run(opts: DemoOptions) -> int:
    """Run the demo with parsed options on the global reactor.

    :returns: the exit status: 0 when every frame came back, else 1.
    """
    status: List[int] = [1]

    async def go(reactor: IReactorTCP) -> None:
        try:
            status[0] = await run_demo(reactor, opts["sessions"], opts["rounds"])
        except Exception as e:  # report, never a traceback for the user
            sys.stderr.write(f"tigertunnel: error: demo failed: {e}\n")
            status[0] = 1

    try:
        task.react(lambda r: defer.ensureDeferred(go(r)), [])
    except SystemExit:  # react() always exits; our status is in status[0]
        pass
    return status[0]
