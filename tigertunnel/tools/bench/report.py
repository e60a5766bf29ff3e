"""The benchmark's results: one :class:`Cell` per workload, and the text report."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping


@dataclass
class Cell:
    """Results of one cell (both paths)."""

    mode: str
    size: int
    sessions: int
    direct: Dict[str, float] = field(default_factory=dict)
    tunnel: Dict[str, float] = field(default_factory=dict)
    #: The same workload through ``--against CMD`` (empty without it).
    against: Dict[str, float] = field(default_factory=dict)


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


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs else "-"


def format_against(cells: List[Cell], command: str) -> str:
    """This tunnel vs ``--against CMD``, cell by cell: each figure and its ratio.

    The user-CPU column is the part of the CPU spent outside the kernel
    (``-`` for results recorded without it).
    """
    head = (f"{'mode':<4} {'frame':>8} {'sess':>4} | {'CPU-s/1k RT':>17} {'x':>5} | "
            f"{'user CPU-s/1k RT':>17} {'x':>5} | "
            f"{'p50 ms':>13} {'x':>5} | {'frames/s':>15} {'x':>5} | "
            f"{'CPU-s/GB':>15} {'x':>5}")
    lines = [f"this tunnel / {command} (same cells, same run; x = ours/theirs)",
             f"{'':<18} | {'ours / theirs':>23} | {'ours / theirs':>23} | "
             f"{'ours / theirs':>19} | {'ours / theirs':>21} | {'ours / theirs':>21}",
             head, "-" * len(head)]
    for c in cells:
        t, a = c.tunnel, c.against
        if not a:
            continue
        user_t, user_a = t.get("tunnel_user_per_1k_rt"), a.get("tunnel_user_per_1k_rt")
        user = (f"{user_t:>8.3f} {user_a:>8.3f} {_ratio(user_t, user_a):>5}"
                if user_t is not None and user_a is not None else f"{'-':>8} {'-':>8} {'-':>5}")
        lines.append(
            f"{c.mode:<4} {c.size:>8} {c.sessions:>4} | "
            f"{t['tunnel_cpu_per_1k_rt']:>8.3f} {a['tunnel_cpu_per_1k_rt']:>8.3f} "
            f"{_ratio(t['tunnel_cpu_per_1k_rt'], a['tunnel_cpu_per_1k_rt']):>5} | "
            f"{user} | "
            f"{t['p50_ms']:>6.3f} {a['p50_ms']:>6.3f} {_ratio(t['p50_ms'], a['p50_ms']):>5} | "
            f"{t['frames_per_s']:>7.0f} {a['frames_per_s']:>7.0f} "
            f"{_ratio(t['frames_per_s'], a['frames_per_s']):>5} | "
            f"{t['tunnel_cpu_per_gb']:>7.2f} {a['tunnel_cpu_per_gb']:>7.2f} "
            f"{_ratio(t['tunnel_cpu_per_gb'], a['tunnel_cpu_per_gb']):>5}")
    return "\n".join(lines)


def memory_lines(memory: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """One line per mode: peak RSS of each tunnel end, and RSS with idle sessions."""
    lines = []
    for mode, mem in memory.items():
        line = (f"{mode}: peak RSS server {mem['server_peak_rss_kib'] / 1024:.1f} MiB, "
                f"client {mem['client_peak_rss_kib'] / 1024:.1f} MiB")
        if "idle" in mem:
            idle = mem["idle"]
            line += (f"; with {idle['sessions']} idle sessions: server "
                     f"{idle['server_rss_kib'] / 1024:.1f} MiB, client "
                     f"{idle['client_rss_kib'] / 1024:.1f} MiB")
        lines.append(line)
    return lines


def kernel_line(kernel: Mapping[str, int]) -> str:
    """The kernel's TCP trouble counters during the run, in one line."""
    return (f"kernel, during the run: {kernel.get('ListenOverflows', 0)} listen "
            f"queue overflows, {kernel.get('TCPSynRetrans', 0)} SYN "
            f"retransmissions, {kernel.get('TCPTimeouts', 0)} TCP timeouts "
            f"(machine-wide; non-zero means stalls of 1 s or more)")


def print_report(result: Mapping[str, Any]) -> None:
    """Print the table, the memory lines and the kernel line of a run's results."""
    cells = [Cell(**c) for c in result["cells"]]
    print(format_table(cells))
    if result.get("against"):
        print()
        print(format_against(cells, result["against"]))
    for line in memory_lines(result["memory"]):
        print(line)
    kernel = result.get("kernel") or {}
    if kernel:
        print(kernel_line(kernel))


def format_churn(mode: str, ours: Mapping[str, Any],
                 against: "Mapping[str, Any] | None", command: "str | None") -> str:
    """RSS of each tunnel end after the churn's warm-up and per 1,000
    sessions, with its growth; ``against`` side by side when given. An RSS
    of -1 (the process had exited) shows as ``exited``."""
    def mib(kib: int) -> str:
        return f"{kib / 1024:>7.1f}" if kib >= 0 else f"{'exited':>7}"

    def grown(first: int, last: int) -> str:
        return f"{(last - first) / 1024:>+7.1f}" if first >= 0 and last >= 0 else f"{'-':>7}"

    runs = [("this tunnel", ours)] + ([(command or "against", against)] if against else [])
    head = f"{'sessions':>8} | " + " | ".join(f"{'client':>7} {'server':>7}" for _ in runs)
    lines = [f"churn {mode}: resident memory (MiB) of each tunnel end, after the "
             f"warm-up (0) and per 1,000 sessions; " + "; ".join(
                 f"{'left' if i == 0 else 'right'}: {name}" for i, (name, _) in enumerate(runs)),
             head, "-" * len(head)]
    rows = [r["rows"] for _, r in runs]
    for i in range(max(len(r) for r in rows)):
        cells = []
        for r in rows:
            if i < len(r):
                cells.append(f"{mib(r[i]['client_rss_kib'])} {mib(r[i]['server_rss_kib'])}")
            else:
                cells.append(f"{'':>7} {'':>7}")
        sessions = next(r[i]["sessions"] for r in rows if i < len(r))
        lines.append(f"{sessions:>8} | " + " | ".join(cells))
    growth = []
    for r in rows:
        growth.append(" ".join(grown(r[0][f"{end}_rss_kib"], r[-1][f"{end}_rss_kib"])
                               for end in ("client", "server")))
    lines.append(f"{'growth':>8} | " + " | ".join(growth))
    for name, r in runs:
        outcomes = "; ".join(
            f"{kind}: " + ", ".join(f"{n} {what}" for what, n in sorted(table.items()))
            for kind, table in r["outcomes"].items())
        lines.append(f"{name}, sessions by outcome: {outcomes}")
    return "\n".join(lines)


def print_churn(result: Mapping[str, Any]) -> None:
    """Print the churn's tables, one per mode."""
    for mode, runs in result["churn"].items():
        print(format_churn(mode, runs["ours"], runs.get("against"), result.get("against")))
