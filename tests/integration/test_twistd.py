"""Real processes: daemonized ``twistd tigertunnel`` and the console script.

Where the messages go (checked here): every start-up error is found before
twistd daemonizes (a bad option, address or key file while twistd parses
the options; a port that cannot be bound, the tunnel's or the metrics
endpoint's, in ``makeService``; KEM keys without native ML-KEM while the
options are parsed), so ``twistd tigertunnel`` (daemonized or ``-n``) and
the console script (``tigertunnel server|client``) alike print exactly one
line ``tigertunnel: error: <message>`` on stderr, exit non-zero and leave no
pidfile and no process behind.

Every process a test starts is stopped in a cleanup (SIGTERM, then SIGKILL),
found by its pidfile or by the test's unique directory in its command line.
"""

import os
import re
import socket
import stat
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.test_sockets import PeerFactory, digest
from tigertunnel.keys.generate import kemgen, keygen
from tigertunnel.tools.echo import EchoFactory
from tigertunnel.tools.traces import SINGLE, load_trace


def _reactor() -> Any:
    from twisted.internet import reactor
    return reactor


def lines(text: str) -> List[str]:
    """The non-empty lines of ``text``."""
    return [line for line in text.splitlines() if line.strip()]


class _ProcessTestCase(TestCase):
    """A temporary directory with key files, and no process left behind."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = procs.fresh_dir(self.mktemp())
        self.addCleanup(procs.stop_strays, self.dir)
        self.psk = self.path("psk.key")
        keygen(self.psk)
        kemgen(self.path("kem"))
        self.kem_key, self.kem_pub = self.path("kem.key"), self.path("kem.pub")
        self.pidfile = self.path("tt.pid")
        self.logfile = self.path("tt.log")

    def path(self, name: str) -> str:
        """An absolute path in this test's directory."""
        return os.path.join(self.dir, name)

    async def no_process_left(self) -> None:
        """Wait (bounded) until no process started by this test runs any more."""
        await procs.wait_until(lambda: not procs.pids_mentioning(self.dir), 5,
                               f"no process mentioning {self.dir}")

    async def twistd(self, *args: str, pidfile: Optional[str] = None,
                     logfile: Optional[str] = None,
                     options: Sequence[str] = (),
                     env: Optional[Dict[str, str]] = None) -> procs.Result:
        """Run ``twistd --pidfile P --logfile L [OPTIONS] tigertunnel ARGS`` (daemonized unless OPTIONS has -n)."""
        return await procs.run(
            [procs.executable("twistd"), "--pidfile", pidfile or self.pidfile,
             "--logfile", logfile or self.logfile, *options, "tigertunnel",
             *args], env=env)

    async def console(self, *args: str,
                      env: Optional[Dict[str, str]] = None) -> procs.Result:
        """Run the console script ``tigertunnel ARGS`` in the foreground."""
        return await procs.run([procs.executable("tigertunnel"), *args], env=env)


class DaemonTests(_ProcessTestCase):
    """A daemonized server and client carry TB frames and stop cleanly."""

    async def test_daemonized_kem_tunnel_round_trip(self) -> None:
        """Daemonized KEM-only server and client echo TB frames byte-identical, then exit on SIGTERM and remove their pidfiles."""
        reactor = _reactor()
        echo = WrappingFactory(EchoFactory())
        backend = reactor.listenTCP(0, echo, interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        self.addCleanup(procs.wait_until, lambda: not echo.protocols, 10,
                        "the echo backend's connections to close")
        self.addCleanup(procs.stop_strays, self.dir)
        server_port, client_port = procs.free_ports(2)
        spid, slog = self.path("server.pid"), self.path("server.log")
        cpid, clog = self.path("client.pid"), self.path("client.log")

        server = await self.twistd(
            "server", "-p", f"127.0.0.1:{server_port},127.0.0.1:"
            f"{backend.getHost().port}", "-k", self.psk, "--kemsecret",
            self.kem_key, "--require-kem", pidfile=spid, logfile=slog)
        self.assertEqual(server.status, 0, server.describe())
        client = await self.twistd(
            "client", "-p", f"127.0.0.1:{client_port},127.0.0.1:{server_port}",
            "-k", self.psk, "--kempublic", self.kem_pub, "-n", "2",
            pidfile=cpid, logfile=clog)
        self.assertEqual(client.status, 0, client.describe())
        server_pid, client_pid = procs.read_pidfile(spid), procs.read_pidfile(cpid)
        assert server_pid is not None and client_pid is not None
        self.assertTrue(procs.pid_running(server_pid))
        self.assertTrue(procs.pid_running(client_pid))
        # --require-kem: these lines only appear after a KEM handshake.
        await procs.wait_for_text(clog, " up (key id ", 10, count=2)

        frames = [f.data for f in load_trace(SINGLE) if f.dir == "up"]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", client_port,
                                      timeout=5)
        tb = await endpoint.connect(PeerFactory())
        self.addCleanup(lambda: tb.is_lost or tb.transport.abortConnection())
        tb.transport.writeSequence(frames)
        await procs.wait_until(lambda: len(tb.digests) >= len(frames), 15,
                               "the echoed frames")
        self.assertEqual(tb.digests, [digest(f) for f in frames])
        self.assertEqual(echo.wrappedFactory.connections, 1)

        # Stopped with the TB session still open: it is closed, not kept.
        for name, pid, pidfile, log in (("client", client_pid, cpid, clog),
                                        ("server", server_pid, spid, slog)):
            self.assertTrue(await procs.stop_pid(pid, timeout=10),
                            f"the {name} needed SIGKILL")
            self.assertFalse(os.path.exists(pidfile), f"{name} pidfile left")
            self.assertIn("Server Shut Down.", procs.read_text(log))
            self.assertNotIn("Traceback", procs.read_text(log))
            if name == "client":
                await tb.lost.addTimeout(5, reactor)
        await procs.wait_until(lambda: not echo.protocols, 5,
                               "the echo backend's connections to close")


class StartupErrorTests(_ProcessTestCase):
    """Bad start-up input stops both run forms with a message naming it."""

    def setUp(self) -> None:
        super().setUp()
        backend, listen = procs.free_ports(2)
        self.backend = f"127.0.0.1:{backend}"
        self.listen = f"127.0.0.1:{listen}"

    def pair(self) -> str:
        """A valid ``-p`` value."""
        return f"{self.listen},{self.backend}"

    def check_console(self, result: procs.Result, expected: str) -> None:
        """The console script failed with one ``tigertunnel: error:`` line."""
        self.assertNotEqual(result.status, 0, result.describe())
        self.assertNotIn("Traceback", result.stderr, result.describe())
        err = lines(result.stderr)
        self.assertEqual(len(err), 1, result.describe())
        self.assertTrue(err[0].startswith("tigertunnel: error: "), err[0])
        self.assertIn(expected, err[0])

    def check_twistd(self, result: procs.Result, expected: str, form: str,
                     pidfile: str, logfile: str) -> None:
        """twistd failed with the console script's one line, before it daemonized."""
        what = f"{form}: {result.describe()}"
        self.assertEqual(result.status, 1, what)
        self.assertEqual(result.stdout, "", what)
        err = lines(result.stderr)
        self.assertEqual(len(err), 1, what)
        self.assertTrue(err[0].startswith("tigertunnel: error: "), what)
        self.assertIn(expected, err[0], what)
        self.assertFalse(os.path.exists(pidfile), f"{form}: pidfile left behind")
        self.assertNotIn("Traceback", procs.read_text(logfile), form)

    async def refused(self, role: str, args: Sequence[str], expected: str,
                      env: Optional[Dict[str, str]] = None,
                      one_by_one: bool = False) -> None:
        """Run twistd daemonized, twistd -n and the console script (at once
        unless ``one_by_one``: their valid ports would collide); each must
        fail with one ``tigertunnel: error:`` line containing ``expected``."""
        files = {form: (self.path(f"{form}.pid"), self.path(f"{form}.log"))
                 for form in ("daemon", "nodaemon")}
        runs = [
            lambda: self.twistd(role, *args, pidfile=files["daemon"][0],
                                logfile=files["daemon"][1], env=env),
            lambda: self.twistd(role, *args, pidfile=files["nodaemon"][0],
                                logfile=files["nodaemon"][1], options=["-n"], env=env),
            lambda: self.console(role, *args, env=env),
        ]
        if one_by_one:
            daemon, nodaemon, console = [await run() for run in runs]
        else:
            daemon, nodaemon, console = await defer.gatherResults(
                [defer.ensureDeferred(run()) for run in runs], consumeErrors=True)
        self.check_twistd(daemon, expected, "twistd", *files["daemon"])
        self.check_twistd(nodaemon, expected, "twistd -n", *files["nodaemon"])
        self.check_console(console, expected)
        await self.no_process_left()

    async def test_bad_listen_address(self) -> None:
        """A -p with port 99999 is refused, naming the address."""
        await self.refused("server", ["-p", f"127.0.0.1:99999,{self.backend}",
                                      "-k", self.psk], "'127.0.0.1:99999'")

    async def test_unresolvable_listen_host(self) -> None:
        """A -p whose listen host name does not resolve is refused with one line naming it."""
        await self.refused("client", ["-p", f"nonexistent.invalid:4000,"
                                      f"{self.backend}", "-k", self.psk],
                           "'nonexistent.invalid'")

    async def test_missing_key_file(self) -> None:
        """A -k naming a file that does not exist is refused, naming the file."""
        missing = self.path("missing.key")
        await self.refused("client", ["-p", self.pair(), "-k", missing],
                           f"{missing}: Unreadable")

    async def test_key_file_mode_0644(self) -> None:
        """A secret key file readable by others is refused with the chmod to run."""
        loose = self.path("loose.key")
        with open(self.psk) as src, open(loose, "w") as dst:
            dst.write(src.read())
        os.chmod(loose, 0o644)
        await self.refused("server", ["-p", self.pair(), "-k", loose],
                           f"{loose}: InsecurePermissions (run: chmod 600 {loose})")

    async def test_bad_key_file_content(self) -> None:
        """A key file without a key line is refused, naming the file and line."""
        bad = self.path("bad.key")
        with open(bad, "w") as f:
            f.write("# a comment\nnot a key\n")
        os.chmod(bad, 0o600)
        await self.refused("client", ["-p", self.pair(), "-k", bad],
                           f"{bad}:2: InvalidKeyFormat")

    async def test_public_key_of_wrong_size(self) -> None:
        """A --kempublic file holding a 32-byte key is refused, naming the file."""
        await self.refused("client", ["-p", self.pair(), "-k", self.psk,
                                      "--kempublic", self.psk],
                           f"{self.psk}:1: InvalidKeySize")

    async def test_unknown_option(self) -> None:
        """An unknown option is refused, naming it."""
        await self.refused("server", ["-p", self.pair(), "-k", self.psk,
                                      "--bogus"], "--bogus")

    async def test_kempublic_on_server(self) -> None:
        """--kempublic is a client option: the server refuses it by name."""
        await self.refused("server", ["-p", self.pair(), "-k", self.psk,
                                      "--kempublic", self.kem_pub],
                           "--kempublic")

    async def test_kemsecret_on_client(self) -> None:
        """--kemsecret is a server option: the client refuses it by name."""
        await self.refused("client", ["-p", self.pair(), "-k", self.psk,
                                      "--kemsecret", self.kem_key],
                           "--kemsecret")

    async def test_no_key_without_plaintext(self) -> None:
        """Without -k and without --plaintext start-up is refused, saying so."""
        await self.refused("client", ["-p", self.pair()],
                           "no key file: give -k KEYFILE")

    def busy_port(self) -> int:
        """A port on 127.0.0.1 that a socket of this test listens on."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port: int = busy.getsockname()[1]
        return port

    async def test_port_already_bound(self) -> None:
        """A listen port already in use is one line and exit 1 for both roles, daemonized, -n and the console script."""
        address = f"127.0.0.1:{self.busy_port()}"
        for role in ("server", "client"):
            await self.refused(role, ["-p", f"{address},{self.backend}", "-k", self.psk],
                               f"cannot start: cannot listen on {address}: Address "
                               f"already in use")

    async def test_metrics_port_taken(self) -> None:
        """A --metrics port in use is one line with the whole message (not cut at 100 bytes), in every run form."""
        port = self.busy_port()
        await self.refused("server", ["-p", self.pair(), "-k", self.psk, "--metrics",
                                      f"tcp:{port}:interface=127.0.0.1"],
                           f"cannot start: cannot listen on metrics endpoint "
                           f"tcp:{port}:interface=127.0.0.1: Address already in use",
                           one_by_one=True)

    async def test_replay_file_not_a_cache(self) -> None:
        """A --replay-file that is not a replay cache stops the server with one line naming it, in every run form."""
        foreign = self.path("foreign.replay")
        with open(foreign, "wb") as f:
            f.write(b"something else entirely")
        await self.refused("server", ["-p", self.pair(), "-k", self.psk, "--replay-file",
                                      foreign],
                           f"cannot start: {foreign}: not a tigertunnel replay cache",
                           one_by_one=True)

    async def test_kem_without_native_mlkem(self) -> None:
        """Where cryptography has no ML-KEM, a KEM key file stops both ends at start with one line, in every run form."""
        # This Python cannot import cryptography's ML-KEM module: what
        # tigertunnel/crypto/kem.py sees with a cryptography older than 47.
        fixture = self.path("no-mlkem")
        os.makedirs(fixture)
        with open(os.path.join(fixture, "sitecustomize.py"), "w") as f:
            f.write(NO_MLKEM)
        env = procs.child_env()
        env.pop("TIGERTUNNEL_ALLOW_KYBER_PY", None)
        env["PYTHONPATH"] = os.pathsep.join(
            [fixture] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        await self.refused("server", ["-p", self.pair(), "-k", self.psk, "--kemsecret",
                                      self.kem_key], "cannot use --kemsecret: KEM is "
                           "configured but the installed cryptography", env=env)
        await self.refused("client", ["-p", self.pair(), "-k", self.psk, "--kempublic",
                                      self.kem_pub], "cannot use --kempublic: KEM is "
                           "configured but the installed cryptography", env=env)
        # The same Python runs a PSK-only end: the fixture hides ML-KEM only.
        check = await self.console("check-config", "client", "-p", self.pair(),
                                   "-k", self.psk, env=env)
        self.assertEqual(check.status, 0, check.describe())

    async def test_public_key_given_as_psk(self) -> None:
        """A KEM public key (mode 0644) given as -k is named as one, not sent to chmod 600."""
        await self.refused("client", ["-p", self.pair(), "-k", self.kem_pub],
                           f"{self.kem_pub}: WrongKeyKind (a KEM public key")

    async def test_version(self) -> None:
        """twistd tigertunnel [server] --version prints tigertunnel's version line, not Twisted's."""
        from tigertunnel import __version__
        for args in (["--version"], ["server", "--version"], ["client", "--version"]):
            result = await procs.run([procs.executable("twistd"), "tigertunnel", *args])
            self.assertEqual(result.status, 0, result.describe())
            self.assertTrue(result.stdout.startswith(f"tigertunnel {__version__}; data path: "),
                            result.describe())
            self.assertNotIn("Twisted version:", result.stdout)


#: A sitecustomize.py that makes cryptography's ML-KEM module unimportable.
NO_MLKEM = """
import sys


class _NoMLKEM:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "cryptography.hazmat.primitives.asymmetric.mlkem":
            raise ModuleNotFoundError(f"No module named {name!r} (test fixture)")
        return None


sys.meta_path.insert(0, _NoMLKEM)
"""


class KeygenCommandTests(_ProcessTestCase):
    """``tigertunnel keygen`` / ``kemgen`` write private files and never overwrite."""

    async def test_keygen_creates_0600_file(self) -> None:
        """keygen writes one <id>:<64 hex> line with mode 0600, even under umask 000."""
        out = self.path("new.key")
        result = await procs.run([procs.executable("tigertunnel"), "keygen",
                                  "-o", out], umask=0)
        self.assertEqual(result.status, 0, result.describe())
        self.assertEqual(stat.S_IMODE(os.stat(out).st_mode), 0o600)
        self.assertRegex(procs.read_text(out), r"\A[0-9]+:[0-9a-f]{64}\n\Z")

    async def test_keygen_refuses_to_overwrite(self) -> None:
        """keygen on an existing file exits non-zero naming it and leaves it unchanged."""
        existing = self.path("precious")
        with open(existing, "wb") as f:
            f.write(b"do not touch\n")
        os.chmod(existing, 0o600)
        result = await self.console("keygen", "-o", existing)
        self.assertNotEqual(result.status, 0, result.describe())
        err = lines(result.stderr)
        self.assertEqual(len(err), 1, result.describe())
        self.assertIn(existing, err[0])
        self.assertIn("--force", err[0])
        with open(existing, "rb") as f:
            self.assertEqual(f.read(), b"do not touch\n")
        self.assertEqual(stat.S_IMODE(os.stat(existing).st_mode), 0o600)

    async def test_kemgen_modes_and_no_overwrite(self) -> None:
        """kemgen writes PREFIX.key 0600 and PREFIX.pub 0644, and refuses to run again over them."""
        prefix = self.path("fresh")
        result = await procs.run([procs.executable("tigertunnel"), "kemgen",
                                  "-o", prefix], umask=0)
        self.assertEqual(result.status, 0, result.describe())
        self.assertEqual(stat.S_IMODE(os.stat(prefix + ".key").st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(prefix + ".pub").st_mode), 0o644)
        before = {p: procs.read_text(p) for p in (prefix + ".key", prefix + ".pub")}
        self.assertRegex(before[prefix + ".key"], r"\A[0-9]+:[0-9a-f]{64}\n\Z")
        self.assertRegex(before[prefix + ".pub"], r"\A[0-9]+:[0-9a-f]{2432}\n\Z")
        again = await self.console("kemgen", "-o", prefix)
        self.assertNotEqual(again.status, 0, again.describe())
        self.assertEqual(len(lines(again.stderr)), 1, again.describe())
        self.assertTrue(re.search(re.escape(prefix) + r"\.(pub|key)", again.stderr))
        self.assertEqual({p: procs.read_text(p) for p in before}, before)
