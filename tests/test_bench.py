"""Tests for tigertunnel.tools.bench: its options, the load generator's loop and the report."""

from typing import List

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.tools.bench.load import LoadRun, Session
from tigertunnel.tools.bench.churn import KINDS
from tigertunnel.tools.bench.report import (
    Cell,
    format_against,
    format_churn,
    format_table,
    kernel_line,
    memory_lines,
)
from tigertunnel.tools.bench.run import BenchOptions
from tigertunnel.tools.tbframes import sized_tb_frame


class OptionTests(SynchronousTestCase):
    """bench's options, checked while parsed."""

    def parse(self, *args: str) -> BenchOptions:
        """Parse ``args`` as bench options."""
        opts = BenchOptions()
        opts.parseOptions(list(args))
        return opts

    def test_lists_and_numbers(self) -> None:
        """Comma lists become lists of numbers and modes."""
        opts = self.parse("--sizes", "256,4096", "--sessions", "1,16", "--modes", "psk")
        self.assertEqual((opts["sizes"], opts["sessions"], opts["modes"]),
                         ([256, 4096], [1, 16], ["psk"]))

    def test_bad_options_refused(self) -> None:
        """Bad sizes, modes, counts and numbers are refused with a message naming the problem."""
        for args, text in ((["--sizes", "100"], "frame sizes must be 256..1048576"),
                           (["--sizes", "x"], "bad number"),
                           (["--modes", "psk,rsa"], "modes are psk and kem"),
                           (["--sessions", "0"], "at least 1"),
                           (["-w", "65"], "--workers must be 1..64")):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(*args)
            self.assertIn(text, str(caught.exception))


    def test_churn_options(self) -> None:
        """--churn and --warmup are numbers, --kinds a list of known kinds (all by default)."""
        opts = self.parse("--churn", "6000", "--warmup", "500")
        self.assertEqual((opts["churn"], opts["warmup"], opts["kinds"]),
                         (6000, 500, list(KINDS)))
        self.assertEqual(self.parse("--kinds", "clean,abandoned")["kinds"],
                         ["clean", "abandoned"])
        self.assertEqual(self.parse()["churn"], 0)
        for args, text in ((["--kinds", "clean,dirty"], "unknown session kind 'dirty'"),
                           (["--churn", "-1"], "--churn and --warmup must be at least 0"),
                           (["--warmup", "x"], "bad number")):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(*args)
            self.assertIn(text, str(caught.exception))


class LoadRunTests(SynchronousTestCase):
    """The closed loop: one frame in flight per session, every echo checked."""

    def connect(self, run: LoadRun, frame: bytes) -> "tuple[Session, StringTransport]":
        """A session of ``run`` on a StringTransport."""
        session = Session(run, frame)
        transport = StringTransport()
        session.makeConnection(transport)
        return session, transport

    def test_sends_next_frame_after_each_echo(self) -> None:
        """Once all sessions are up each sends one frame, and the next only after its echo."""
        run = LoadRun(MemoryReactorClock(), 1, 256, 2, seconds=60.0, max_bytes=1 << 30)
        frames = [sized_tb_frame(256, 1), sized_tb_frame(256, 2)]
        (a, ta), (b, tb) = (self.connect(run, f) for f in frames)
        self.assertEqual((ta.value(), tb.value()), (frames[0], frames[1]))
        ta.clear()
        a.dataReceived(frames[0][:100])
        self.assertEqual(ta.value(), b"")
        a.dataReceived(frames[0][100:])
        self.assertEqual(ta.value(), frames[0])
        self.assertEqual(len(run.rtts), 1)

    def test_byte_budget_ends_the_run(self) -> None:
        """The run ends after max_bytes of round trips and reports them."""
        run = LoadRun(MemoryReactorClock(), 1, 256, 1, seconds=60.0, max_bytes=4 * 512)
        frame = sized_tb_frame(256, 1)
        session, _ = self.connect(run, frame)
        for _ in range(4):
            session.dataReceived(frame)
        self.assertTrue(run.done.called)
        self.assertEqual(run.stats()["round_trips"], 4)

    def test_different_echo_fails(self) -> None:
        """An echo that differs from the frame sent ends the run with an error."""
        run = LoadRun(MemoryReactorClock(), 1, 256, 1, seconds=60.0, max_bytes=1 << 30)
        session, _ = self.connect(run, sized_tb_frame(256, 1))
        session.dataReceived(sized_tb_frame(256, 2))
        self.assertTrue(run.done.called)
        self.assertEqual(run.error, "an echoed frame differs from the one sent")


class ReportTests(SynchronousTestCase):
    """The text the benchmark prints."""

    def test_table_row(self) -> None:
        """A cell gives one row with the tunnel/direct ratio and the CPU figures."""
        tunnel = {"frames_per_s": 500.0, "mb_per_s": 1.5, "p50_ms": 0.25, "p99_ms": 1.0,
                  "tunnel_cpu_per_1k_rt": 0.123, "tunnel_cpu_per_gb": 4.5,
                  "echo_cpu_per_1k_rt": 0.01, "loadgen_cpu_per_1k_rt": 0.02}
        table = format_table([Cell("psk", 4096, 16, {"frames_per_s": 1000.0}, tunnel)])
        lines: List[str] = table.splitlines()
        self.assertIn("CPU-s/1k RT", lines[0])
        row = lines[2].split()
        self.assertEqual(row[:3], ["psk", "4096", "16"])
        self.assertIn("0.50", row)
        self.assertIn("0.123", row)

    def test_against_table(self) -> None:
        """--against: each figure of both implementations and its ratio, the user CPU among them."""
        ours = {"frames_per_s": 400.0, "p50_ms": 0.3, "tunnel_cpu_per_1k_rt": 0.15,
                "tunnel_cpu_per_gb": 2.0, "tunnel_user_per_1k_rt": 0.06}
        theirs = {"frames_per_s": 500.0, "p50_ms": 0.2, "tunnel_cpu_per_1k_rt": 0.1,
                  "tunnel_cpu_per_gb": 1.0, "tunnel_user_per_1k_rt": 0.01}
        table = format_against([Cell("psk", 256, 1, {}, ours, theirs)], "zig")
        lines = table.splitlines()
        self.assertIn("zig", lines[0])
        self.assertIn("user CPU-s/1k RT", lines[2])
        row = lines[4].split()
        self.assertEqual(row[:3], ["psk", "256", "1"])
        # CPU, user CPU, p50, frames/s, CPU/GB: ours, theirs, ratio each.
        self.assertEqual([x for x in row[3:] if x != "|"],
                         ["0.150", "0.100", "1.50", "0.060", "0.010", "6.00",
                          "0.300", "0.200", "1.50", "400", "500", "0.80",
                          "2.00", "1.00", "2.00"])
        for c in (ours, theirs):
            del c["tunnel_user_per_1k_rt"]  # results recorded before the split existed
        row = format_against([Cell("psk", 256, 1, {}, ours, theirs)], "zig").splitlines()[4]
        self.assertEqual(row.split()[8:11], ["-", "-", "-"])

    def test_memory_and_kernel_lines(self) -> None:
        """Memory is printed in MiB per mode, and the kernel counters in one line."""
        memory = {"kem": {"server_peak_rss_kib": 2048, "client_peak_rss_kib": 1024,
                          "idle": {"sessions": 10, "server_rss_kib": 512,
                                   "client_rss_kib": 256}}}
        self.assertEqual(memory_lines(memory), [
            "kem: peak RSS server 2.0 MiB, client 1.0 MiB; with 10 idle sessions: "
            "server 0.5 MiB, client 0.2 MiB"])
        self.assertIn("3 listen queue overflows", kernel_line({"ListenOverflows": 3}))


class ChurnReportTests(SynchronousTestCase):
    """The churn's table: RSS per 1,000 sessions of each end, growth, outcomes."""

    def rows(self, client: "list[int]", server: "list[int]") -> "list[dict[str, int]]":
        """RSS rows (KiB) at 0, 1000, 2000 ... sessions."""
        return [{"sessions": i * 1000, "client_rss_kib": c, "server_rss_kib": s}
                for i, (c, s) in enumerate(zip(client, server))]

    def test_rows_and_growth(self) -> None:
        """One row per reading in MiB for each end, then the growth from the first to the last."""
        ours = {"rows": self.rows([51200, 52224, 51712], [40960, 40960, 41984]),
                "outcomes": {"clean": {"echoed, closed": 2000}}}
        lines = format_churn("psk", ours, None, None).splitlines()
        self.assertIn("left: this tunnel", lines[0])
        self.assertEqual(lines[3].split(), ["0", "|", "50.0", "40.0"])
        self.assertEqual(lines[5].split(), ["2000", "|", "50.5", "41.0"])
        self.assertEqual(lines[6].split(), ["growth", "|", "+0.5", "+1.0"])
        self.assertEqual(lines[7], "this tunnel, sessions by outcome: clean: 2000 echoed, closed")

    def test_against_side_by_side(self) -> None:
        """With --against, its columns follow ours on every row (a shorter run leaves blanks)."""
        ours = {"rows": self.rows([1024, 2048, 3072], [1024, 1024, 1024]), "outcomes": {}}
        theirs = {"rows": self.rows([512, 512], [256, 256]),
                  "outcomes": {"pool_cut": {"echoed, left open": 8}}}
        lines = format_churn("kem", ours, theirs, "zig").splitlines()
        self.assertIn("right: zig", lines[0])
        self.assertEqual(lines[4].split(), ["1000", "|", "2.0", "1.0", "|", "0.5", "0.2"])
        self.assertEqual(lines[5].split(), ["2000", "|", "3.0", "1.0", "|"])
        self.assertEqual(lines[6].split(), ["growth", "|", "+2.0", "+0.0", "|", "+0.0", "+0.0"])
        self.assertEqual(lines[8], "zig, sessions by outcome: pool_cut: 8 echoed, left open")

    def test_exited_end(self) -> None:
        """An end whose process had exited shows as such, and has no growth."""
        theirs = {"rows": self.rows([512, -1], [256, 256]), "outcomes": {}}
        ours = {"rows": self.rows([1024, 1024], [1024, 1024]), "outcomes": {}}
        lines = format_churn("psk", ours, theirs, "zig").splitlines()
        self.assertEqual(lines[4].split(), ["1000", "|", "1.0", "1.0", "|", "exited", "0.2"])
        self.assertEqual(lines[5].split(), ["growth", "|", "+0.0", "+0.0", "|", "-", "+0.0"])
