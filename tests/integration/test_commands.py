"""The two user-facing jobs run end to end: ``tigertunnel demo`` and ``tigertunnel bench``.

Small workloads only: these check that the commands work and report what
they measured, not how fast anything is (the benchmark is the place for
that).
"""

import json
import os
import sys

from twisted.trial.unittest import TestCase

from tests.integration import procs


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
