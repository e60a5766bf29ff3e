"""Tests for tigertunnel.ops.startup: binding before twistd daemonizes, and the reachable-listener check."""

import io
import os
import sys
from typing import List

from twisted.application.service import Service
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.config.model import Role, TunnelConfig, parse_proxy
from tigertunnel.errors import ListenError
from tigertunnel.ops.startup import bind_before_daemonizing, probe_replay_file, reachable_tb_listeners


class Recorder(Service):
    """A service that records its binding; its binding may fail."""

    def __init__(self, error: "Exception | None" = None) -> None:
        self.calls: List[str] = []
        self.error = error

    def privilegedStartService(self) -> None:
        self.calls.append("bind")
        if self.error is not None:
            raise self.error


class BindTests(SynchronousTestCase):
    """bind_before_daemonizing binds now, and a failure is one line and exit 1."""

    def setUp(self) -> None:
        self.err = io.StringIO()
        self.patch(sys, "stderr", self.err)

    def test_bound_now(self) -> None:
        """The ports are bound at once, silently."""
        inner = Recorder()
        bind_before_daemonizing(inner)
        self.assertEqual(inner.calls, ["bind"])
        self.assertEqual(self.err.getvalue(), "")

    def test_failure_is_one_line(self) -> None:
        """A port that cannot be bound prints one line naming it on stderr and exits 1."""
        inner = Recorder(ListenError("cannot listen on 127.0.0.1:3000: Address already in use"))
        error = self.assertRaises(SystemExit, bind_before_daemonizing, inner)
        self.assertEqual(error.code, 1)
        self.assertEqual(self.err.getvalue(), "tigertunnel: error: cannot start: cannot listen "
                                              "on 127.0.0.1:3000: Address already in use\n")


class ReplayProbeTests(SynchronousTestCase):
    """probe_replay_file tries the server's replay file before twistd daemonizes."""

    def setUp(self) -> None:
        self.err = io.StringIO()
        self.patch(sys, "stderr", self.err)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def test_usable_or_new_file(self) -> None:
        """A path with no file yet is left to the service (nothing created); a replay cache passes, silently."""
        from tigertunnel.ops.replay import FileReplayCache
        path = os.path.join(self.dir, "tt.pid.replay")
        probe_replay_file(path)
        self.assertFalse(os.path.exists(path))
        FileReplayCache(path).close()
        probe_replay_file(path)
        self.assertEqual(self.err.getvalue(), "")

    def test_foreign_file_is_one_line(self) -> None:
        """A file that is not a replay cache exits 1 with one line naming it, and is left as it was."""
        path = os.path.join(self.dir, "foreign.replay")
        with open(path, "wb") as f:
            f.write(b"something else entirely")
        error = self.assertRaises(SystemExit, probe_replay_file, path)
        self.assertEqual(error.code, 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"tigertunnel: error: cannot start: {path}: "
                                            f"not a tigertunnel replay cache"), lines[0])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"something else entirely")


def config(role: Role, *pairs: str) -> TunnelConfig:
    return TunnelConfig(role=role, pairs=[parse_proxy(p, i) for i, p in enumerate(pairs)])


class ReachableTests(SynchronousTestCase):
    """Which TB-side listeners of a client other hosts can reach."""

    def test_client_addresses(self) -> None:
        """All interfaces, 0.0.0.0, :: and a non-loopback address are named; 127.0.0.0/8, ::1 and localhost are not."""
        cfg = config(Role.CLIENT, ":4000,h:1", "0.0.0.0:4001,h:1", "[::]:4002,h:1",
                     "192.0.2.7:4003,h:1", "127.0.0.1:4004,h:1", "127.0.0.2:4005,h:1",
                     "[::1]:4006,h:1", "localhost:4007,h:1")
        self.assertEqual(reachable_tb_listeners(cfg),
                         ["*:4000 (all IPv4 interfaces)", "0.0.0.0:4001", "[::]:4002",
                          "192.0.2.7:4003"])

    def test_server_never_named(self) -> None:
        """A server's listeners take pool connections (which must prove the key): none is named."""
        self.assertEqual(reachable_tb_listeners(config(Role.SERVER, ":3000,127.0.0.1:1")), [])
