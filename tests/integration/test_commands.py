"""The user-facing commands run end to end: ``tigertunnel demo``, ``bench``, ``echo``.

Small workloads only: these check that the commands work and report what
they measured, not how fast anything is (the benchmark is the place for
that).
"""

import json
import os
import signal
import socket
import sys

from twisted.trial.unittest import TestCase

from tests.integration import procs
from tigertunnel.keys.generate import keygen


class CommandTests(TestCase):
    """The demo and the benchmark, as a user runs them."""

    timeout = 120

    async def test_demo_round_trips_frames_through_a_kem_tunnel(self) -> None:
        """tigertunnel demo echoes real TB frames through a KEM tunnel and says every byte came back."""
        result = await procs.run([procs.executable("tigertunnel"), "demo",
                                  "--sessions", "2", "--rounds", "1"], timeout=90)
        self.assertEqual(result.status, 0, result.describe())
        self.assertIn("X-Wing + PSK", result.stdout)
        self.assertIn("OK: every frame came back byte-identical and in order", result.stdout)
        self.assertRegex(result.stdout, r"tunnel: 16 frames echoed byte-identical")

    async def test_bench_prints_the_table_and_writes_json(self) -> None:
        """tigertunnel bench measures one cell direct and through the tunnel, prints the table and writes JSON."""
        out = os.path.abspath(self.mktemp())
        result = await procs.run([procs.executable("tigertunnel"), "bench", "-q",
                                  "--sizes", "4096", "--sessions", "2", "--modes", "psk",
                                  "--seconds", "0.3", "--idle", "20", "--json", out],
                                 timeout=90)
        self.assertEqual(result.status, 0, result.describe())
        self.assertIn("CPU-s/1k RT", result.stdout)
        with open(out) as f:
            data = json.load(f)
        (cell,) = data["cells"]
        self.assertEqual((cell["mode"], cell["size"], cell["sessions"]), ("psk", 4096, 2))
        for path in ("direct", "tunnel"):
            self.assertGreater(cell[path]["round_trips"], 0)
        self.assertGreater(cell["tunnel"]["tunnel_cpu_per_1k_rt"], 0)
        idle = data["memory"]["psk"]["idle"]
        self.assertEqual(idle["sessions"], 20)
        self.assertGreater(idle["server_rss_kib"], 0)

    async def test_bench_against_another_command(self) -> None:
        """tigertunnel bench --against CMD runs each cell through CMD too and prints the ratio table."""
        out = os.path.abspath(self.mktemp())
        other = f"{sys.executable} -m tigertunnel"
        result = await procs.run([procs.executable("tigertunnel"), "bench", "-q",
                                  "--sizes", "256", "--sessions", "1", "--modes", "psk",
                                  "--seconds", "0.3", "--idle", "0", "--json", out,
                                  "--against", other], timeout=90)
        self.assertEqual(result.status, 0, result.describe())
        self.assertIn(f"this tunnel / {other}", result.stdout)
        with open(out) as f:
            data = json.load(f)
        self.assertEqual(data["against"], other)
        (cell,) = data["cells"]
        self.assertGreater(cell["against"]["round_trips"], 0)
        self.assertGreater(cell["against"]["tunnel_cpu_per_1k_rt"], 0)
        for path in ("tunnel", "against"):
            figures = cell[path]
            # The user/system split adds up to the total (rounding aside).
            self.assertAlmostEqual(figures["tunnel_user_per_1k_rt"]
                                   + figures["tunnel_sys_per_1k_rt"],
                                   figures["tunnel_cpu_per_1k_rt"], places=6)
            self.assertGreater(figures["tunnel_user_per_1k_rt"], 0)

    async def test_bench_against_a_command_that_fails(self) -> None:
        """A --against command that cannot start makes bench fail, naming the other tunnel."""
        result = await procs.run([procs.executable("tigertunnel"), "bench", "-q",
                                  "--sizes", "256", "--sessions", "1", "--modes", "psk",
                                  "--seconds", "0.3", "--idle", "0",
                                  "--against", "/bin/false"], timeout=90)
        self.assertEqual(result.status, 1, result.describe())
        self.assertIn("the --against tunnel's log", result.stderr)

    async def test_bench_churn_prints_rss_per_sessions(self) -> None:
        """tigertunnel bench --churn runs sessions of every kind through the tunnel and through --against, and prints each end's RSS after the warm-up and at the end, side by side."""
        out = os.path.abspath(self.mktemp())
        other = f"{sys.executable} -m tigertunnel"
        result = await procs.run([procs.executable("tigertunnel"), "bench", "-q",
                                  "--churn", "80", "--warmup", "40", "--modes", "psk",
                                  "--json", out, "--against", other], timeout=110)
        self.assertEqual(result.status, 0, result.describe())
        self.assertIn("churn psk: resident memory (MiB)", result.stdout)
        self.assertIn("growth", result.stdout)
        with open(out) as f:
            data = json.load(f)
        for name in ("ours", "against"):
            run = data["churn"]["psk"][name]
            self.assertEqual([r["sessions"] for r in run["rows"]], [0, 80])
            self.assertGreater(run["rows"][0]["client_rss_kib"], 0)
            # The same command on both sides: every kind ends the same way.
            self.assertEqual(run["outcomes"], {
                "clean": {"echoed, closed": 24}, "abandoned": {"echoed, closed": 24},
                "backend_cut": {"echoed, closed by the tunnel": 24},
                "pool_cut": {"echoed, closed by the tunnel": 24},
                "refused": {"closed by the tunnel": 24}})

class SmallCommandTests(TestCase):
    """tigertunnel echo and the quiet end of a command whose reader left, as real processes."""

    timeout = 60

    async def test_echo_serves_and_stops_on_sigterm(self) -> None:
        """tigertunnel echo PORT echoes TB frames byte-identical and exits 0 on SIGTERM with nothing on stderr."""
        from twisted.internet import reactor, task
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.error import ConnectionRefusedError

        from tests.integration.test_sockets import PeerFactory, digest
        from tigertunnel.tools.traces import SINGLE, load_trace

        (port,) = procs.free_ports(1)
        echo = procs.spawn([procs.executable("tigertunnel"), "echo", str(port)])
        self.addCleanup(echo.kill)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        peer = None
        deadline = reactor.seconds() + 20
        while peer is None:  # bounded: until the echo backend listens
            try:
                peer = await endpoint.connect(PeerFactory())
            except ConnectionRefusedError:
                self.assertLess(reactor.seconds(), deadline, echo.output)
                self.assertTrue(echo.running, echo.output)
                await task.deferLater(reactor, 0.05, lambda: None)
        frames = [f.data for f in load_trace(SINGLE) if f.dir == "up"][:8]
        peer.transport.writeSequence(frames)
        await procs.wait_until(lambda: len(peer.digests) >= len(frames), 15, "the echoed frames")
        self.assertEqual(peer.digests, [digest(f) for f in frames])
        peer.transport.loseConnection()
        self.assertEqual(await echo.kill(signal.SIGTERM, timeout=10), 0, echo.output)
        self.assertEqual(echo.output, "")

    async def test_echo_port_taken(self) -> None:
        """tigertunnel echo on a port in use exits 1 at once with one line naming it."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = await procs.run([procs.executable("tigertunnel"), "echo", str(port)],
                                 timeout=20)
        self.assertEqual(result.status, 1, result.describe())
        self.assertEqual(result.stderr, f"tigertunnel: error: echo: cannot listen on "
                                        f"127.0.0.1:{port}: Address already in use\n")

    async def test_broken_pipe_is_quiet(self) -> None:
        """check-config writing into a pipe nobody reads (| head -1 having exited) ends quietly with status 141."""
        keys = os.path.abspath(self.mktemp())
        os.makedirs(keys)
        psk = os.path.join(keys, "psk.key")
        keygen(psk)
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first write
        try:
            result = await procs.run([procs.executable("tigertunnel"), "check-config",
                                      "server", "-p", "127.0.0.1:3000,127.0.0.1:3001",
                                      "-k", psk], stdout_fd=write_end)
        finally:
            os.close(write_end)
        self.assertEqual((result.status, result.stderr), (141, ""), result.describe())
