"""What Linux's ``/proc`` tells about a process: CPU time, memory, sockets.

Used by the benchmark (CPU per round trip, RSS) and by the integration
tests (descriptor and socket leaks, CPU spent while refusing connections).
Every function reads ``/proc`` once when called; a process that has just
exited makes them raise ``OSError`` (``FileNotFoundError``) unless said
otherwise.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

#: Clock ticks per second, the unit of the CPU times in ``/proc/<pid>/stat``.
TICKS = os.sysconf("SC_CLK_TCK")

#: Kernel TCP counters (/proc/net/netstat) that explain stalls in a run:
#: connections dropped by a full accept queue, and SYNs sent again.
KERNEL_COUNTERS = ("ListenOverflows", "TCPSynRetrans", "TCPTimeouts")

#: TCP states as /proc/net/tcp numbers them (include/net/tcp_states.h).
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
    5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT",
    9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}


def _stat_fields(pid: int) -> List[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def cpu_split(pid: int) -> Tuple[float, float]:
    """User and system CPU seconds ``pid`` has used so far."""
    fields = _stat_fields(pid)
    # After the command name: state is field 3, utime 14 and stime 15.
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far."""
    user, system = cpu_split(pid)
    return user + system


def with_children(pid: int) -> List[int]:
    """``pid`` and its child processes (the workers of a tunnel end)."""
    pids = [pid]
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            pids.append(int(name))
    return pids


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie. Never raises."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = _stat_fields(pid)[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True  # no procfs: trust kill(0)
    return state not in ("Z", "X")


def memory_kib(pid: int, key: str) -> int:
    """A memory field of ``/proc/<pid>/status`` in KiB (``VmRSS``, ``VmHWM``).

    :returns: 0 when the process has no such field (a zombie has no memory).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    """The resident set size (``VmRSS``) of ``pid`` in KiB."""
    return memory_kib(pid, "VmRSS")


def fd_count(pid: int) -> int:
    """The number of open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid: int) -> List[int]:
    """The inodes of the sockets ``pid`` has open."""
    inodes = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(os.path.join(base, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.append(int(target[8:-1]))
    return inodes


@dataclass(frozen=True)
class TcpSocket:
    """One TCP socket held by a process, as /proc/<pid>/net/tcp shows it.

    :ivar timer: the kernel's active timer (0 none, 1 retransmit, 2
        keepalive, 3 TIME_WAIT, 4 zero-window probe).
    """

    local_port: int
    remote_port: int
    state: str
    timer: int
    inode: int


def tcp_sockets(pid: int) -> List[TcpSocket]:
    """The TCP sockets (IPv4 and IPv6) held by ``pid``, in its network namespace."""
    mine = set(socket_inodes(pid))
    found = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            inode = int(fields[9])
            if inode not in mine:
                continue
            found.append(TcpSocket(
                local_port=int(fields[1].rsplit(":", 1)[1], 16),
                remote_port=int(fields[2].rsplit(":", 1)[1], 16),
                state=TCP_STATES.get(int(fields[3], 16), fields[3]),
                timer=int(fields[5].split(":")[0], 16), inode=inode))
    return found


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
