"""``tigertunnel bench``: what does the tunnel cost a TigerBeetle cluster?

Starts, on 127.0.0.1 and as separate processes, a TB-frame echo backend
(``python -m tigertunnel.tools.echo``), a tunnel server and a tunnel client (the
console script, exactly as in production), and drives them from this
process with a closed-loop load generator: every session keeps one TB frame
in flight (TB clients have one request in flight), waits for its echo,
checks it byte for byte and sends the next.

Each cell (frame size x concurrent sessions x PSK/KEM) runs the same
workload **directly against the echo backend and through the tunnel, in one
run**, and reports frames/s, MB/s, round-trip p50/p99, the ratio to direct,
and the CPU seconds (user+sys, from ``/proc``) the two tunnel processes
consumed per 1,000 round trips and per GB — the figure that stays stable on
a noisy shared machine. The echo backend's and the load generator's CPU per
1,000 round trips are reported too, to show they are not the bottleneck.
At the end: peak RSS of each tunnel process, and RSS with 1,000 idle
sessions.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage

from tigertunnel.wire.frames import FrameParser
from tigertunnel.net.sockets import tune_socket
from tigertunnel.ops.memory import tune_malloc

TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_SIZES = "256,4096,65536,1048576"
DEFAULT_SESSIONS = "1,16,256"


class BenchOptions(usage.Options):
    """Options of ``tigertunnel bench``."""

    synopsis = "tigertunnel bench [options]"
    longdesc = ("Tunnel vs direct on 127.0.0.1, CPU per round trip of the tunnel "
                "processes.\nExamples:\n  tigertunnel bench\n  tigertunnel bench "
                "--sizes 1048576 --sessions 16 --modes psk --json out.json")

    optParameters = [
        ["sizes", None, DEFAULT_SIZES, "TB frame sizes in bytes (256..1048576)."],
        ["sessions", None, DEFAULT_SESSIONS, "Concurrent sessions per cell."],
        ["modes", None, "psk,kem", "Handshake modes: psk, kem."],
        ["seconds", None, "3", "Measured seconds per cell and path."],
        ["max-bytes", None, str(2 << 30), "Stop a cell early after this many bytes echoed."],
        ["idle", None, "1000", "Idle sessions for the idle-memory figure (0 = skip)."],
        ["json", None, None, "Also write the results as JSON to this file."],
        ["pool", "n", "4", "Pool connections (-n) of the tunnel client."],
        ["workers", "w", "1", "Worker processes (--workers) of each tunnel end."],
    ]
    optFlags = [["quiet", "q", "No progress bar."]]

    def postOptions(self) -> None:
        try:
            self["sizes"] = [int(x) for x in self["sizes"].split(",")]
            self["sessions"] = [int(x) for x in self["sessions"].split(",")]
            self["seconds"] = float(self["seconds"])
            self["max-bytes"] = int(self["max-bytes"])
            self["idle"] = int(self["idle"])
            self["pool"] = int(self["pool"])
            self["workers"] = int(self["workers"])
        except ValueError as e:
            raise usage.UsageError(f"bad number: {e}") from None
        from tigertunnel.ops.workers import MAX_WORKERS

        if not 1 <= self["workers"] <= MAX_WORKERS:
            raise usage.UsageError(f"--workers must be 1..{MAX_WORKERS}")
        if self["pool"] < 1 or any(n < 1 for n in self["sessions"]):
            raise usage.UsageError("--pool and --sessions must be at least 1")
        if any(not 256 <= s <= 1 << 20 for s in self["sizes"]):
            raise usage.UsageError("frame sizes must be 256..1048576")
        self["modes"] = self["modes"].split(",")
        if any(m not in ("psk", "kem") for m in self["modes"]):
            raise usage.UsageError("modes are psk and kem")


def tb_frame(size: int, seed: int) -> bytes:
    """A TB-shaped frame: size at offset 96, zero paddings and cluster."""
    header = bytearray(256)
    header[0:16] = seed.to_bytes(16, "little")
    header[96:100] = size.to_bytes(4, "little")
    header[114] = 5  # request
    body = (bytes(range(256)) * (size // 256 + 1))[: size - 256]
    return bytes(header) + body


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def with_children(pid: int) -> List[int]:
    """``pid`` and its child processes (the workers of a tunnel end)."""
    pids = [pid]
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            pids.append(int(name))
    return pids


def memory_kib(pid: int, key: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


#: Kernel TCP counters (/proc/net/netstat) that explain stalls in a run:
#: connections dropped by a full accept queue, and SYNs sent again.
KERNEL_COUNTERS = ("ListenOverflows", "TCPSynRetrans", "TCPTimeouts")


def kernel_counters() -> Dict[str, int]:
    """The :data:`KERNEL_COUNTERS` of this network namespace ({} without /proc)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    found: Dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            for name, value in zip(names.split()[1:], values.split()[1:]):
                if name in KERNEL_COUNTERS:
                    found[name] = int(value)
    return found


def own_cpu() -> float:
    """This process's user+system CPU seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Session(Protocol):
    """Closed loop: one frame in flight, each echo checked byte for byte."""

    def __init__(self, run: "_Run", frame: bytes) -> None:
        self.run = run
        self.frame = frame
        self.parser = FrameParser()
        self.sent_at = 0.0

    def connectionMade(self) -> None:
        tune_socket(self.transport)
        self.run.connected(self)

    def send(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.write(self.frame)

    def dataReceived(self, data: bytes) -> None:
        for echo in self.parser.feed(data):
            if echo != self.frame:
                self.run.fail("an echoed frame differs from the one sent")
                return
            self.run.completed(self, time.perf_counter() - self.sent_at)

    def connectionLost(self, reason: Any = None) -> None:
        self.run.lost(self, reason)


class _Run:
    """One measured workload on one path (direct or tunnel)."""

    def __init__(self, reactor: Any, port: int, size: int, sessions: int,
                 seconds: float, max_bytes: int) -> None:
        self.reactor = reactor
        self.port = port
        self.size = size
        self.count = sessions
        self.seconds = seconds
        self.max_rt = max(sessions, max_bytes // (2 * size))
        self.protos: List[_Session] = []
        self.rtts: List[float] = []
        self.done: "defer.Deferred[None]" = defer.Deferred()
        self.measuring = False
        self.stopping = False
        self.error: Optional[str] = None
        self.start = 0.0

    async def go(self) -> None:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
        for i in range(self.count):
            frame = tb_frame(self.size, i + 1)
            await endpoint.connect(Factory.forProtocol(lambda f=frame: _Session(self, f)))
        # Warm up one round trip per session, then measure.
        await self.done
        for p in self.protos:
            p.transport.loseConnection()
        if self.error:
            raise RuntimeError(self.error)

    def connected(self, proto: _Session) -> None:
        self.protos.append(proto)
        if len(self.protos) == self.count:
            self.start = time.perf_counter()
            self.measuring = True
            self.deadline = self.start + self.seconds
            for p in self.protos:
                p.send()

    def completed(self, proto: _Session, rtt: float) -> None:
        if self.stopping:
            return
        self.rtts.append(rtt)
        if time.perf_counter() >= self.deadline or len(self.rtts) >= self.max_rt:
            self.stopping = True
            self.elapsed = time.perf_counter() - self.start
            self.done.callback(None)
            return
        proto.send()

    def fail(self, message: str) -> None:
        self.error = message
        if not self.done.called:
            self.stopping = True
            self.elapsed = time.perf_counter() - self.start
            self.done.callback(None)

    def lost(self, proto: _Session, reason: Any = None) -> None:
        if not self.stopping:
            why = reason.getErrorMessage() if reason is not None else "?"
            self.fail(f"a session was closed during the run ({why}; "
                      f"{len(self.rtts)} round trips done)")


@dataclass
class Cell:
    """Results of one cell (both paths)."""

    mode: str
    size: int
    sessions: int
    direct: Dict[str, float] = field(default_factory=dict)
    tunnel: Dict[str, float] = field(default_factory=dict)


def _stats(run: _Run) -> Dict[str, float]:
    rtts = sorted(run.rtts)
    n = len(rtts)
    return {
        "round_trips": n,
        "seconds": run.elapsed,
        "frames_per_s": n / run.elapsed,
        "mb_per_s": 2 * n * run.size / run.elapsed / 1e6,
        "p50_ms": rtts[n // 2] * 1e3,
        "p99_ms": rtts[min(n - 1, int(n * 0.99))] * 1e3,
    }


class Processes:
    """The echo backend and the tunnel server and client, as subprocesses."""

    def __init__(self, tmp: str, mode: str, pool: int, workers: int = 1) -> None:
        exe = [sys.executable, "-m", "tigertunnel"]
        self.workers = workers
        key = os.path.join(tmp, "secret.key")
        kem = os.path.join(tmp, "server-kem")
        if not os.path.exists(key):
            subprocess.run(exe + ["keygen", "-o", key], check=True, capture_output=True)
            subprocess.run(exe + ["kemgen", "-o", kem], check=True, capture_output=True)
        self.echo_port, self.server_port, self.client_port = (
            free_port(), free_port(), free_port())
        server_kem = ["--kemsecret", kem + ".key"] if mode == "kem" else []
        client_kem = ["--kempublic", kem + ".pub"] if mode == "kem" else []
        self.log_path = os.path.join(tmp, f"{mode}.log")
        logs = open(self.log_path, "ab")
        self.echo = subprocess.Popen(
            [sys.executable, "-m", "tigertunnel.tools.echo", str(self.echo_port)],
            stdout=logs, stderr=logs)
        self.server = subprocess.Popen(
            exe + ["server", "-p", f"127.0.0.1:{self.server_port},127.0.0.1:{self.echo_port}",
                   "-k", key, "--log-level", "warn", "-m", "5000",
                   "--workers", str(workers)] + server_kem,
            stdout=logs, stderr=logs)
        self.client = subprocess.Popen(
            exe + ["client", "-p", f"127.0.0.1:{self.client_port},127.0.0.1:{self.server_port}",
                   "-k", key, "-n", str(pool), "--log-level", "warn", "-m", "5000",
                   "--workers", str(workers)] + client_kem,
            stdout=logs, stderr=logs)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the tunnel processes and the echo backend logged."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-20000:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"

    @property
    def tunnel_pids(self) -> List[int]:
        """Every tunnel process: both ends and their workers."""
        return with_children(self.server.pid) + with_children(self.client.pid)

    def tunnel_cpu(self) -> float:
        total = 0.0
        for pid in self.tunnel_pids:
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass  # a worker that just exited
        return total

    def largest_kib(self, pid: int, key: str) -> int:
        """The largest ``key`` (VmRSS, VmHWM) among a tunnel end's processes."""
        return max(memory_kib(p, key) for p in with_children(pid))

    def stop(self) -> None:
        for p in (self.client, self.server, self.echo):
            p.terminate()
        for p in (self.client, self.server, self.echo):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def _ready(reactor: Any, procs: Processes) -> None:
    """Wait until a frame makes it through the tunnel (pool up)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for p in (procs.echo, procs.server, procs.client):
            if p.poll() is not None:
                raise RuntimeError(f"a benchmark process exited with {p.returncode}")
        try:
            # Enough sessions that every client worker is very likely hit.
            run = _Run(reactor, procs.client_port, 256, 8 * procs.workers, 0.05,
                       1 << 20)
            await defer.ensureDeferred(run.go()).addTimeout(10, reactor)
            return
        except Exception:
            await task.deferLater(reactor, 0.2, lambda: None)
    raise RuntimeError("the tunnel did not come up within 30 s")


async def _measure(reactor: Any, procs: Processes, port: int, size: int,
                   sessions: int, opts: BenchOptions, tunnel: bool) -> Dict[str, float]:
    run = _Run(reactor, port, size, sessions, opts["seconds"], opts["max-bytes"])
    cpu0 = procs.tunnel_cpu()
    echo0 = cpu_seconds(procs.echo.pid)
    me0 = own_cpu()
    try:
        await run.go()
    except RuntimeError as e:
        raise RuntimeError(f"{'tunnel' if tunnel else 'direct'} path: {e}") from None
    result = _stats(run)
    n = result["round_trips"]
    gb = 2 * n * size / 1e9
    if tunnel:
        tcpu = procs.tunnel_cpu() - cpu0
        result["tunnel_cpu_s"] = tcpu
        result["tunnel_cpu_per_1k_rt"] = tcpu / n * 1000
        result["tunnel_cpu_per_gb"] = tcpu / gb
    result["echo_cpu_per_1k_rt"] = (cpu_seconds(procs.echo.pid) - echo0) / n * 1000
    result["loadgen_cpu_per_1k_rt"] = (own_cpu() - me0) / n * 1000
    return result


async def _idle_rss(reactor: Any, procs: Processes, count: int) -> Dict[str, int]:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", procs.client_port)
    protos = []
    for _ in range(count):
        protos.append(await endpoint.connect(Factory.forProtocol(Protocol)))
    await task.deferLater(reactor, 1.0, lambda: None)
    rss = {"server_rss_kib": procs.largest_kib(procs.server.pid, "VmRSS"),
           "client_rss_kib": procs.largest_kib(procs.client.pid, "VmRSS"),
           "sessions": count}
    for p in protos:
        p.transport.loseConnection()
    await task.deferLater(reactor, 0.5, lambda: None)
    return rss


def _progress(done: int, total: int, label: str, quiet: bool) -> None:
    if quiet or not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / total)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<30}")
    sys.stderr.flush()


def format_table(cells: List[Cell]) -> str:
    """The human-readable result table."""
    head = (f"{'mode':<4} {'frame':>8} {'sess':>4} | {'direct f/s':>10} {'tunnel f/s':>10} "
            f"{'ratio':>5} | {'MB/s':>7} {'p50 ms':>7} {'p99 ms':>7} | "
            f"{'CPU-s/1k RT':>11} {'CPU-s/GB':>8} | {'echo':>5} {'load':>5}")
    lines = [head, "-" * len(head)]
    for c in cells:
        d, t = c.direct, c.tunnel
        lines.append(
            f"{c.mode:<4} {c.size:>8} {c.sessions:>4} | {d['frames_per_s']:>10.0f} "
            f"{t['frames_per_s']:>10.0f} {t['frames_per_s'] / d['frames_per_s']:>5.2f} | "
            f"{t['mb_per_s']:>7.1f} {t['p50_ms']:>7.2f} {t['p99_ms']:>7.2f} | "
            f"{t['tunnel_cpu_per_1k_rt']:>11.3f} {t['tunnel_cpu_per_gb']:>8.2f} | "
            f"{t['echo_cpu_per_1k_rt']:>5.2f} {t['loadgen_cpu_per_1k_rt']:>5.2f}")
    lines.append("CPU-s/1k RT and CPU-s/GB: both tunnel processes together; echo/load: "
                 "CPU-s per 1k round trips of the echo backend and the load generator "
                 "(tunnel path). ratio: tunnel/direct frames per second, same run.")
    return "\n".join(lines)


async def run_bench(reactor: Any, opts: BenchOptions) -> Dict[str, Any]:
    """Run every cell; returns the JSON-able results."""
    tune_malloc()
    cells: List[Cell] = []
    memory: Dict[str, Any] = {}
    total = len(opts["modes"]) * len(opts["sizes"]) * len(opts["sessions"])
    done = 0
    kernel0 = kernel_counters()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in opts["modes"]:
            procs = Processes(tmp, mode, opts["pool"], opts["workers"])
            cell_name = "start-up"
            try:
                await _ready(reactor, procs)
                memory[mode] = {}
                if opts["idle"]:
                    # Fresh processes: what idle sessions cost, before any
                    # burst of large frames has grown the heap.
                    memory[mode]["idle"] = await _idle_rss(reactor, procs, opts["idle"])
                for size in opts["sizes"]:
                    for sessions in opts["sessions"]:
                        cell_name = f"{mode} {size} B x {sessions}"
                        _progress(done, total, cell_name, opts["quiet"])
                        cell = Cell(mode, size, sessions)
                        cell.direct = await _measure(reactor, procs, procs.echo_port, size,
                                                     sessions, opts, tunnel=False)
                        cell.tunnel = await _measure(reactor, procs, procs.client_port, size,
                                                     sessions, opts, tunnel=True)
                        cells.append(cell)
                        done += 1
                memory[mode]["server_peak_rss_kib"] = procs.largest_kib(procs.server.pid, "VmHWM")
                memory[mode]["client_peak_rss_kib"] = procs.largest_kib(procs.client.pid, "VmHWM")
            except Exception as e:
                raise RuntimeError(f"{cell_name}: {e}; the tunnel's log ends "
                                   f"with:\n{procs.log_tail()}") from None
            finally:
                procs.stop()
    _progress(total, total, "done", opts["quiet"])
    if not opts["quiet"] and sys.stderr.isatty():
        sys.stderr.write("\n")
    kernel = {k: v - kernel0.get(k, 0) for k, v in kernel_counters().items()}
    return {"cells": [asdict(c) for c in cells], "memory": memory, "kernel": kernel,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}


def main(argv: List[str]) -> int:
    """Entry point of ``tigertunnel bench``."""
    opts = BenchOptions()
    try:
        opts.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write(f"tigertunnel: error: bench: {e}\n")
        return 2
    result: Dict[str, Any] = {}

    async def go(reactor: Any) -> None:
        result.update(await run_bench(reactor, opts))

    try:
        task.react(lambda r: defer.ensureDeferred(go(r)), [])
    except SystemExit as e:
        if e.code:
            sys.stderr.write("tigertunnel: error: bench failed (see above)\n")
            return 1
    cells = [Cell(**c) for c in result["cells"]]
    print(format_table(cells))
    for mode, mem in result["memory"].items():
        line = (f"{mode}: peak RSS server {mem['server_peak_rss_kib'] / 1024:.1f} MiB, "
                f"client {mem['client_peak_rss_kib'] / 1024:.1f} MiB")
        if "idle" in mem:
            idle = mem["idle"]
            line += (f"; with {idle['sessions']} idle sessions: server "
                     f"{idle['server_rss_kib'] / 1024:.1f} MiB, client "
                     f"{idle['client_rss_kib'] / 1024:.1f} MiB")
        print(line)
    kernel = result.get("kernel") or {}
    if kernel:
        print(f"kernel, during the run: {kernel.get('ListenOverflows', 0)} listen "
              f"queue overflows, {kernel.get('TCPSynRetrans', 0)} SYN "
              f"retransmissions, {kernel.get('TCPTimeouts', 0)} TCP timeouts "
              f"(machine-wide; non-zero means stalls of 1 s or more)")
    if opts["json"]:
        with open(opts["json"], "w") as f:
            json.dump(result, f, indent=2)
    return 0
