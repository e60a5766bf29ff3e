"""Tests for :mod:`tigertunnel.tap` (twistd options and service wiring) and the plugin."""

import io
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tigertunnel import logs, tap
from tigertunnel.config.model import Address
from tigertunnel.crypto.kem import public_key_from_seed
from tigertunnel.keys.generate import kemgen, keygen
from tigertunnel.net.frame_protocol import FrameFactory, FrameProtocol
from tigertunnel.net.pool_server import TunnelFactory
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.net.multiplexer import ClientMultiplexer, ServerMultiplexer

PAIR = ":3000,127.0.0.1:3001"


class KeyFiles:
    """Real key files, written by tigertunnel's own generators, in a fresh directory."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.dir = case.mktemp()
        os.makedirs(self.dir)
        self.psk = self.path("secret.key")
        self.psk_id = keygen(self.psk, key_id=11)
        prefix = self.path("server-kem")
        self.kem_seed = bytes(range(32))
        self.kem_id = kemgen(prefix, key_id=22, random=lambda n: self.kem_seed[:n])
        self.kem_secret = prefix + ".key"
        self.kem_public = prefix + ".pub"

    def path(self, name: str) -> str:
        """A path inside the directory."""
        return os.path.join(self.dir, name)

    def write(self, name: str, text: str, mode: int = 0o600) -> str:
        """Write a file with ``mode`` and return its path."""
        path = self.path(name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path


def parse(argv: List[str]) -> tap.Options:
    """Parse a full ``tigertunnel ...`` command line."""
    options = tap.Options()
    options.parseOptions(argv)
    return options


class OptionsTestCase(SynchronousTestCase):
    """Helpers for option tests."""

    def setUp(self) -> None:
        self.keys = KeyFiles(self)

    def usage_error(self, argv: List[str], *fragments: str) -> str:
        """Assert that ``argv`` is refused with a message containing every fragment."""
        error = self.assertRaises(usage.UsageError, parse, argv)
        message = str(error)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn("\n", message)
        return message


class DefaultsTests(OptionsTestCase):
    """What an end runs with when only the required options are given."""

    def test_server_defaults(self) -> None:
        """A server with -p and -k gets -m 1000, a 10 s handshake timeout, info logging and no cluster."""
        options = parse(["server", "-p", PAIR, "-k", self.keys.psk])
        self.assertEqual(options.subCommand, "server")
        config = options.subOptions.config
        self.assertEqual(config.role, "server")
        self.assertEqual(config.max_sessions, 1000)
        self.assertEqual(config.handshake_timeout, 10.0)
        self.assertEqual(options.subOptions["log-level"], "info")
        self.assertIsNone(config.cluster_id)
        self.assertEqual(config.psk.ids(), [11])
        self.assertIsNone(config.kem_secret)
        self.assertFalse(config.require_kem)

    def test_client_defaults(self) -> None:
        """A client with -p and -k gets -n 4, -m 1000 and info logging."""
        options = parse(["client", "-p", PAIR, "-k", self.keys.psk])
        config = options.subOptions.config
        self.assertEqual(config.role, "client")
        self.assertEqual(config.pool_size, 4)
        self.assertEqual(config.max_sessions, 1000)
        self.assertEqual(options.subOptions["log-level"], "info")
        self.assertEqual(config.key_path, self.keys.psk)
        self.assertIsNone(config.kem_public)

    def test_values_given(self) -> None:
        """-n, -m, -c, --log-level and --handshake-timeout are read as given."""
        options = parse(["client", "-p", PAIR, "-k", self.keys.psk, "-n", "7", "-m", "12",
                         "-c", "340282366920938463463374607431768211455",
                         "--log-level", "debug", "--handshake-timeout", "2.5"])
        config = options.subOptions.config
        self.assertEqual((config.pool_size, config.max_sessions, config.handshake_timeout),
                         (7, 12, 2.5))
        self.assertEqual(config.cluster_id, (1 << 128) - 1)
        self.assertEqual(options.subOptions["log-level"], "debug")

    def test_cluster_lenient_syntax(self) -> None:
        """-c accepts the reference's lenient integer syntax (``+``, ``_``)."""
        options = parse(["server", "-p", PAIR, "--plaintext", "-c", "+1_000"])
        self.assertEqual(options.subOptions.config.cluster_id, 1000)

    def test_repeated_proxy(self) -> None:
        """Each -p / --proxy adds a pair, numbered in order."""
        options = parse(["client", "-k", self.keys.psk, "-p", ":4000,r0.example:3000",
                         "--proxy", ":4001,[::1]:3000", "-p", "127.0.0.1:4002,10.0.0.3:3000"])
        pairs = options.subOptions.config.pairs
        self.assertEqual([p.index for p in pairs], [0, 1, 2])
        self.assertEqual([p.name for p in pairs], ["pair0", "pair1", "pair2"])
        self.assertEqual([(p.listen, p.target) for p in pairs], [
            (Address("", 4000), Address("r0.example", 3000)),
            (Address("", 4001), Address("::1", 3000)),
            (Address("127.0.0.1", 4002), Address("10.0.0.3", 3000))])

    def test_pair_names(self) -> None:
        """-p ...,name=NAME labels a pair; a name used twice is a one-line error naming it."""
        options = parse(["client", "-k", self.keys.psk, "-p", ":4000,r0.example:3000,name=east",
                         "-p", ":4001,r1.example:3000"])
        self.assertEqual([p.label for p in options.subOptions.config.pairs],
                         ["east", "r1.example:3000"])
        self.usage_error(["client", "-k", self.keys.psk, "-p", ":4000,a.example:1,name=x",
                          "-p", ":4001,b.example:1,name=x"], "two proxy pairs are named 'x'")

    def test_sixteen_pairs(self) -> None:
        """Sixteen pairs are the most accepted."""
        argv = ["client", "--plaintext"]
        for i in range(16):
            argv += ["-p", f":{4000 + i},127.0.0.1:{3000 + i}"]
        self.assertEqual(len(parse(argv).subOptions.config.pairs), 16)

    def test_plaintext(self) -> None:
        """--plaintext without -k leaves the end without keys."""
        config = parse(["server", "-p", PAIR, "--plaintext"]).subOptions.config
        self.assertIsNone(config.psk)

    def test_kem_keys(self) -> None:
        """--kempublic loads the client's public key, --kemsecret the server's seeds."""
        client = parse(["client", "-p", PAIR, "-k", self.keys.psk,
                        "--kempublic", self.keys.kem_public]).subOptions.config
        self.assertEqual(client.kem_public, (22, public_key_from_seed(self.keys.kem_seed)))
        self.assertEqual(client.kem_path, self.keys.kem_public)
        server = parse(["server", "-p", PAIR, "-k", self.keys.psk, "--kemsecret",
                        self.keys.kem_secret, "--require-kem"]).subOptions.config
        self.assertEqual(dict(server.kem_secret), {22: self.keys.kem_seed})
        self.assertTrue(server.require_kem)


class UsageErrorTests(OptionsTestCase):
    """Every bad option stops parsing with a one-line message naming the bad value."""

    def test_no_mode(self) -> None:
        """No server/client word asks for a mode."""
        self.usage_error([], "server or client")

    def test_missing_proxy(self) -> None:
        """Server and client both require -p, and say which mode wanted it."""
        self.usage_error(["server", "-k", self.keys.psk], "-p LISTEN,TARGET", "server mode")
        self.usage_error(["client", "-k", self.keys.psk], "-p LISTEN,TARGET", "client mode")

    def test_too_many_pairs(self) -> None:
        """A seventeenth -p is refused, naming the limit."""
        argv = ["client", "--plaintext"]
        for i in range(17):
            argv += ["-p", f":{4000 + i},127.0.0.1:{3000 + i}"]
        self.usage_error(argv, "too many proxy pairs", "16")

    def test_bad_proxy(self) -> None:
        """A bad -p names the bad address and which side it was."""
        self.usage_error(["client", "--plaintext", "-p", ":4000,localhost"],
                         "target address", "'localhost'")
        self.usage_error(["client", "--plaintext", "-p", ":0,127.0.0.1:3000"],
                         "listen address", "':0'")
        self.usage_error(["client", "--plaintext", "-p", "nocomma"], "'nocomma'")

    def test_bad_proxy_port_digits(self) -> None:
        """A -p port of superscript digits is a usage error, not a traceback."""
        self.usage_error(["client", "--plaintext", "-p", ":\u00b2,127.0.0.1:3000"],
                         "listen address")

    def test_bad_max_sessions(self) -> None:
        """-m must be a whole number from 1 to 2**32-1."""
        for value in ["0", "-3", "abc", "1.5", "4294967296", ""]:
            self.usage_error(["server", "-p", PAIR, "--plaintext", "-m", value],
                             "max-sessions", repr(value))

    def test_bad_num_conns(self) -> None:
        """-n must be a whole number from 1 to 1024."""
        for value in ["0", "1025", "x", "-1"]:
            self.usage_error(["client", "-p", PAIR, "--plaintext", "-n", value],
                             "num-conns", repr(value))

    def test_bad_cluster(self) -> None:
        """-c must be a decimal u128."""
        for value in ["x", "-5", "0x10", str(1 << 128), "1 2", ""]:
            self.usage_error(["server", "-p", PAIR, "--plaintext", "-c", value],
                             "cluster id", repr(value))

    def test_bad_log_level(self) -> None:
        """--log-level accepts err, warn, info and debug only, and lists them."""
        self.usage_error(["server", "-p", PAIR, "--plaintext", "--log-level", "loud"],
                         "'loud'", "err, warn, info, debug")

    def test_bad_handshake_timeout(self) -> None:
        """--handshake-timeout must be a number of seconds in (0, 3600]."""
        for value in ["0", "-1", "abc", "nan", "inf", "3601"]:
            self.usage_error(["server", "-p", PAIR, "--plaintext", "--handshake-timeout",
                              value], "handshake-timeout", repr(value))

    def test_no_key(self) -> None:
        """Without -k an end refuses to start unless --plaintext says so."""
        self.usage_error(["server", "-p", PAIR], "-k KEYFILE", "--plaintext")
        self.usage_error(["client", "-p", PAIR], "-k KEYFILE", "--plaintext")

    def test_key_and_plaintext(self) -> None:
        """-k and --plaintext exclude each other."""
        self.usage_error(["client", "-p", PAIR, "-k", self.keys.psk, "--plaintext"],
                         "-k and --plaintext")

    def test_kem_without_key(self) -> None:
        """--kempublic and --kemsecret need -k (the reference exits 0 or ignores them)."""
        self.usage_error(["client", "-p", PAIR, "--plaintext", "--kempublic",
                          self.keys.kem_public], "--kempublic requires -k")
        self.usage_error(["server", "-p", PAIR, "--plaintext", "--kemsecret",
                          self.keys.kem_secret], "--kemsecret requires -k")

    def test_kem_option_of_the_other_role(self) -> None:
        """--kempublic is a client option and --kemsecret a server option."""
        self.usage_error(["server", "-p", PAIR, "-k", self.keys.psk, "--kempublic",
                          self.keys.kem_public], "kempublic")
        self.usage_error(["client", "-p", PAIR, "-k", self.keys.psk, "--kemsecret",
                          self.keys.kem_secret], "kemsecret")

    def test_require_kem_without_kemsecret(self) -> None:
        """--require-kem needs --kemsecret."""
        self.usage_error(["server", "-p", PAIR, "-k", self.keys.psk, "--require-kem"],
                         "--require-kem needs --kemsecret")

    def test_unreadable_key_file(self) -> None:
        """A missing key file is named, with the reason."""
        missing = self.keys.path("missing.key")
        self.usage_error(["server", "-p", PAIR, "-k", missing], missing, "Unreadable")

    def test_insecure_key_file(self) -> None:
        """A secret key file readable by others is refused with the chmod to run."""
        os.chmod(self.keys.psk, 0o644)
        self.usage_error(["client", "-p", PAIR, "-k", self.keys.psk], self.keys.psk,
                         "InsecurePermissions", "chmod 600")
        os.chmod(self.keys.psk, 0o600)
        os.chmod(self.keys.kem_secret, 0o640)
        self.usage_error(["server", "-p", PAIR, "-k", self.keys.psk,
                          "--kemsecret", self.keys.kem_secret], self.keys.kem_secret,
                         "InsecurePermissions")

    def test_invalid_key_file(self) -> None:
        """A key file with a bad line is named with its line number and error."""
        bad = self.keys.write("bad.key", "# comment\n11:zz\n")
        self.usage_error(["server", "-p", PAIR, "-k", bad], f"{bad}:2", "InvalidKeySize")
        empty = self.keys.write("empty.key", "# nothing\n")
        self.usage_error(["server", "-p", PAIR, "-k", empty], empty, "NoKeysFound")

    def test_key_file_of_the_wrong_kind(self) -> None:
        """A PSK file given as --kempublic is refused for its key size."""
        self.usage_error(["client", "-p", PAIR, "-k", self.keys.psk, "--kempublic",
                          self.keys.psk], self.keys.psk, "InvalidKeySize")
        self.usage_error(["server", "-p", PAIR, "-k", self.keys.psk, "--kemsecret",
                          self.keys.path("missing.key")], "missing.key", "Unreadable")


@implementer(IHostnameResolver)
class RecordingResolver:
    """Resolves every name to 127.0.0.1 at once and records what was asked."""

    def __init__(self) -> None:
        self.asked: List[Tuple[str, int]] = []

    def resolveHostName(self, resolutionReceiver: IResolutionReceiver, hostName: str,
                        portNumber: int = 0,
                        addressTypes: Optional[Sequence[type]] = None,
                        transportSemantics: str = "TCP") -> IHostResolution:
        self.asked.append((hostName, portNumber))
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        resolutionReceiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


class LogFormatTests(OptionsTestCase):
    """--log-format and the log observer twistd is given."""

    def test_default_and_json(self) -> None:
        """--log-format is text by default and json when asked."""
        self.assertEqual(parse(["server", "-p", PAIR, "--plaintext"])
                         .subOptions["log-format"], "text")
        self.assertEqual(parse(["server", "-p", PAIR, "--plaintext", "--log-format",
                                "json"]).subOptions["log-format"], "json")

    def test_bad_log_format(self) -> None:
        """Another --log-format is refused, naming it and the choices."""
        self.usage_error(["client", "-p", PAIR, "--plaintext", "--log-format", "xml"],
                         "invalid log format", "'xml'", "text, json")

    def test_twistd_gets_our_observer(self) -> None:
        """Parsed by twistd, the options name tigertunnel's log observer factory, which twistd resolves; a --logger given to twistd is kept."""
        from twisted.scripts.twistd import ServerOptions as TwistdOptions

        from tigertunnel.ops import hardening

        self.patch(hardening, "harden_process", lambda: hardening.Hardening(True, True))
        self.patch(hardening, "_applied", None)
        self.addCleanup(logs._twistd_settings.clear)
        twistd = TwistdOptions()
        twistd.parseOptions(["-n", "tigertunnel", "client", "-p", PAIR, "--plaintext",
                             "--log-format", "json"])
        self.assertIs(twistd["logger"], logs.twistd_log_observer)
        self.assertEqual(logs._twistd_settings["fmt"], "json")
        theirs = TwistdOptions()
        theirs.parseOptions(["-n", "--logger", "twisted.logger.textFileLogObserver",
                             "tigertunnel", "client", "-p", PAIR, "--plaintext"])
        self.assertEqual(theirs["logger"].__name__, "textFileLogObserver")


class MakeServiceTests(SynchronousTestCase):
    """makeService builds listeners and pool connections on the given reactor."""

    def setUp(self) -> None:
        self.keys = KeyFiles(self)
        self.reactor = MemoryReactorClock()
        self.resolver = RecordingResolver()
        self.reactor.installNameResolver(self.resolver)
        self.addCleanup(logs.set_level, "info")

    def start(self, argv: List[str]) -> MultiService:
        """Build and start the service of ``argv``; stop it at cleanup."""
        service = tap.makeService(parse(argv), reactor=self.reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_server_listens(self) -> None:
        """A server listens on each pair's port and interface with a pool-connection factory."""
        service = self.start(["server", "-k", self.keys.psk, "-p", ":3000,127.0.0.1:3001",
                              "-p", "127.0.0.1:3002,127.0.0.1:3003",
                              "-p", "[::1]:3004,127.0.0.1:3005"])
        servers = [(port, interface) for port, _, _, interface in self.reactor.tcpServers]
        self.assertEqual(servers, [(3000, ""), (3002, "127.0.0.1"), (3004, "::1")])
        for _, factory, _, _ in self.reactor.tcpServers:
            self.assertIsInstance(factory, TunnelFactory)
        muxes = list(service)
        self.assertEqual([type(m) for m in muxes], [ServerMultiplexer] * 3)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_startup_heap_frozen_when_running(self) -> None:
        """makeService asks the reactor to freeze the start-up heap once it runs (and does not freeze it now)."""
        from tigertunnel.ops.memory import freeze_startup_heap
        self.start(["server", "-p", PAIR, "--plaintext"])
        self.assertIn(freeze_startup_heap, [hook for hook, _, _ in self.reactor.whenRunningHooks])

    def test_log_level_applied(self) -> None:
        """makeService applies --log-level to tigertunnel's loggers."""
        self.start(["server", "-p", PAIR, "--plaintext", "--log-level", "err"])
        events: List[Any] = []
        from twisted.logger import globalLogPublisher
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log = logs.logger("tigertunnel.test")
        log.warn("dropped")
        log.error("kept")
        self.assertEqual([e["log_format"] for e in events], ["kept"])

    def test_client_listens_and_connects_pool(self) -> None:
        """A client listens for TB clients and starts -n pool connections to the resolved server."""
        service = self.start(["client", "--plaintext", "-n", "3",
                              "-p", "127.0.0.1:4000,tunnel.example.org:3000"])
        self.assertEqual([(port, interface) for port, _, _, interface in self.reactor.tcpServers],
                         [(4000, "127.0.0.1")])
        self.assertIsInstance(self.reactor.tcpServers[0][1], FrameFactory)
        self.assertEqual(self.resolver.asked, [("tunnel.example.org", 3000)] * 3)
        self.assertEqual([(host, port, timeout) for host, port, _, timeout, _ in
                          self.reactor.tcpClients], [("127.0.0.1", 3000, 10.0)] * 3)
        self.assertEqual([type(m) for m in service], [ClientMultiplexer])

    def test_port_only_target_means_localhost(self) -> None:
        """A ``:PORT`` target makes the pool connect to 127.0.0.1, and an
        address target is connected to without a name lookup."""
        self.start(["client", "--plaintext", "-n", "1", "-p", ":4000,:3000",
                    "-p", ":4001,[::1]:3001"])
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual([(host, port, timeout) for host, port, _, timeout, _ in
                          self.reactor.tcpClients],
                         [("127.0.0.1", 3000, 10.0), ("::1", 3001, 10.0)])

    def test_client_refused_retries(self) -> None:
        """A refused pool connection is tried again after the backoff, with a new TCP attempt."""
        self.start(["client", "--plaintext", "-n", "1", "-p", ":4000,127.0.0.1:3000"])
        self.assertEqual(len(self.reactor.tcpClients), 1)
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0],
                                       Failure(ConnectionRefusedError()))
        # The pool retries within 100 ms +-20 % of the refusal.
        self.reactor.advance(0.079)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.042)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_client_pool_connection_carries_sessions(self) -> None:
        """Once a pool connection is made, a TB connection on the listener opens a stream on it."""
        service = self.start(["client", "--plaintext", "-n", "1", "-p", ":4000,127.0.0.1:3000"])
        mux = list(service)[0]
        tb = self.reactor.tcpServers[0][1].buildProtocol(None)
        tb_transport = StringTransport()
        tb.makeConnection(tb_transport)
        self.assertTrue(tb_transport.disconnecting)  # no pool connection yet
        pool = self.reactor.tcpClients[0][2].buildProtocol(None)
        pool_transport = StringTransport()
        pool.makeConnection(pool_transport)
        self.assertEqual(len(mux.pool_connections), 1)
        self.assertIsInstance(mux.pool_connections[0], TunnelProtocol)
        tb = self.reactor.tcpServers[0][1].buildProtocol(None)
        self.assertIsInstance(tb, FrameProtocol)
        tb_transport = StringTransport()
        tb.makeConnection(tb_transport)
        self.assertFalse(tb_transport.disconnecting)
        self.assertEqual(pool_transport.value(), b"XUMZ\x01\x00\x00\x00\x01\x00\x00\x00")

    def test_encrypted_client_sends_hello(self) -> None:
        """With -k a new pool connection starts with a 66-byte connect ClientHello of the key's id."""
        self.start(["client", "-k", self.keys.psk, "-n", "1", "-p", ":4000,127.0.0.1:3000"])
        pool = self.reactor.tcpClients[0][2].buildProtocol(None)
        transport = StringTransport()
        pool.makeConnection(transport)
        hello = transport.value()
        self.assertEqual(len(hello), 66)
        self.assertEqual(hello[:2], b"\x02\x00")  # version 2 (our extension), connect
        self.assertEqual(int.from_bytes(hello[2:10], "little"), 11)

    def test_stop_cancels_pool_connects(self) -> None:
        """Stopping a client cancels its pending pool connection attempts and starts no new ones."""
        service = tap.makeService(parse(["client", "--plaintext", "-n", "2",
                                         "-p", ":4000,127.0.0.1:3000"]), reactor=self.reactor)
        service.startService()
        self.assertEqual([c.stoppedConnecting for c in self.reactor.connectors], [False, False])
        self.successResultOf(service.stopService())
        self.assertEqual([c.stoppedConnecting for c in self.reactor.connectors], [True, True])
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_twistd_binds_in_make_service(self) -> None:
        """Under twistd the ports are bound by makeService (before twistd daemonizes), once."""
        from twisted.application import app
        from tigertunnel.ops import hardening
        self.patch(hardening, "harden_once", lambda: None)
        options = tap.Options()
        options.parent = app.ServerOptions()
        options.parseOptions(["server", "--plaintext", "-p", ":3000,127.0.0.1:3001",
                              "-p", "127.0.0.1:3002,127.0.0.1:3003"])
        service = tap.makeService(options, reactor=self.reactor)
        self.assertEqual([port for port, _, _, _ in self.reactor.tcpServers], [3000, 3002])
        service.privilegedStartService()  # what twistd does after daemonizing
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(self.reactor.tcpServers), 2)

    def test_twistd_tries_the_replay_file_unless_switching_users(self) -> None:
        """Under twistd a foreign --replay-file stops makeService (exit 1); with twistd -u it is left to the service's start, as that user."""
        from twisted.application import app
        from tigertunnel.ops import hardening
        self.patch(hardening, "harden_once", lambda: None)
        self.patch(sys, "stderr", io.StringIO())
        foreign = self.keys.write("foreign.replay", "something else entirely\n")
        for uid, exits in ((None, True), (os.getuid(), False)):
            options = tap.Options()
            options.parent = app.ServerOptions()
            options.parent["uid"] = uid
            options.parseOptions(["server", "--plaintext", "-p", ":3000,127.0.0.1:3001",
                                  "--replay-file", foreign])
            if exits:
                error = self.assertRaises(SystemExit, tap.makeService, options,
                                          reactor=MemoryReactorClock())
                self.assertEqual(error.code, 1)
                self.assertIn(f"{foreign}: not a tigertunnel replay cache", sys.stderr.getvalue())
            else:
                tap.makeService(options, reactor=MemoryReactorClock())

    def test_console_binds_at_start(self) -> None:
        """Without twistd makeService binds nothing: the console script starts the service."""
        tap.makeService(parse(["server", "--plaintext", "-p", ":3000,127.0.0.1:3001"]),
                        reactor=self.reactor)
        self.assertEqual(self.reactor.tcpServers, [])

    def warnings(self, argv: List[str]) -> List[str]:
        from twisted.logger import formatEvent, globalLogPublisher
        events: List[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.start(argv)
        return [formatEvent(e) for e in events
                if e.get("log_namespace") == "tigertunnel.ops.startup"]

    def test_client_on_all_interfaces_warns_once(self) -> None:
        """Pairs on :PORT, 0.0.0.0 and :: are named in one warning; the loopback pair is not."""
        lines = self.warnings(["client", "--plaintext", "-n", "1",
                               "-p", ":4000,127.0.0.1:3000", "-p", "127.0.0.1:4001,127.0.0.1:3001",
                               "-p", "0.0.0.0:4002,127.0.0.1:3002", "-p", "[::]:4003,127.0.0.1:3003"])
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("TB-side listener reachable beyond loopback: *:4000 (all IPv4 "
                      "interfaces), 0.0.0.0:4002, [::]:4003;", lines[0])
        self.assertNotIn("4001", lines[0])

    def test_loopback_client_and_server_do_not_warn(self) -> None:
        """A client on 127.0.0.1 and ::1, and a server on all interfaces, log no such warning."""
        self.assertEqual(self.warnings(["client", "--plaintext", "-n", "1",
                                        "-p", "127.0.0.1:4000,127.0.0.1:3000",
                                        "-p", "[::1]:4001,127.0.0.1:3001"]), [])
        self.assertEqual(self.warnings(["server", "--plaintext", "-p", ":3000,127.0.0.1:3001"]), [])


class PluginTests(SynchronousTestCase):
    """twistd finds the plugin."""

    def test_plugin_found(self) -> None:
        """getPlugins(IServiceMaker) yields tapname ``tigertunnel`` pointing at tigertunnel.tap."""
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("tigertunnel", makers)
        maker = makers["tigertunnel"]
        self.assertIs(maker.options, tap.Options)
        self.assertEqual(maker.makeService, tap.makeService)


class KemAvailabilityTests(OptionsTestCase):
    """A KEM key file where ML-KEM cannot run is refused while the options are parsed."""

    def without_native_mlkem(self) -> None:
        """Make this process look like one whose cryptography has no ML-KEM."""
        from tigertunnel.crypto import kem
        self.patch(kem, "HAVE_NATIVE_MLKEM", False)
        self.patch(os, "environ", {k: v for k, v in os.environ.items()
                                   if k != kem.ALLOW_KYBER_ENV})

    def test_both_ends_refuse_kem_without_native_mlkem(self) -> None:
        """--kemsecret (server) and --kempublic (client) are refused with one line naming the option and what to install."""
        self.without_native_mlkem()
        self.usage_error(["server", "-p", PAIR, "-k", self.keys.psk, "--kemsecret",
                          self.keys.kem_secret], "cannot use --kemsecret",
                         "no native ML-KEM-768", "cryptography 48 or later")
        self.usage_error(["client", "-p", PAIR, "-k", self.keys.psk, "--kempublic",
                          self.keys.kem_public], "cannot use --kempublic",
                         "no native ML-KEM-768", "cryptography 48 or later")

    def test_psk_only_runs_without_native_mlkem(self) -> None:
        """Without a KEM key file the missing ML-KEM is no reason to refuse."""
        self.without_native_mlkem()
        self.assertIsNone(parse(["server", "-p", PAIR, "-k", self.keys.psk]).subOptions.config.kem_secret)
        self.assertIsNone(parse(["client", "-p", PAIR, "-k", self.keys.psk]).subOptions.config.kem_public)


class UnderTwistdTests(OptionsTestCase):
    """Parsed by ``twistd tigertunnel``: a usage error is one line on stderr and exit status 1."""

    def setUp(self) -> None:
        super().setUp()
        from tigertunnel.ops import hardening
        self.patch(hardening, "harden_once", lambda: None)  # keep the test runner debuggable
        self.err = io.StringIO()
        self.out = io.StringIO()
        self.patch(sys, "stderr", self.err)
        self.patch(sys, "stdout", self.out)

    def twistd_parse(self, argv: List[str]) -> Any:
        from twisted.scripts._twistd_unix import ServerOptions
        config = ServerOptions()
        config.parseOptions(["tigertunnel", *argv])
        return config

    def test_usage_error_is_one_line(self) -> None:
        """An unknown option and a public key given as -k each exit 1 with one stderr line, without the option list."""
        for argv, expected in ((["server", "-p", PAIR, "-k", self.keys.psk, "--bogus"],
                                "option --bogus not recognized"),
                               (["client", "-p", PAIR, "-k", self.keys.kem_public],
                                f"{self.keys.kem_public}: WrongKeyKind")):
            self.err.truncate(0)
            self.err.seek(0)
            error = self.assertRaises(SystemExit, self.twistd_parse, argv)
            self.assertEqual(error.code, 1)
            lines = self.err.getvalue().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith("tigertunnel: error: "), lines[0])
            self.assertIn(expected, lines[0])
            self.assertEqual(self.out.getvalue(), "")

    def test_valid_options_parse(self) -> None:
        """Valid options under twistd parse as before."""
        config = self.twistd_parse(["server", "-p", PAIR, "-k", self.keys.psk])
        self.assertEqual(config.subOptions.subOptions.config.psk.ids(), [11])


class HelpAndVersionTests(SynchronousTestCase):
    """--help hides the internal option; --version says tigertunnel's version everywhere."""

    def test_worker_index_hidden(self) -> None:
        """--worker-index is accepted but not in server or client --help; --workers is."""
        for options in (tap.ServerOptions(), tap.ClientOptions()):
            text = str(options)
            self.assertNotIn("worker-index", text)
            self.assertIn("--workers=", text)

    def test_version_everywhere(self) -> None:
        """--version of the plugin, server and client prints the tigertunnel version line and exits 0."""
        from tigertunnel import __version__
        for argv in (["--version"], ["server", "--version"], ["client", "--version"]):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            error = self.assertRaises(SystemExit, parse, argv)
            self.assertEqual(error.code, 0)
            self.assertTrue(out.getvalue().startswith(f"tigertunnel {__version__}; data path: "),
                            out.getvalue())
            self.assertIn("ML-KEM: native", out.getvalue())
            self.assertNotIn("Twisted version:", out.getvalue())

