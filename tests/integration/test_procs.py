"""Tests for tigertunnel.tools.procs: /proc probes, on this very process."""

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.tools import procs


class ProcsTests(SynchronousTestCase):
    """What /proc says about the test process itself."""

    def test_own_process(self) -> None:
        """This process runs, has used CPU, has a resident size and a peak at least as large."""
        pid = os.getpid()
        self.assertTrue(procs.pid_running(pid))
        self.assertGreater(procs.cpu_seconds(pid), 0)
        rss = procs.rss_kib(pid)
        self.assertGreater(rss, 0)
        self.assertGreaterEqual(procs.memory_kib(pid, "VmHWM"), rss)
        self.assertEqual(procs.memory_kib(pid, "NoSuchField"), 0)
        self.assertIn(pid, procs.with_children(os.getppid()))

    def test_descriptors_and_sockets(self) -> None:
        """A listening socket adds one descriptor and shows up in LISTEN state on its port."""
        pid = os.getpid()
        before = procs.fd_count(pid)
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        self.assertEqual(procs.fd_count(pid), before + 1)
        port = sock.getsockname()[1]
        mine = [s for s in procs.tcp_sockets(pid) if s.local_port == port]
        self.assertEqual([s.state for s in mine], ["LISTEN"])
        self.assertIn(mine[0].inode, procs.socket_inodes(pid))

    def test_gone_process(self) -> None:
        """A pid that does not exist is not running, and reading its CPU time raises OSError."""
        dead = 2 ** 22 + 12345  # above the default pid_max
        self.assertFalse(procs.pid_running(dead))
        self.assertRaises(OSError, procs.cpu_seconds, dead)

    def test_kernel_counters(self) -> None:
        """The kernel counters are the named ones, as integers."""
        counters = procs.kernel_counters()
        self.assertTrue(set(counters) <= set(procs.KERNEL_COUNTERS))
        self.assertTrue(all(isinstance(v, int) for v in counters.values()))
