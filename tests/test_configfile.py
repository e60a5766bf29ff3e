"""Tests for :mod:`tigertunnel.config.clusterfile` (cluster config file) and its use by the options."""

import os
from typing import List, Optional

from hypothesis import given, strategies as st
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel import tap
from tigertunnel.config import clusterfile
from tigertunnel.cli import describe_run
from tigertunnel.keys.generate import kemgen, keygen
from tigertunnel.errors import ConfigError

THREE = """
[tunnel]
key = secret.key
kemsecret = kem.key
kempublic = kem.pub
cluster = 7
max-sessions = 100
num-conns = 2
require-kem = yes
metrics = tcp:9101:interface=127.0.0.1

[replica 0]
tunnel = r0.example:3000
backend = 127.0.0.1:3001

[replica 1]
tunnel = r1.example:3000
backend = 127.0.0.1:3001

[replica 2]
tunnel = 10.0.0.3:3100    ; a comment
backend = 127.0.0.1:3001
listen = 10.0.0.3:3100
local = 127.0.0.1:5002
"""


class Files:
    """A directory with key files and config files."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.dir = os.path.abspath(case.mktemp())
        os.makedirs(self.dir)
        self.psk_id = keygen(self.path("secret.key"), key_id=11)
        kemgen(self.path("kem"), key_id=22, random=lambda n: bytes(range(n)))

    def path(self, name: str) -> str:
        """A path in the directory."""
        return os.path.join(self.dir, name)

    def config(self, text: str, name: str = "cluster.ini") -> str:
        """Write a config file; return its path."""
        with open(self.path(name), "w") as f:
            f.write(text)
        return self.path(name)


class PairTests(SynchronousTestCase):
    """Which proxy pairs each tunnel end of a cluster gets."""

    def setUp(self) -> None:
        self.files = Files(self)
        self.cluster = clusterfile.load(self.files.config(THREE), tap.config_file_options())

    def test_server_of_each_replica(self) -> None:
        """A server gets one pair: its replica's listen address to its backend, named for the replica."""
        self.assertEqual(self.cluster.pairs("server", 0), [":3000,127.0.0.1:3001,name=replica0"])
        self.assertEqual(self.cluster.pairs("server", 2),
                         ["10.0.0.3:3100,127.0.0.1:3001,name=replica2"])

    def test_client_to_replicas(self) -> None:
        """The TB clients' tunnel client gets one pair per replica, on consecutive local ports."""
        self.assertEqual(self.cluster.pairs("client", None), [
            "127.0.0.1:4000,r0.example:3000,name=replica0",
            "127.0.0.1:4001,r1.example:3000,name=replica1",
            "127.0.0.1:5002,10.0.0.3:3100,name=replica2"])

    def test_replica_to_replica(self) -> None:
        """A replica's tunnel client gets a pair for every other replica, named for it."""
        self.assertEqual(self.cluster.pairs("client", 1), [
            "127.0.0.1:4000,r0.example:3000,name=replica0",
            "127.0.0.1:5002,10.0.0.3:3100,name=replica2"])

    def test_server_needs_replica(self) -> None:
        """A server of a several-replica file must say which replica it fronts."""
        with self.assertRaises(ConfigError) as caught:
            self.cluster.pairs("server", None)
        self.assertIn("a server needs --replica N", str(caught.exception))

    def test_replica_out_of_range(self) -> None:
        """--replica past the last replica is refused with the valid range."""
        with self.assertRaises(ConfigError) as caught:
            self.cluster.pairs("client", 3)
        self.assertIn("--replica 3: the file describes replicas 0 to 2", str(caught.exception))

    def test_argv_per_role(self) -> None:
        """Options keep the file's order, those of the other role are left out, key paths are resolved from the file's directory."""
        argv = self.cluster.argv("server", 0)
        self.assertEqual(argv, ["-k", self.files.path("secret.key"),
                                f"--kemsecret={self.files.path('kem.key')}",
                                "--cluster=7", "--max-sessions=100", "--require-kem",
                                "--metrics=tcp:9101:interface=127.0.0.1",
                                "-p", ":3000,127.0.0.1:3001,name=replica0"])
        client = self.cluster.argv("client", None)
        self.assertIn(f"--kempublic={self.files.path('kem.pub')}", client)
        self.assertIn("--num-conns=2", client)
        self.assertNotIn("--require-kem", client)


class OptionTableTests(SynchronousTestCase):
    """The [tunnel] keys, read off the server and client options."""

    def test_keys_kinds_and_roles(self) -> None:
        """Every long option of a tunnel end is a key, except those only a command line gives."""
        table = tap.config_file_options()
        both = frozenset({"server", "client"})
        self.assertEqual({k: (o.flag, o.roles) for k, o in table.items()}, {
            "key": (False, both), "cluster": (False, both), "max-sessions": (False, both),
            "log-level": (False, both), "handshake-timeout": (False, both),
            "metrics": (False, both), "shutdown-timeout": (False, both),
            "plaintext": (True, both), "systemd-sockets": (True, both),
            "metrics-public": (True, both), "metrics-tls-cert": (False, both),
            "metrics-tls-key": (False, both), "metrics-tls-client-ca": (False, both),
            "kemsecret": (False, frozenset({"server"})),
            "replay-file": (False, frozenset({"server"})),
            "require-kem": (True, frozenset({"server"})),
            "kempublic": (False, frozenset({"client"})),
            "num-conns": (False, frozenset({"client"}))})

    def test_excluded(self) -> None:
        """Options named in the exclusion list are left out; a flag is told from a value."""
        table = clusterfile.option_table({"server": tap.ServerOptions()}, ("workers",))
        self.assertNotIn("workers", table)
        self.assertIn("worker-index", table)
        self.assertTrue(table["require-kem"].flag)
        self.assertFalse(table["kemsecret"].flag)


@st.composite
def clusters(draw: st.DrawFn) -> List[int]:
    """Tunnel ports of a cluster of 1 to 16 replicas."""
    return draw(st.lists(st.integers(1, 65535), min_size=1, max_size=16))


class PairPropertyTests(SynchronousTestCase):
    """Pair derivation for any cluster size."""

    @given(clusters(), st.integers(1, 60000))
    def test_every_replica_reached_once(self, ports: List[int], base: int) -> None:
        """Client pairs reach every replica once on distinct local ports; a replica's client skips itself."""
        text = f"[tunnel]\nlocal-port = {base}\n" + "".join(
            f"[replica {i}]\ntunnel = r{i}.example:{p}\nbackend = :3001\n"
            for i, p in enumerate(ports))
        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        if base + len(ports) - 1 > 65535:
            self.assertRaises(ConfigError, clusterfile.load, path, tap.config_file_options())
            return
        cluster = clusterfile.load(path, tap.config_file_options())
        pairs = cluster.pairs("client", None)
        self.assertEqual([p.split(",")[1] for p in pairs],
                         [f"r{i}.example:{p}" for i, p in enumerate(ports)])
        self.assertEqual(len({p.split(",")[0] for p in pairs}), len(ports))
        for i in range(len(ports)):
            mine = cluster.pairs("client", i)
            self.assertEqual(len(mine), len(ports) - 1)
            self.assertNotIn(f"r{i}.example:", " ".join(mine))
            self.assertEqual(cluster.pairs("server", i), [f":{ports[i]},:3001,name=replica{i}"])


class ErrorTests(SynchronousTestCase):
    """Every error is one line naming the file, the section and the key."""

    def setUp(self) -> None:
        self.files = Files(self)

    def error(self, text: str) -> str:
        """The message of loading ``text``."""
        path = self.files.config(text)
        with self.assertRaises(ConfigError) as caught:
            clusterfile.load(path, tap.config_file_options())
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(path + ": "), message)
        return message[len(path) + 2:]

    def test_unknown_section(self) -> None:
        """An unknown section is named."""
        self.assertEqual(self.error("[replica 0]\ntunnel=:1\nbackend=:2\n[extra]\n"),
                         "[extra]: unknown section (expected [tunnel] or [replica N])")

    def test_unknown_key(self) -> None:
        """An unknown key is named with its section."""
        self.assertTrue(self.error("[tunnel]\nkeyy = x\n").startswith("[tunnel] keyy: unknown key"))
        self.assertTrue(self.error("[replica 0]\ntunnel=:1\nbackend=:2\nport=3\n")
                        .startswith("[replica 0] port: unknown key"))

    def test_missing_backend(self) -> None:
        """A replica without backend is refused."""
        self.assertEqual(self.error("[replica 0]\ntunnel=:1\n"), "[replica 0] backend: missing")

    def test_bad_address(self) -> None:
        """A bad address names the section, the key and the value."""
        self.assertEqual(self.error("[replica 0]\ntunnel=r0:99999\nbackend=:2\n"),
                         "[replica 0] tunnel: invalid tunnel address: 'r0:99999' (expected "
                         ":PORT, IPv4:PORT, [IPv6]:PORT or HOST:PORT)")

    def test_numbering(self) -> None:
        """Replica sections must be numbered from 0 without gaps."""
        self.assertIn("numbered 0 to 1 (found [0, 2])",
                      self.error("[replica 0]\ntunnel=:1\nbackend=:2\n"
                                 "[replica 2]\ntunnel=:1\nbackend=:2\n"))

    def test_no_replica(self) -> None:
        """A file without replicas is refused."""
        self.assertEqual(self.error("[tunnel]\ncluster = 1\n"), "no [replica N] section")

    def test_bad_boolean(self) -> None:
        """A flag that is not yes/no is refused."""
        self.assertEqual(self.error("[tunnel]\nrequire-kem = maybe\n"),
                         "[tunnel] require-kem: expected yes or no, got 'maybe'")

    def test_duplicate_key(self) -> None:
        """A key given twice in a section is refused on one line."""
        self.assertIn("'key'", self.error("[tunnel]\nkey = a\nkey = b\n"))

    def test_syntax(self) -> None:
        """A line outside any section is refused on one line."""
        self.assertIn("no section headers", self.error("key = a\n"))

    def test_unreadable(self) -> None:
        """A missing file is refused naming it."""
        with self.assertRaises(ConfigError) as caught:
            clusterfile.load(self.files.path("absent.ini"), tap.config_file_options())
        self.assertIn("absent.ini: cannot read", str(caught.exception))


def parse(argv: List[str]) -> tap.Options:
    """Parse a full ``tigertunnel ...`` command line."""
    options = tap.Options()
    options.parseOptions(argv)
    return options


class OptionsTests(SynchronousTestCase):
    """``--config`` goes through the same validation as the flags."""

    def setUp(self) -> None:
        self.files = Files(self)
        self.path = self.files.config(THREE)

    def refused(self, argv: List[str], text: Optional[str] = None) -> str:
        """The UsageError message for ``argv``."""
        if text is not None:
            self.files.config(text)
        with self.assertRaises(usage.UsageError) as caught:
            parse(argv)
        return str(caught.exception)

    def test_client_from_file(self) -> None:
        """A client built from the file has its pairs, keys and options."""
        sub = parse(["client", "--config", self.path]).subOptions
        cfg = sub.config
        self.assertEqual([p.name for p in cfg.pairs], ["pair0", "pair1", "pair2"])
        self.assertEqual((cfg.cluster_id, cfg.max_sessions, cfg.pool_size), (7, 100, 2))
        self.assertEqual(cfg.kem_public[0], 22)
        self.assertEqual(cfg.key_path, self.files.path("secret.key"))
        self.assertEqual(sub.operations.metrics, "tcp:9101:interface=127.0.0.1")

    def test_pairs_named_for_their_replica(self) -> None:
        """Pairs from the file are labelled replicaN: a server by its replica, a replica's client by the others."""
        server = parse(["server", "--config", self.path, "--replica", "2"]).subOptions.config
        self.assertEqual([p.label for p in server.pairs], ["replica2"])
        client = parse(["client", "--config", self.path, "--replica", "1"]).subOptions.config
        self.assertEqual([p.label for p in client.pairs], ["replica0", "replica2"])
        whole = parse(["client", "--config", self.path]).subOptions.config
        self.assertEqual([p.label for p in whole.pairs], ["replica0", "replica1", "replica2"])

    def test_workers_get_the_values_read_now(self) -> None:
        """--workers starts workers with the file's values as read at start,
        not with --config (a restarted worker must run what worker 0 runs):
        parsing those arguments after the file changed gives the same run."""
        sub = parse(["client", "--config", self.path, "--workers", "2",
                     "-m", "50"]).subOptions
        self.assertNotIn("--config", sub.raw_args)
        self.assertEqual(sub.raw_args[-4:], ["--workers", "2", "-m", "50"])
        self.files.config(THREE.replace("r0.example:3000", "r9.example:3999"))
        again = parse(["client"] + sub.raw_args).subOptions.config
        self.assertEqual([str(p.target) for p in again.pairs],
                         [str(p.target) for p in sub.config.pairs])
        self.assertEqual((again.max_sessions, again.pool_size, again.cluster_id),
                         (50, 2, 7))

    def test_server_from_file(self) -> None:
        """A server built from the file fronts the chosen replica and requires KEM."""
        cfg = parse(["server", "--config", self.path, "--replica", "2"]).subOptions.config
        self.assertEqual([str(p.listen) for p in cfg.pairs], ["10.0.0.3:3100"])
        self.assertTrue(cfg.require_kem)
        self.assertEqual(cfg.kem_secret.ids(), [22])

    def test_flags_override(self) -> None:
        """A flag on the command line wins over the file."""
        cfg = parse(["client", "--config", self.path, "-m", "5", "--cluster", "8"]).subOptions.config
        self.assertEqual((cfg.max_sessions, cfg.cluster_id), (5, 8))

    def test_value_error_names_section_and_key(self) -> None:
        """A bad [tunnel] value is reported with the file, section and key."""
        message = self.refused(["client", "--config", self.path],
                               THREE.replace("max-sessions = 100", "max-sessions = lots"))
        self.assertEqual(message, f"{self.path}: [tunnel] max-sessions: invalid "
                         f"max-sessions: 'lots' (expected a whole number)")

    def test_key_file_error_names_section_and_key(self) -> None:
        """A key file that cannot be used is reported with the section, key and file."""
        message = self.refused(["server", "--config", self.path, "--replica", "0"],
                               THREE.replace("key = secret.key", "key = missing.key"))
        self.assertEqual(message, f"{self.path}: [tunnel] key: "
                         f"{self.files.path('missing.key')}: Unreadable (No such file or directory)")

    def test_metrics_error(self) -> None:
        """A bad metrics endpoint is reported with the section and key."""
        message = self.refused(["client", "--config", self.path],
                               THREE.replace("tcp:9101:interface=127.0.0.1", "bogus:1"))
        self.assertTrue(message.startswith(f"{self.path}: [tunnel] metrics: invalid --metrics "
                                           f"endpoint 'bogus:1'"), message)

    def test_cross_field_error(self) -> None:
        """Rules between options apply to the file too (--require-kem needs --kemsecret)."""
        message = self.refused(["server", "--config", self.path, "--replica", "0"],
                               THREE.replace("kemsecret = kem.key\n", ""))
        self.assertEqual(message, "--require-kem needs --kemsecret")

    def test_proxy_and_config_exclusive(self) -> None:
        """-p together with --config is refused."""
        self.assertIn("-p and --config exclude each other",
                      self.refused(["client", "--config", self.path, "-p", ":1,:2"]))

    def test_replica_needs_config(self) -> None:
        """--replica without --config is refused."""
        self.assertEqual(self.refused(["client", "-p", ":1,:2", "--plaintext", "--replica", "1"]),
                         "--replica needs --config")

    def test_bad_replica_number(self) -> None:
        """A --replica that is not a number is refused."""
        self.assertIn("invalid --replica: 'one'",
                      self.refused(["client", "--config", self.path, "--replica", "one"]))

    def test_describe_run(self) -> None:
        """check-config's summary names the pairs and key ids of the run."""
        lines = describe_run(parse(["client", "--config", self.path, "--replica", "0"]))
        self.assertEqual(lines, [
            f"client: 2 proxy pairs; psk key id {self.files.psk_id} (of 1), kem public key id 22",
            "  pair0: 127.0.0.1:4001 -> r1.example:3000 (pair=replica1)",
            "  pair1: 127.0.0.1:5002 -> 10.0.0.3:3100 (pair=replica2)",
            "  metrics: tcp:9101:interface=127.0.0.1"])

    def test_defaults_unchanged(self) -> None:
        """Without the new options a run has no metrics and a 10 s shutdown timeout."""
        ops = parse(["client", "-p", ":1,:2", "--plaintext"]).subOptions.operations
        self.assertEqual((ops.metrics, ops.shutdown_timeout, ops.systemd_sockets),
                         (None, 10.0, False))

    def test_bad_shutdown_timeout(self) -> None:
        """A shutdown timeout that is not a positive number is refused."""
        self.assertIn("invalid shutdown-timeout: '0'",
                      self.refused(["client", "-p", ":1,:2", "--plaintext",
                                    "--shutdown-timeout", "0"]))

    def test_help_examples_verbatim(self) -> None:
        """--help of server and client ends with their examples, lines unwrapped."""
        for options, line in ((tap.ServerOptions(), "  twistd -n tigertunnel server -p "
                               ":3000,127.0.0.1:3001 -k secret.key\n"),
                              (tap.ClientOptions(), "  twistd -n tigertunnel client "
                               "--config cluster.ini --replica 1   (replica 1's peers)\n")):
            text = options.getUsage()
            self.assertIn("\nExamples:\n", text)
            self.assertIn(line, text)
