"""Tests for the security settings of a tunnel end: where the replay cache lives, who may own a
key file, --metrics-public, and hardening before keys are read (tap, cli, keys.files, ops.replay)."""

import hashlib
import os
import sys
import time
from typing import Any, List

from twisted.application import app
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.keydir import KeyDirCase
from tigertunnel import cli, logs, tap
from tigertunnel.errors import KeyFileError, ReplayCacheError
from tigertunnel.keys import files
from tigertunnel.keys.files import load_kem_secret_file, load_psk_file, trusted_owners
from tigertunnel.keys.generate import keygen
from tigertunnel.net.listeners import endpoint_is_local
from tigertunnel.ops import hardening, replay, startup, validators
from tigertunnel.ops.hardening import Hardening
from tigertunnel.ops.replay import ReplayCacheService, replay_path
from tigertunnel.wire.replaywindow import Verdict

#: A user id no file here belongs to (the tests run as root or as a user).
STRANGER = 54321
PAIR = "127.0.0.1:3000,127.0.0.1:3001"


@implementer(IReactorProcess)
class ProcessClock(MemoryReactorClock):
    """A MemoryReactorClock that claims to spawn processes (a worker supervisor is built, never started)."""

    def spawnProcess(self, *args: Any, **kw: Any) -> Any:
        raise AssertionError("no process is started in these tests")


def twistd_parse(argv: List[str], twistd: Any = None) -> tap.Options:
    """Parse ``argv`` as twistd hands it to the plugin (tap.Options under twistd's options)."""
    options = tap.Options()
    options.parent = twistd if twistd is not None else app.ServerOptions()
    options.parseOptions(argv)
    return options


class KeyOwnerTests(KeyDirCase):
    """A secret key file owned by another user (not root) is refused."""

    def setUp(self) -> None:
        super().setUp()
        if os.geteuid() != 0:
            self.skipTest("changing a file's owner needs root")
        self.key = self.path("secret.key")
        keygen(self.key, key_id=5)

    def test_stranger_refused(self) -> None:
        """A PSK or KEM secret file owned by another user fails with one line naming the file and its owner."""
        os.chown(self.key, STRANGER, -1)
        for loader in (load_psk_file, load_kem_secret_file):
            err = self.assertRaises(KeyFileError, loader, self.key)
            self.assertEqual(err.reason, "InsecureOwner")
            self.assertIn(self.key, str(err))
            self.assertIn(f"uid {STRANGER}", str(err))
            self.assertNotIn("\n", str(err))

    def test_root_and_self_accepted(self) -> None:
        """Files owned by root or by this user load."""
        self.assertEqual(load_psk_file(self.key).ids(), [5])
        self.assertEqual(trusted_owners(), frozenset({os.geteuid(), 0}))

    def test_twistd_target_user_accepted(self) -> None:
        """Under ``twistd -u UID`` a key file owned by that user loads; without -u it is refused."""
        os.chown(self.key, STRANGER, -1)
        twistd = app.ServerOptions()
        twistd["uid"] = STRANGER
        self.patch(hardening, "harden_process", lambda: Hardening(True, True))
        self.patch(hardening, "_applied", None)
        options = twistd_parse(["server", "-p", PAIR, "-k", self.key], twistd)
        self.assertEqual(options.subOptions.config.psk.ids(), [5])
        error = self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                                  ["server", "-p", PAIR, "-k", self.key])
        self.assertIn("InsecureOwner", str(error))

    def test_public_file_any_owner(self) -> None:
        """Public key files are not owner-checked (anyone may hold them)."""
        path = self.path("x.key")
        with open(path, "w") as f:
            f.write("not read as secret")
        os.chown(path, STRANGER, -1)
        self.assertEqual(files.read_key_file(path, secret=False), b"not read as secret")


class HardeningOrderTests(KeyDirCase):
    """Processes are hardened before any key file is read."""

    def setUp(self) -> None:
        super().setUp()
        self.key = self.path("secret.key")
        keygen(self.key)
        self.order: List[str] = []
        self.patch(hardening, "_applied", None)
        self.patch(hardening, "harden_process", self.fake_harden)
        real = validators.load_psk_file

        def load(path: str, owners: Any = None) -> Any:
            self.order.append("keys")
            return real(path, owners)

        self.patch(validators, "load_psk_file", load)

    def fake_harden(self) -> Hardening:
        """Stands in for the real one, which cannot be undone in the test runner."""
        self.order.append("harden")
        return Hardening(True, True)

    def test_under_twistd(self) -> None:
        """twistd's parse of the plugin options hardens first, then reads the key file."""
        twistd_parse(["server", "-p", PAIR, "-k", self.key])
        self.assertEqual(self.order, ["harden", "keys"])
        self.assertEqual(hardening.applied(), Hardening(True, True))

    def test_not_in_tests(self) -> None:
        """Options parsed outside twistd (a test, check-config) do not harden."""
        tap.Options().parseOptions(["server", "-p", PAIR, "-k", self.key])
        self.assertEqual(self.order, ["keys"])

    def test_console_script(self) -> None:
        """The console script on its own command line hardens before parsing; with argv given it does not."""
        self.patch(sys, "argv", ["tigertunnel", "check-config", "server", "-p", PAIR,
                                 "-k", self.key])
        self.patch(sys, "stdout", open(os.devnull, "w"))
        self.addCleanup(sys.stdout.close)
        self.assertEqual(cli.main(), 0)
        self.assertEqual(self.order, ["harden", "keys"])
        self.order.clear()
        self.patch(hardening, "_applied", None)
        self.assertEqual(cli.main(["check-config", "server", "-p", PAIR, "-k", self.key]), 0)
        self.assertEqual(self.order, ["keys"])


class MetricsPublicTests(KeyDirCase):
    """--metrics beyond loopback needs --metrics-public."""

    def test_endpoint_is_local(self) -> None:
        """Loopback interfaces and UNIX sockets are local; no interface or another address is not."""
        local = ["tcp:9101:interface=127.0.0.1", "tcp:9101:interface=127.0.0.5",
                 r"tcp6:9101:interface=\:\:1", "tcp:9101:interface=localhost",
                 "unix:/run/tt-metrics.sock"]
        public = ["tcp:9101", "tcp:9101:interface=0.0.0.0", "tcp:9101:interface=10.1.2.3",
                  r"tcp6:9101:interface=\:\:", "tcp:9101:interface=example.org"]
        self.assertEqual([endpoint_is_local(d) for d in local], [True] * len(local))
        self.assertEqual([endpoint_is_local(d) for d in public], [False] * len(public))

    def test_refused_without_flag(self) -> None:
        """--metrics tcp:9101 is refused with one line naming it and the way out; --metrics-public allows it."""
        base = ["server", "-p", PAIR, "--plaintext", "--metrics", "tcp:9101"]
        error = self.assertRaises(usage.UsageError, tap.Options().parseOptions, base)
        self.assertIn("'tcp:9101'", str(error))
        self.assertIn("--metrics-public", str(error))
        self.assertNotIn("\n", str(error))
        options = tap.Options()
        options.parseOptions(base + ["--metrics-public"])
        self.assertEqual(options.subOptions.operations.metrics, "tcp:9101")
        options = tap.Options()
        options.parseOptions(["server", "-p", PAIR, "--plaintext", "--metrics",
                              "tcp:9101:interface=127.0.0.1"])
        self.assertEqual(options.subOptions.operations.metrics, "tcp:9101:interface=127.0.0.1")


class ReplayPathTests(KeyDirCase):
    """Where a tunnel server keeps its replay cache."""

    def test_resolution(self) -> None:
        """--replay-file wins ('memory' or '' means none), else PIDFILE.replay, else memory."""
        self.assertEqual(replay_path("x.replay", "/run/tt.pid"), os.path.abspath("x.replay"))
        self.assertIsNone(replay_path("memory", "/run/tt.pid"))
        self.assertIsNone(replay_path("", "/run/tt.pid"))
        self.assertEqual(replay_path(None, "/run/tt.pid"), "/run/tt.pid.replay")
        self.assertIsNone(replay_path(None, ""))
        self.assertIsNone(replay_path(None, None))

    def test_bad_directory(self) -> None:
        """A --replay-file in a directory that does not exist, or naming a directory, is refused at parse time."""
        base = ["server", "-p", PAIR, "--plaintext", "--replay-file"]
        missing = self.path("nowhere/x.replay")
        error = self.assertRaises(usage.UsageError, tap.Options().parseOptions, base + [missing])
        self.assertIn(repr(missing), str(error))
        error = self.assertRaises(usage.UsageError, tap.Options().parseOptions, base + [self.dir])
        self.assertIn("is a directory", str(error))

    def make(self, argv: List[str], twistd: Any = None) -> Any:
        """makeService on a MemoryReactorClock; return the service tree."""
        self.patch(hardening, "harden_process", lambda: Hardening(True, True))
        self.patch(hardening, "_applied", None)
        # These tests read the service tree; binding under twistd (on this
        # memory reactor, whose ports cannot take an accept gate) is tested
        # in test_tap and test_startup.
        self.patch(startup, "bind_before_daemonizing", lambda top: None)
        self.addCleanup(logs.set_level, "info")
        options = twistd_parse(argv, twistd) if twistd is not None else tap.Options()
        if twistd is None:
            options.parseOptions(argv)
        return tap.makeService(options, reactor=ProcessClock())

    def replay_service(self, top: Any) -> ReplayCacheService:
        """The tunnel end's replay cache service."""
        found = [s for s in top.late + top.early if isinstance(s, ReplayCacheService)]
        self.assertEqual(len(found), 1)
        return found[0]

    def test_next_to_twistd_pidfile(self) -> None:
        """Under twistd --pidfile P every pair shares one cache, opened at P.replay when the service starts."""
        twistd = app.ServerOptions()
        twistd["pidfile"] = self.path("tt.pid")
        top = self.make(["server", "-p", PAIR, "-p", "127.0.0.1:3002,127.0.0.1:3003",
                         "--plaintext"], twistd)
        service = self.replay_service(top)
        self.assertEqual(service.path, self.path("tt.pid.replay"))
        self.assertEqual({id(m.replay_cache) for m in top.multiplexers}, {id(service)})
        self.assertFalse(os.path.exists(service.path))  # opened only at start
        top.startService()
        self.addCleanup(top.stopService)
        self.assertTrue(os.path.exists(service.path))
        digest = hashlib.sha256(b"hello").digest()
        stamp = int(time.time())
        self.assertIs(service.check_and_add(digest, stamp), Verdict.FRESH)
        self.assertIs(service.check_and_add(digest, stamp), Verdict.REPLAYED)
        # Another process (a worker, or this server after a restart) sees it.
        other = replay.FileReplayCache(service.path)
        self.addCleanup(other.close)
        self.assertIs(other.check_and_add(digest, stamp), Verdict.REPLAYED)

    def test_console_script_in_memory(self) -> None:
        """Without a pidfile or --replay-file, one process keeps the cache in its memory."""
        top = self.make(["server", "-p", PAIR, "--plaintext"])
        service = self.replay_service(top)
        self.assertIsNone(service.path)
        self.assertIsNone(service.descriptor)

    def test_workers_share_memory_without_file(self) -> None:
        """Without a pidfile or --replay-file, --workers 2 makes one shared-memory table that worker 0 uses and hands to its workers."""
        from tigertunnel.ops.workers import WorkerSupervisor

        top = self.make(["server", "-p", PAIR, "--plaintext", "--workers", "2"])
        service = self.replay_service(top)
        supervisor, = [s for s in top.late if isinstance(s, WorkerSupervisor)]
        self.assertIsNone(service.path)
        self.assertIsNotNone(service.descriptor)
        self.assertEqual(supervisor.replay, service.descriptor)
        self.addCleanup(os.close, service.descriptor)
        self.assertIn("--replay-file=memory", supervisor.command)
        top.startService()
        self.addCleanup(top.stopService)
        # A worker's view of the same table (what --worker-index opens).
        worker = replay.FileReplayCache.from_descriptor(service.descriptor)
        self.addCleanup(worker.close)
        digest = hashlib.sha256(b"hello").digest()
        stamp = int(time.time())
        self.assertIs(service.check_and_add(digest, stamp), Verdict.FRESH)
        self.assertIs(worker.check_and_add(digest, stamp), Verdict.REPLAYED)

    def test_worker_opens_handed_memory(self) -> None:
        """A server worker started without a replay file opens the shared memory worker 0 handed it (named by TIGERTUNNEL_REPLAY_FD)."""
        import socket

        from tigertunnel.ops.workers import (
            BOARD_FD_ENV,
            LISTEN_FDS_ENV,
            REPLAY_FD_ENV,
            create_board,
        )

        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        board_fd, _ = create_board(1, 2)
        self.addCleanup(os.close, board_fd)
        shared = replay.create_shared_memory()
        self.addCleanup(os.close, shared)
        self.patch(os, "environ", dict(os.environ, **{
            LISTEN_FDS_ENV: str(sock.fileno()), BOARD_FD_ENV: str(board_fd),
            REPLAY_FD_ENV: str(shared)}))
        pair = f"127.0.0.1:{sock.getsockname()[1]},127.0.0.1:3001"
        top = self.make(["server", "-p", pair, "--plaintext", "--workers", "2",
                         "--worker-index", "1", "--replay-file=memory"])
        service = self.replay_service(top)
        self.assertEqual((service.path, service.descriptor), (None, shared))
        service.startService()
        self.addCleanup(service.stopService)
        worker0 = replay.FileReplayCache.from_descriptor(shared)
        self.addCleanup(worker0.close)
        digest = hashlib.sha256(b"hello").digest()
        stamp = int(time.time())
        self.assertIs(worker0.check_and_add(digest, stamp), Verdict.FRESH)
        self.assertIs(service.check_and_add(digest, stamp), Verdict.REPLAYED)

    def test_explicit_file_passed_to_workers(self) -> None:
        """--replay-file F (or the pidfile default) is passed to the worker processes explicitly."""
        from tigertunnel.ops.workers import WorkerSupervisor

        twistd = app.ServerOptions()
        twistd["pidfile"] = self.path("tt.pid")
        top = self.make(["server", "-p", PAIR, "--plaintext", "--workers", "2"], twistd)
        supervisor, = [s for s in top.late if isinstance(s, WorkerSupervisor)]
        self.assertIn(f"--replay-file={self.path('tt.pid.replay')}", supervisor.command)

    def test_damaged_file_stops_start(self) -> None:
        """A replay file that is not ours stops start-up with the one-line ReplayCacheError."""
        path = self.path("foreign.replay")
        with open(path, "wb") as f:
            f.write(b"something else entirely")
        top = self.make(["server", "-p", PAIR, "--plaintext", "--replay-file", path])
        error = self.assertRaises(ReplayCacheError, top.startService)
        self.assertIn(path, str(error))
