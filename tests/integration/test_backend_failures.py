"""A backend that dies, refuses, restarts, closes or resets closes only its own TB connections.
"""

import os
import signal
import time

from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.tbpeers import (
    CLOSE,
    RESET,
    backend_command,
    control_frame,
    digest,
    filler,
    make_frame,
)
from tests.integration.tunnels import (
    DEADLINE,
    Daemons,
    InProcessTunnel,
    all_lost,
    close_wait,
    echo_rtt,
    established,
    ms,
    record,
)


class BackendDeathTests(TestCase):
    """A backend killed, then refusing, then restarted, under a pair of tunnel daemons."""

    timeout = 90

    async def test_backend_killed_refusing_restarted(self) -> None:
        """A killed or refusing backend closes the TB side within seconds with no CLOSE-WAIT left, and after a restart new sessions work."""
        port = procs.free_ports(1)[0]
        backend = procs.spawn(backend_command(port))
        self.addCleanup(backend.kill)
        await procs.wait_for_output(backend, "listening", 10)
        d = await Daemons(self, port).start()
        assert d.server_pid is not None and d.client_pid is not None
        peers = []
        for i in range(6):
            peer = await d.tb_client()
            peer.send(make_frame(filler(500, i), i))
            peers.append(peer)
        for peer in peers:
            await peer.wait_frames(1, DEADLINE)
        self.assertEqual(len(established(d.server_pid, port, local=False)), 6)

        # Killed: the kernel closes its sockets.
        killed_at = time.monotonic()
        await backend.kill(signal.SIGKILL)
        last = await all_lost(peers, DEADLINE, "TB clients after the backend died")
        await procs.wait_until(
            lambda: not [s for s in procs.tcp_sockets(d.server_pid)  # type: ignore
                         if s.remote_port == port] and not close_wait(d.server_pid)  # type: ignore
            and not close_wait(d.client_pid), DEADLINE,  # type: ignore
            "no backend socket and no CLOSE-WAIT left in the tunnel processes")
        reaped = time.monotonic() - killed_at
        self.assertEqual(established(d.client_pid, d.client_port), [])

        # Refusing: nothing listens on the backend port any more.
        refused = []
        for i in range(3):
            started = time.monotonic()
            peer = await d.tb_client()
            peer.send(make_frame(b"anyone?", 50 + i))
            refused.append(await peer.wait_lost(DEADLINE) - started)
            self.assertEqual(peer.digests, [])
        await procs.wait_until(lambda: not close_wait(d.server_pid)  # type: ignore
                               and not close_wait(d.client_pid), DEADLINE,  # type: ignore
                               "no CLOSE-WAIT after refused backend connections")

        # Restarted on the same port.
        backend = procs.spawn(backend_command(port))
        self.addCleanup(backend.kill)
        await procs.wait_for_output(backend, "listening", 10)
        restarted_at = time.monotonic()
        again = []
        for i in range(3):
            peer = await d.tb_client()
            frame = make_frame(filler(700, 70 + i), 70 + i)
            peer.send(frame)
            await peer.wait_frames(1, DEADLINE)
            self.assertEqual(peer.digests, [digest(frame)])
            again.append(peer)
        first_ok = again[0].arrivals[0] - restarted_at
        record("backend failures",
               f"backend SIGKILLed under 6 sessions: every TB connection closed "
               f"{ms(last - killed_at)} after the kill; backend sockets gone and no "
               f"CLOSE-WAIT in either tunnel process after {ms(reaped)}")
        record("backend failures", f"backend refusing: TB connections closed after "
               f"{', '.join(ms(r) for r in refused)}")
        record("backend failures",
               f"backend restarted: first new session answered {ms(first_ok)} after "
               f"the backend listened again")


class BackendCloseTests(TestCase):
    """A backend that closes or resets one connection, with both tunnel ends in this process."""

    timeout = 60

    async def test_backend_closes_or_resets(self) -> None:
        """A backend closing (FIN) or resetting (RST) one connection closes that TB connection at once and no other."""
        t = await InProcessTunnel(self, pool_size=1).start()
        bystander, _ = await t.session()
        closing, closing_backend = await t.session()
        resetting, resetting_backend = await t.session()
        sent_at = time.monotonic()
        closing.send(control_frame(CLOSE, tag=1))
        resetting.send(control_frame(RESET, tag=2))
        for peer in (closing, resetting, closing_backend, resetting_backend):
            await peer.wait_lost(DEADLINE)
        me = os.getpid()
        ports = {t.client_port, t.server_port, t.backend.port_number}
        await procs.wait_until(
            lambda: not [s for s in close_wait(me)
                         if ports & {s.local_port, s.remote_port}], DEADLINE,
            "no CLOSE-WAIT socket on the tunnel's ports")
        rtt = await echo_rtt(bystander, 3)
        self.assertEqual((closing.digests, resetting.digests), ([], []))
        record("backend failures", f"backend closed one connection (FIN): its TB connection closed "
               f"{ms(closing.lost_at - sent_at)} after the request; backend reset "  # type: ignore
               f"one (RST): {ms(resetting.lost_at - sent_at)}; no CLOSE-WAIT; a "  # type: ignore
               f"third session on the same pool connection still echoes ({ms(rtt)})")
