"""The benchmark's options and orchestration: processes, cells, results.

For each handshake mode, fresh processes (:class:`Processes`) are started
and awaited (a frame must make it through the tunnel), the idle-session
memory is measured on them, then every cell (frame size x sessions) runs
its workload directly and through the tunnel, measuring the CPU time of the
processes around each run. The processes are stopped before the next mode.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import IO, Any, Dict, List, Optional, Tuple

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage

from tigertunnel.ops.memory import tune_malloc
from tigertunnel.ops.workers import MAX_WORKERS
from tigertunnel.tools.bench.churn import KINDS, Churn, Relay, churn_rss
from tigertunnel.tools.bench.load import LoadRun, own_cpu
from tigertunnel.tools.options import ExampleOptions
from tigertunnel.tools.ports import free_port
from tigertunnel.tools.bench.report import Cell, print_churn, print_report
from tigertunnel.tools.procs import (
    cpu_seconds,
    cpu_split,
    kernel_counters,
    memory_kib,
    with_children,
)
from tigertunnel.wire.frames import MAX_FRAME_SIZE, MIN_FRAME_SIZE

DEFAULT_SIZES = "256,4096,65536,1048576"
DEFAULT_SESSIONS = "1,16,256"
MODES = ("psk", "kem")


class BenchOptions(ExampleOptions):
    """Options of ``tigertunnel bench``."""

    synopsis = "[options]"
    longdesc = ("Tunnel vs direct on 127.0.0.1, CPU per round trip of the tunnel "
                "processes.")
    examples = """Examples:
  tigertunnel bench
  tigertunnel bench --sizes 1048576 --sessions 16 --modes psk --json out.json"""

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
        ["churn", None, "0",
         "Instead of the cells: run N short sessions of every kind (clean, "
         "abandoned mid-frame, cut by the backend, cut by the pool, refused) and "
         "print each tunnel end's RSS after a warm-up and per 1,000 sessions."],
        ["warmup", None, "1000", "--churn: sessions before the first RSS reading."],
        ["kinds", None, ",".join(KINDS), "--churn: the kinds of session to run."],
        ["against", None, None,
         "Also run every cell through another implementation of the same "
         "command line (CMD keygen/server/client, e.g. the Zig tigertunnel "
         "binary) in the same run, and show the ratios."],
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
            self["churn"] = int(self["churn"])
            self["warmup"] = int(self["warmup"])
        except ValueError as e:
            raise usage.UsageError(f"bad number: {e}") from None
        if not 1 <= self["workers"] <= MAX_WORKERS:
            raise usage.UsageError(f"--workers must be 1..{MAX_WORKERS}")
        if self["pool"] < 1 or any(n < 1 for n in self["sessions"]):
            raise usage.UsageError("--pool and --sessions must be at least 1")
        if any(not MIN_FRAME_SIZE <= s <= MAX_FRAME_SIZE for s in self["sizes"]):
            raise usage.UsageError("frame sizes must be 256..1048576")
        if self["churn"] < 0 or self["warmup"] < 0:
            raise usage.UsageError("--churn and --warmup must be at least 0")
        self["kinds"] = self["kinds"].split(",")
        bad = [k for k in self["kinds"] if k not in KINDS]
        if bad or not self["kinds"]:
            raise usage.UsageError(f"unknown session kind {','.join(bad)!r}; the "
                                   f"kinds are {', '.join(KINDS)}")
        self["modes"] = self["modes"].split(",")
        if any(m not in MODES for m in self["modes"]):
            raise usage.UsageError("modes are psk and kem")
        if self["against"] is not None:
            command = shlex.split(self["against"])
            if not command:
                raise usage.UsageError("--against needs a command")
            self["against"] = command


#: This tunnel's own command line (the console script, as in production).
OURS = [sys.executable, "-m", "tigertunnel"]


class Processes:
    """The echo backend and the tunnel server and client, as subprocesses.

    :param command: the tunnel's command line prefix (``CMD`` of
        ``CMD server ...``); this tunnel's console script by default.
        ``--workers`` is passed to this tunnel only.
    """

    def __init__(self, tmp: str, mode: str, pool: int, workers: int = 1,
                 command: Optional[List[str]] = None, relayed: bool = False) -> None:
        """
        :param relayed: add a second proxy pair (TB port ``client_port_b``)
            whose pool connections go to ``relay_port`` (a :class:`Relay`
            the caller runs, to ``server_port_b``).
        """
        exe = list(command) if command is not None else OURS
        self.workers = workers if command is None else 1
        key = os.path.join(tmp, "secret.key")
        kem = os.path.join(tmp, "server-kem")
        if not os.path.exists(key):
            # The key files are the same format for every implementation.
            subprocess.run(OURS + ["keygen", "-o", key], check=True, capture_output=True)
            subprocess.run(OURS + ["kemgen", "-o", kem], check=True, capture_output=True)
        self.echo_port, self.server_port, self.client_port = (
            free_port(), free_port(), free_port())
        second_server: List[str] = []
        second_client: List[str] = []
        if relayed:
            self.server_port_b, self.relay_port, self.client_port_b = (
                free_port(), free_port(), free_port())
            second_server = ["-p", f"127.0.0.1:{self.server_port_b},"
                                   f"127.0.0.1:{self.echo_port}"]
            second_client = ["-p", f"127.0.0.1:{self.client_port_b},"
                                   f"127.0.0.1:{self.relay_port}"]
        server_kem = ["--kemsecret", kem + ".key"] if mode == "kem" else []
        client_kem = ["--kempublic", kem + ".pub"] if mode == "kem" else []
        workers_args = ["--workers", str(workers)] if command is None else []
        name = "against" if command is not None else "tunnel"
        self.log_path = os.path.join(tmp, f"{mode}-{name}.log")
        self._log: IO[bytes] = open(self.log_path, "ab")
        logs = self._log
        self.echo = subprocess.Popen(
            [sys.executable, "-m", "tigertunnel.tools.echo", "--hang-up", str(self.echo_port)],
            stdout=logs, stderr=logs)
        self.server = subprocess.Popen(
            exe + ["server", "-p", f"127.0.0.1:{self.server_port},127.0.0.1:{self.echo_port}",
                   *second_server, "-k", key, "--log-level", "warn", "-m", "5000"]
            + workers_args + server_kem,
            stdout=logs, stderr=logs)
        self.client = subprocess.Popen(
            exe + ["client", "-p", f"127.0.0.1:{self.client_port},127.0.0.1:{self.server_port}",
                   *second_client, "-k", key, "-n", str(pool), "--log-level", "warn",
                   "-m", "5000"]
            + workers_args + client_kem,
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

    def tunnel_cpu(self) -> Tuple[float, float]:
        """User and system CPU seconds of every tunnel process so far."""
        user = system = 0.0
        for pid in self.tunnel_pids:
            try:
                u, s = cpu_split(pid)
            except OSError:
                continue  # a worker that just exited
            user += u
            system += s
        return user, system

    def largest_kib(self, pid: int, key: str) -> int:
        """The largest ``key`` (VmRSS, VmHWM) among a tunnel end's processes."""
        return max(memory_kib(p, key) for p in with_children(pid))

    def stop(self) -> None:
        """Stop the three processes (SIGTERM, SIGKILL after 10 s)."""
        for p in (self.client, self.server, self.echo):
            p.terminate()
        for p in (self.client, self.server, self.echo):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self._log.close()


async def _ready(reactor: IReactorTCP, procs: Processes) -> None:
    """Wait until a frame makes it through the tunnel (pool up)."""
    clock = IReactorTime(reactor)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for p in (procs.echo, procs.server, procs.client):
            if p.poll() is not None:
                raise RuntimeError(f"a benchmark process exited with {p.returncode}")
        try:
            # Enough sessions that every client worker is very likely hit.
            run = LoadRun(reactor, procs.client_port, 256, 8 * procs.workers, 0.05,
                          1 << 20)
            await defer.ensureDeferred(run.go()).addTimeout(10, clock)
            return
        except Exception:  # not up yet (refused, reset, timed out): try again
            await task.deferLater(clock, 0.2, lambda: None)
    raise RuntimeError("the tunnel did not come up within 30 s")


async def _measure(reactor: IReactorTCP, procs: Processes, port: int, size: int,
                   sessions: int, opts: BenchOptions, tunnel: bool,
                   path: str = "") -> Dict[str, float]:
    run = LoadRun(reactor, port, size, sessions, opts["seconds"], opts["max-bytes"])
    cpu0 = procs.tunnel_cpu()
    echo0 = cpu_seconds(procs.echo.pid)
    me0 = own_cpu()
    try:
        await run.go()
    except RuntimeError as e:
        raise RuntimeError(f"{path or ('tunnel' if tunnel else 'direct')} path: {e}") from None
    result = run.stats()
    n = result["round_trips"]
    gb = 2 * n * size / 1e9
    if tunnel:
        user1, system1 = procs.tunnel_cpu()
        user, system = user1 - cpu0[0], system1 - cpu0[1]
        tcpu = user + system
        result["tunnel_cpu_s"] = tcpu
        result["tunnel_cpu_per_1k_rt"] = tcpu / n * 1000
        result["tunnel_cpu_per_gb"] = tcpu / gb
        # Which side of the system call line the tunnel's CPU is on.
        result["tunnel_user_per_1k_rt"] = user / n * 1000
        result["tunnel_sys_per_1k_rt"] = system / n * 1000
    result["echo_cpu_per_1k_rt"] = (cpu_seconds(procs.echo.pid) - echo0) / n * 1000
    result["loadgen_cpu_per_1k_rt"] = (own_cpu() - me0) / n * 1000
    return result


async def _idle_rss(reactor: IReactorTCP, procs: Processes, count: int) -> Dict[str, int]:
    clock = IReactorTime(reactor)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", procs.client_port)
    protos = []
    for _ in range(count):
        protos.append(await endpoint.connect(Factory.forProtocol(Protocol)))
    await task.deferLater(clock, 1.0, lambda: None)
    rss = {"server_rss_kib": procs.largest_kib(procs.server.pid, "VmRSS"),
           "client_rss_kib": procs.largest_kib(procs.client.pid, "VmRSS"),
           "sessions": count}
    for p in protos:
        if isinstance(p, Protocol) and p.transport is not None:
            p.transport.loseConnection()
    await task.deferLater(clock, 0.5, lambda: None)
    return rss


def _progress(done: int, total: int, label: str, quiet: bool) -> None:
    if quiet or not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / total)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<30}")
    sys.stderr.flush()


async def run_bench(reactor: IReactorTCP, opts: BenchOptions) -> Dict[str, Any]:
    """Run every cell; returns the JSON-able results.

    :raises RuntimeError: naming the failing cell and path, with the end of
        the tunnel's log.
    """
    tune_malloc()
    cells: List[Cell] = []
    memory: Dict[str, Any] = {}
    total = len(opts["modes"]) * len(opts["sizes"]) * len(opts["sessions"])
    done = 0
    kernel0 = kernel_counters()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in opts["modes"]:
            procs = Processes(tmp, mode, opts["pool"], opts["workers"])
            other: Optional[Processes] = None
            failing = procs
            cell_name = "start-up"
            try:
                await _ready(reactor, procs)
                if opts["against"] is not None:
                    other = failing = Processes(tmp, mode, opts["pool"],
                                                command=opts["against"])
                    await _ready(reactor, other)
                    failing = procs
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
                        failing = procs
                        cell.direct = await _measure(reactor, procs, procs.echo_port, size,
                                                     sessions, opts, tunnel=False)
                        cell.tunnel = await _measure(reactor, procs, procs.client_port, size,
                                                     sessions, opts, tunnel=True)
                        if other is not None:
                            failing = other
                            cell.against = await _measure(
                                reactor, other, other.client_port, size, sessions,
                                opts, tunnel=True, path="--against tunnel")
                        cells.append(cell)
                        done += 1
                memory[mode]["server_peak_rss_kib"] = procs.largest_kib(procs.server.pid, "VmHWM")
                memory[mode]["client_peak_rss_kib"] = procs.largest_kib(procs.client.pid, "VmHWM")
            except Exception as e:  # any failure: name the cell, show the log
                which = "the --against tunnel" if failing is other else "the tunnel"
                raise RuntimeError(f"{cell_name}: {e}; {which}'s log ends "
                                   f"with:\n{failing.log_tail()}") from None
            finally:
                procs.stop()
                if other is not None:
                    other.stop()
    _progress(total, total, "done", opts["quiet"])
    if not opts["quiet"] and sys.stderr.isatty():
        sys.stderr.write("\n")
    kernel = {k: v - kernel0.get(k, 0) for k, v in kernel_counters().items()}
    return {"cells": [asdict(c) for c in cells], "memory": memory, "kernel": kernel,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "against": " ".join(opts["against"]) if opts["against"] else None}


async def _churn_one(reactor: IReactorTCP, procs: Processes,
                     opts: BenchOptions) -> Dict[str, Any]:
    """The churn through one tunnel: RSS rows and session outcomes."""
    relay = Relay(reactor, procs.server_port_b)
    await relay.listen(procs.relay_port)
    try:
        await _ready(reactor, procs)
        churn = Churn(reactor, [procs.client_port, procs.client_port_b], relay,
                      opts["kinds"])

        def rss() -> Dict[str, int]:
            # -1: that end's process has exited.
            return {f"{role}_rss_kib": procs.largest_kib(p.pid, "VmRSS")
                    if p.poll() is None else -1
                    for role, p in (("client", procs.client), ("server", procs.server))}

        rows = await churn_rss(reactor, churn, rss, opts["churn"], opts["warmup"])
        return {"rows": rows, "outcomes": churn.outcomes}
    finally:
        await relay.stop()


async def run_churn(reactor: IReactorTCP, opts: BenchOptions) -> Dict[str, Any]:
    """``--churn``: for each mode, the churn through this tunnel, then
    through ``--against`` (fresh processes each).

    :raises RuntimeError: naming the tunnel that failed, with the end of its log.
    """
    tune_malloc()
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in opts["modes"]:
            results[mode] = {}
            commands: List[Tuple[str, Optional[List[str]]]] = [("ours", None)]
            if opts["against"] is not None:
                commands.append(("against", opts["against"]))
            for name, command in commands:
                procs = Processes(tmp, mode, opts["pool"], opts["workers"],
                                  command=command, relayed=True)
                try:
                    results[mode][name] = await _churn_one(reactor, procs, opts)
                except Exception as e:
                    which = "the --against tunnel" if command else "the tunnel"
                    raise RuntimeError(f"churn {mode}: {e}; {which}'s log ends "
                                       f"with:\n{procs.log_tail()}") from None
                finally:
                    procs.stop()
    return {"churn": results, "kinds": opts["kinds"], "warmup": opts["warmup"],
            "against": " ".join(opts["against"]) if opts["against"] else None}


def run(opts: BenchOptions) -> int:
    """Run the benchmark with parsed options on the global reactor; print the report.

    :returns: the exit status (1 when the benchmark failed).
    """
    result: Dict[str, Any] = {}
    error: List[Optional[str]] = [None]

    async def go(reactor: IReactorTCP) -> None:
        try:
            if opts["churn"]:
                result.update(await run_churn(reactor, opts))
            else:
                result.update(await run_bench(reactor, opts))
        except RuntimeError as e:
            error[0] = str(e)

    try:
        task.react(lambda r: defer.ensureDeferred(go(r)), [])
    except SystemExit as e:
        if e.code:
            sys.stderr.write("tigertunnel: error: bench failed (see above)\n")
            return 1
    if error[0] is not None:
        sys.stderr.write(f"{error[0]}\ntigertunnel: error: bench failed (see above)\n")
        return 1
    if opts["churn"]:
        print_churn(result)
    else:
        print_report(result)
    if opts["json"]:
        with open(opts["json"], "w") as f:
            json.dump(result, f, indent=2)
    return 0
