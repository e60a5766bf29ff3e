"""The surviving tunnel end reaps every session and socket of a dead, vanished or hung peer.
"""

import os
import signal
import time
from typing import List, Tuple

from twisted.trial.unittest import SkipTest, TestCase

from tests.integration import procs
from tests.integration.faults import Fault
from tests.integration.tbpeers import ScriptedBackend, TBPeer, backend_command, filler, make_frame
from tests.integration.tunnels import (
    DEAD_PEER_BUDGET,
    DEADLINE,
    LONG,
    Daemons,
    InProcessTunnel,
    all_lost,
    close_wait,
    echo_rtt,
    established,
    fd_listing,
    listening_backend,
    ms,
    open_sessions,
    record,
    steady_fd_count,
)


class BlackHoleNet:
    """A network namespace joined to ours by a veth pair whose link can be cut.

    Cutting the link (``ip link set down`` inside the namespace) makes the
    peers on either side vanish without FIN or RST: only TCP keepalive and
    ``TCP_USER_TIMEOUT`` can find out. Uses 198.18.77.0/30 (RFC 2544
    benchmarking addresses); needs root and iproute2. Everything is removed
    in a cleanup.
    """

    host_ip = "198.18.77.1"
    server_ip = "198.18.77.2"

    def __init__(self, name: str) -> None:
        self.name = name
        self.host_link = f"{name}h"
        self.ns_link = f"{name}s"
        self.exec_prefix = ["ip", "netns", "exec", name]

    @staticmethod
    async def ip(*args: str) -> procs.Result:
        """Run ``ip ARGS``."""
        return await procs.run(["ip", *args], timeout=10)

    @classmethod
    async def create(cls, case: TestCase) -> "BlackHoleNet":
        """Build the namespace and the veth pair, or skip the test when impossible."""
        if os.geteuid() != 0 or not os.path.exists("/usr/sbin/ip") and not \
                os.path.exists("/sbin/ip") and not os.path.exists("/usr/bin/ip"):
            raise SkipTest("needs root and iproute2")
        net = cls(f"tt{os.getpid() % 100000}")
        case.addCleanup(net.remove)
        steps = [
            ("netns", "add", net.name),
            ("link", "add", net.host_link, "type", "veth", "peer", "name", net.ns_link,
             "netns", net.name),
            ("addr", "add", f"{net.host_ip}/30", "dev", net.host_link),
            ("link", "set", net.host_link, "up"),
            ("-n", net.name, "addr", "add", f"{net.server_ip}/30", "dev", net.ns_link),
            ("-n", net.name, "link", "set", net.ns_link, "up"),
            ("-n", net.name, "link", "set", "lo", "up"),
        ]
        for step in steps:
            result = await cls.ip(*step)
            if result.status != 0:
                raise SkipTest(f"cannot build a network namespace: ip {' '.join(step)}: "
                               f"{result.stderr.strip()}")
        return net

    async def cut(self) -> None:
        """Take the namespace's end of the link down: packets vanish silently."""
        result = await self.ip("-n", self.name, "link", "set", self.ns_link, "down")
        if result.status != 0:
            raise AssertionError(result.describe())

    async def remove(self) -> None:
        """Delete the veth pair and the namespace."""
        await self.ip("link", "del", self.host_link)
        await self.ip("netns", "del", self.name)


class DeadPeerTests(TestCase):
    """The surviving tunnel end reaps everything of a stopped, killed or vanished peer."""

    timeout = 120

    async def started(self, sessions: int) -> Tuple[Daemons, ScriptedBackend, List[TBPeer]]:
        """Daemons with an in-process echo backend and ``sessions`` open sessions."""
        backend = listening_backend(self)
        d = await Daemons(self, backend.port_number).start()
        peers = await open_sessions(d, backend, sessions)
        return d, backend, peers

    def check_keepalive(self, pid: int, port: int, local: bool) -> None:
        """The pool connections of ``pid`` have TCP keepalive armed (how a silent peer is found)."""
        pool = established(pid, port, local)
        self.assertTrue(pool)
        for s in pool:
            self.assertIn(s.timer, (1, 2), f"pool socket without keepalive timer: {s}")

    async def test_server_restarted(self) -> None:
        """When the tunnel server restarts, the client closes every TB session of the old pool, then serves new ones."""
        d, backend, peers = await self.started(20)
        assert d.server_pid is not None and d.client_pid is not None
        self.check_keepalive(d.client_pid, d.server_port, local=False)
        self.check_keepalive(d.server_pid, d.server_port, local=True)
        stopped_at = time.monotonic()
        self.assertTrue(await procs.stop_pid(d.server_pid, timeout=10))
        last = await all_lost(peers, DEADLINE, "TB sessions after the server stopped")
        await procs.wait_until(
            lambda: not established(d.client_pid, d.client_port)  # type: ignore
            and not close_wait(d.client_pid), DEADLINE,  # type: ignore
            "the client to hold no TB socket and no CLOSE-WAIT")
        reaped = time.monotonic() - stopped_at
        await procs.wait_until(lambda: not backend.open_connections, DEADLINE,
                               "the backend connections of the stopped server to close")
        await d.start_server()
        restarted_at = time.monotonic()
        await d.pool_up()
        pool_back = time.monotonic() - restarted_at
        fresh = await open_sessions(d, backend, 5)
        self.assertEqual([len(p.digests) for p in fresh], [1] * 5)
        record("dead peers",
               f"tunnel server stopped (SIGTERM) under 20 sessions: the client closed "
               f"every TB connection {ms(last - stopped_at)} after, held no TB socket "
               f"and no CLOSE-WAIT after {ms(reaped)}; after the restart the pool was "
               f"back in {ms(pool_back)} and 5 new sessions worked")

    async def test_client_killed(self) -> None:
        """When the tunnel client is killed with SIGKILL, the server closes every backend connection and pool socket of it."""
        backend = listening_backend(self)
        d = Daemons(self, backend.port_number)
        self.addCleanup(d.stop)
        await d.start_server()
        assert d.server_pid is not None
        idle_fds = await steady_fd_count(d.server_pid)
        await d.start_client()
        assert d.client_pid is not None
        peers = await open_sessions(d, backend, 20)
        busy_fds = procs.fd_count(d.server_pid)
        killed_at = time.monotonic()
        os.kill(d.client_pid, signal.SIGKILL)
        await procs.wait_until(lambda: not procs.pid_running(d.client_pid),  # type: ignore
                               DEADLINE, "the client to die")
        d.client_pid = None
        await procs.wait_until(lambda: not backend.open_connections, DEADLINE,
                               "the server to close the backend connections")
        backends_closed = max(c.lost_at for c in backend.connections) - killed_at  # type: ignore
        await procs.wait_until(
            lambda: procs.fd_count(d.server_pid) == idle_fds  # type: ignore
            and not close_wait(d.server_pid), DEADLINE,  # type: ignore
            f"the server's descriptors to return to {idle_fds} (now "
            f"{fd_listing(d.server_pid)}; {procs.tcp_sockets(d.server_pid)})")
        reaped = time.monotonic() - killed_at
        states = sorted(s.state for s in procs.tcp_sockets(d.server_pid))
        self.assertEqual(states, ["LISTEN"])
        await all_lost(peers, DEADLINE, "TB clients of the killed client")
        record("dead peers", f"tunnel client SIGKILLed under 20 sessions: the server closed all 20 "
               f"backend connections {ms(backends_closed)} after the kill; its "
               f"descriptors went from {busy_fds} back to {idle_fds} (idle) and its "
               f"TCP sockets to {states} after {ms(reaped)}")

    async def test_black_holed_peer(self) -> None:
        """A tunnel server that vanishes without FIN (its network link cut) is found by TCP keepalive: the client reaps every session within the dead-peer budget."""
        if not LONG:
            raise SkipTest("long variant: set TIGERTUNNEL_LONG=1 (about 20 s; needs root "
                           "and iproute2 for a network namespace)")
        net = await BlackHoleNet.create(self)
        backend_port = procs.free_ports(1)[0]
        backend = procs.spawn(net.exec_prefix + backend_command(backend_port))
        self.addCleanup(backend.kill)
        await procs.wait_for_output(backend, "listening", 10)
        d = Daemons(self, backend_port, server_prefix=net.exec_prefix,
                    server_host=net.server_ip)
        self.addCleanup(d.stop)
        await d.start_server()
        await d.start_client()
        assert d.client_pid is not None and d.server_pid is not None
        peers = []
        for i in range(20):
            peer = await d.tb_client()
            peer.send(make_frame(filler(300 + i, i), i))
            peers.append(peer)
        for peer in peers:
            await peer.wait_frames(1, DEADLINE)
        server_pid = d.server_pid

        def backend_sockets() -> List[procs.TcpSocket]:
            return [s for s in procs.tcp_sockets(server_pid)
                    if s.remote_port == backend_port and s.state == "ESTABLISHED"]

        self.assertEqual(len(backend_sockets()), 20)
        self.check_keepalive(d.client_pid, d.server_port, local=False)
        holed_at = time.monotonic()
        await net.cut()
        last = await all_lost(peers, DEAD_PEER_BUDGET, "TB sessions after the black hole")
        await procs.wait_until(
            lambda: not established(d.client_pid, d.server_port, local=False)  # type: ignore
            and not established(d.client_pid, d.client_port), 5,  # type: ignore
            "the client's pool and TB sockets to go")
        client_reaped = time.monotonic() - holed_at
        await procs.wait_until(lambda: not backend_sockets(), DEAD_PEER_BUDGET,
                               "the cut-off server to close its backend connections")
        server_reaped = time.monotonic() - holed_at
        record("dead peers",
               f"black-holed tunnel server (veth link down, no FIN) under 20 sessions: "
               f"the client closed every TB connection {ms(last - holed_at)} after the "
               f"cut and held no pool or TB socket after {ms(client_reaped)}; the "
               f"cut-off server closed its 20 backend connections after "
               f"{ms(server_reaped)} (budget {DEAD_PEER_BUDGET:.0f} s)")
        self.assertLessEqual(last - holed_at, DEAD_PEER_BUDGET)


class HungPeerTests(TestCase):
    """A peer whose kernel still answers but whose application is hung (long variant)."""

    timeout = 120

    async def test_hung_pool_connection_under_load(self) -> None:
        """A pool connection whose far end stops reading (kernel alive, no FIN) is aborted by TCP_USER_TIMEOUT once data is stuck, and its sessions are reaped."""
        if not LONG:
            raise SkipTest("long variant: set TIGERTUNNEL_LONG=1 (about 25 s)")
        t = await InProcessTunnel(self, faults=lambda i: (Fault(), Fault())).start()
        idle, idle_backend = await t.session()
        busy, busy_backend = await t.session()
        await echo_rtt(idle, 1)
        await echo_rtt(busy, 2)
        assert t.proxy is not None
        link = t.proxy.links[0]
        link.blackhole()
        holed_at = time.monotonic()
        big = make_frame(filler((1 << 20) - 256, 3), 3)
        for _ in range(64):  # 64 MiB: far more than the socket buffers hold
            busy.send(big)
        last = await all_lost([idle, busy], DEAD_PEER_BUDGET + 15,
                              "sessions on the hung pool connection")
        await t.pool_up(timeout=5)
        rtt = await t.round_trip(9)
        record("dead peers",
               f"hung pool connection (proxy stops reading, its kernel still ACKs, no "
               f"FIN) with 64 MiB pushed into it: the client aborted it and closed "
               f"both sessions {ms(last - holed_at)} after the hang "
               f"(TCP_USER_TIMEOUT on the zero window); new pool connection, session "
               f"RTT {ms(rtt)}")
