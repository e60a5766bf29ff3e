"""What a worker does first (inherited sockets, its supervisor) and the --workers options."""

import os
import socket
from typing import Any, cast

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel import tap
from tigertunnel.config import clusterfile
from tigertunnel.config.model import ProxyPair, parse_proxy
from tigertunnel.errors import ConfigError
from tigertunnel.keys.generate import keygen
from tigertunnel.net.sockets import socket_family
from tigertunnel.ops.plan import Plan, make_plan
from tigertunnel.ops.workers.balance import create_board
from tigertunnel.ops.workers.bootstrap import (
    BOARD_FD_ENV,
    LISTEN_FDS_ENV,
    REPLAY_FD_ENV,
    SUPERVISOR_ENV,
    inherited_listen_fds,
    inherited_replay_descriptor,
    safe_path_flag,
    supervisor_alive,
    worker_command,
)


class SupervisorAliveTests(SynchronousTestCase):
    """Whether a worker's supervisor still runs."""

    def test_supervisor_check(self) -> None:
        """Without the variable a process is not a supervised worker; with
        our parent's pid its supervisor is alive; with another pid it is gone."""
        self.assertTrue(supervisor_alive({}))
        self.assertTrue(supervisor_alive({SUPERVISOR_ENV: str(os.getppid())}))
        self.assertFalse(supervisor_alive({SUPERVISOR_ENV: str(os.getppid() + 1)}))


def listening(family: int, host: str) -> socket.socket:
    """A TCP socket of ``family`` listening on ``host``, on a free port."""
    sock = socket.socket(family)
    sock.bind((host, 0))
    sock.listen(1)
    return sock


def pair_for(sock: socket.socket, index: int = 0) -> ProxyPair:
    """Proxy pair ``index`` whose listen address is where ``sock`` is bound."""
    host, port = sock.getsockname()[:2]
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return parse_proxy(f"{text},127.0.0.1:9", index)


class InheritedSocketTests(SynchronousTestCase):
    """What a worker checks about the sockets it inherited."""

    def test_listening_sockets_accepted(self) -> None:
        """Listening IPv4 and IPv6 sockets bound to their pairs' addresses are taken, in pair order."""
        socks = []
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            try:
                sock = listening(family, host)
            except OSError:
                continue
            self.addCleanup(sock.close)
            socks.append(sock)
        fds = ",".join(str(s.fileno()) for s in socks)
        pairs = [pair_for(s, i) for i, s in enumerate(socks)]
        got = inherited_listen_fds(pairs, {LISTEN_FDS_ENV: fds})
        self.assertEqual(got, {i: s.fileno() for i, s in enumerate(socks)})
        self.assertEqual([socket_family(fd) for fd in got.values()],
                         [s.family for s in socks])

    def test_unusable_sockets_refused(self) -> None:
        """Missing, malformed, wrong count, closed, not listening, not TCP,
        or bound to another address than the pair's."""
        unbound = socket.socket()
        self.addCleanup(unbound.close)
        sock = listening(socket.AF_INET, "127.0.0.1")
        self.addCleanup(sock.close)
        other = listening(socket.AF_INET, "127.0.0.1")
        self.addCleanup(other.close)
        unix = socket.socket(socket.AF_UNIX)
        self.addCleanup(unix.close)
        unix.bind(self.mktemp())  # relative: an absolute path may pass the 108-byte limit
        unix.listen(1)
        closed = socket.socket()
        dead = closed.fileno()
        closed.close()
        one = [pair_for(sock)]
        for env, pairs, text in (
                ({}, one, "does not list 1 listening sockets"),
                ({LISTEN_FDS_ENV: "x"}, one, "does not list"),
                ({LISTEN_FDS_ENV: f"{sock.fileno()}"}, one * 2, "does not list 2"),
                ({LISTEN_FDS_ENV: f"{dead}"}, one, f"inherited descriptor {dead}"),
                ({LISTEN_FDS_ENV: f"{unbound.fileno()}"}, one,
                 "is not a listening TCP socket"),
                ({LISTEN_FDS_ENV: f"{unix.fileno()}"}, one,
                 "is not a listening TCP socket"),
                ({LISTEN_FDS_ENV: f"{other.fileno()}"}, one,
                 f"is bound to ('127.0.0.1', {other.getsockname()[1]}), not to "
                 f"pair0's 127.0.0.1:{sock.getsockname()[1]}")):
            with self.assertRaises(ConfigError) as ctx:
                inherited_listen_fds(pairs, env)
            self.assertIn(text, str(ctx.exception))


class ReplayDescriptorTests(SynchronousTestCase):
    """A server worker's shared replay cache, named by its environment."""

    def test_descriptor(self) -> None:
        """The variable names the descriptor; without it there is none; a malformed one is refused in one line."""
        self.assertEqual(inherited_replay_descriptor({REPLAY_FD_ENV: "6"}), 6)
        self.assertIsNone(inherited_replay_descriptor({}))
        with self.assertRaises(ConfigError) as ctx:
            inherited_replay_descriptor({REPLAY_FD_ENV: "six"})
        self.assertIn("TIGERTUNNEL_REPLAY_FD='six' does not name the replay cache",
                      str(ctx.exception))


class WorkerOptionTests(SynchronousTestCase):
    """--workers and --worker-index as the options parse them."""

    def setUp(self) -> None:
        self.key = self.mktemp()
        keygen(self.key)

    pair = "127.0.0.1:1,127.0.0.1:2"

    def parse(self, *args: str) -> tap.Options:
        """Parse a client run with one pair, a key and ``args``."""
        opts = tap.Options()
        opts.parseOptions(["client", "-p", self.pair, "-k", self.key, *args])
        return opts

    def test_without_options(self) -> None:
        """Workers get the command line less --config/--replica, read as
        getopt reads it (a unique prefix such as --co or --repl is the option)."""
        args = ["-k", "k", "--config", "c.ini", "--replica=1", "--conf=x",
                "--repl", "2", "--co", "y", "--cluster", "5", "-m50", "--", "more"]
        given = clusterfile.given_options(tap.ClientOptions(), args)
        self.assertEqual(given.without(("config", "replica")),
                         ["-k", "k", "--cluster", "5", "-m", "50", "--", "more"])
        self.assertEqual(given.values["config"], "y")

    def test_default_one(self) -> None:
        """Without --workers a tunnel end is one process."""
        self.assertEqual(self.parse().subOptions.config.workers, 1)

    def test_workers_and_raw_args(self) -> None:
        """--workers is kept in the arguments the workers are started with."""
        opts = self.parse("--workers", "4", "--metrics", "tcp:0:interface=127.0.0.1")
        self.assertEqual(opts.subOptions.config.workers, 4)
        self.assertEqual(opts.subOptions.raw_args[-4:],
                         ["--workers", "4", "--metrics", "tcp:0:interface=127.0.0.1"])
        self.assertEqual(opts.subOptions.operations.metrics, "tcp:0:interface=127.0.0.1")

    def plan(self, opts: tap.Options) -> Plan:
        """The start-up plan of a parsed worker."""
        sub = opts.subOptions
        return make_plan(sub.config, sub.operations, sub["log-level"],
                         int(sub["worker-index"]), sub.raw_args, sub.cwd)

    def test_worker_has_no_metrics(self) -> None:
        """A worker serves on the inherited socket; metrics are worker 0's.
        Parsing inherits nothing; the plan takes the socket and the board."""
        sock = listening(socket.AF_INET, "127.0.0.1")
        self.addCleanup(sock.close)
        board_fd, board = create_board(1, 4)
        self.addCleanup(os.close, board_fd)
        self.patch(os, "environ", dict(os.environ, **{
            LISTEN_FDS_ENV: str(sock.fileno()), BOARD_FD_ENV: str(board_fd)}))
        self.pair = f"127.0.0.1:{sock.getsockname()[1]},127.0.0.1:2"
        opts = self.parse("--workers", "4", "--metrics", "tcp:0:interface=127.0.0.1",
                          "--worker-index", "3")
        self.assertIsNone(opts.subOptions.operations.metrics)
        self.assertEqual(opts.subOptions.config.inherited_fds, {})
        plan = self.plan(opts)
        self.assertEqual(plan.config.inherited_fds, {0: sock.fileno()})
        self.assertEqual(plan.worker_index, 3)
        # The worker maps worker 0's board: what one writes, the other reads.
        inherited = plan.board
        assert inherited is not None
        inherited.publish(0, 3, 7)
        self.assertEqual(board.read(0, 3)[0], 7)

    def test_worker_without_board(self) -> None:
        """A worker started without the accept board parses (parsing inherits
        nothing), and its plan is refused in one line; makeService says so."""
        sock = listening(socket.AF_INET, "127.0.0.1")
        self.addCleanup(sock.close)
        self.patch(os, "environ", dict(os.environ, **{
            LISTEN_FDS_ENV: str(sock.fileno())}))
        self.pair = f"127.0.0.1:{sock.getsockname()[1]},127.0.0.1:2"
        opts = self.parse("--workers", "2", "--worker-index", "1")
        expected = "TIGERTUNNEL_BOARD_FD='' does not name the accept board"
        with self.assertRaises(ConfigError) as ctx:
            self.plan(opts)
        self.assertIn(expected, str(ctx.exception))
        with self.assertRaises(usage.UsageError) as caught:
            tap.makeService(opts, reactor=cast(Any, MemoryReactorClock()))
        self.assertIn(expected, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_bad_values(self) -> None:
        """Out-of-range or malformed --workers / --worker-index values are refused, naming the value."""
        for args, text in ((["--workers", "0"], "invalid workers: '0'"),
                           (["--workers", "65"], "invalid workers: '65'"),
                           (["--workers", "x"], "invalid workers: 'x'"),
                           (["--worker-index", "1"], "--worker-index needs"),
                           (["--workers", "2", "--worker-index", "2"],
                            "invalid worker-index: '2'")):
            with self.assertRaises(usage.UsageError) as ctx:
                self.parse(*args)
            self.assertIn(text, str(ctx.exception))


class WorkerCommandTests(SynchronousTestCase):
    """The command a worker is started with."""

    def test_same_interpreter_and_arguments(self) -> None:
        """A worker runs ``python -P -m tigertunnel`` with this interpreter and the given arguments."""
        import sys
        self.assertEqual(worker_command(["client", "-p", "x"]),
                         [sys.executable, safe_path_flag(), "-m", "tigertunnel",
                          "client", "-p", "x"])

    def test_safe_path_flag(self) -> None:
        """Python 3.11 and later get ``-P``; older versions get isolated mode ``-I``."""
        self.assertEqual(safe_path_flag((3, 11, 0)), "-P")
        self.assertEqual(safe_path_flag((3, 13, 1, "final", 0)), "-P")
        self.assertEqual(safe_path_flag((3, 10, 12)), "-I")
