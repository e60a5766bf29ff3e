"""Tests for :mod:`tigertunnel.ops.tls` and the ``--metrics-tls-*`` options, without sockets.

The certificates are made at test time (:mod:`tests.tlscerts`). Serving
``/metrics`` over TLS and ``tigertunnel status https://...`` on real
processes are in ``tests/integration/test_metrics_tls.py``.
"""

import os
import shutil
from typing import List

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tests.keydir import KeyDirCase
from tests.tlscerts import make_pki
from tigertunnel import tap
from tigertunnel.errors import ConfigError
from tigertunnel.ops.shutdown import TunnelService

try:
    from twisted.internet import ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory
    ssl.CertificateOptions  # noqa: B018
except ImportError:
    HAVE_TLS = False
else:
    HAVE_TLS = True

from tigertunnel.ops.tls import client_tls, read_certificates, read_server_tls  # noqa: E402

PAIR = "127.0.0.1:3000,127.0.0.1:3001"
NO_TLS = "pyOpenSSL is not installed (pip install 'twisted[tls]')"


class TLSCase(KeyDirCase):
    """A directory with a fresh CA, server, client and stranger certificate."""

    def setUp(self) -> None:
        if not HAVE_TLS:
            self.skipTest(NO_TLS)
        super().setUp()
        self.pki = make_pki(self.path("pki"))

    def copy(self, name: str, mode: int) -> str:
        """A copy of PKI file ``name`` with permission bits ``mode``."""
        path = self.path(f"copy-{name}")
        shutil.copyfile(self.pki[name], path)
        os.chmod(path, mode)
        return path


class ReadTests(TLSCase):
    """Certificate, key and CA files are checked, each problem one line naming the file."""

    def test_server_files(self) -> None:
        """A certificate with its key and a client CA give options requiring a client certificate."""
        tls = read_server_tls(self.pki["server.pem"], self.pki["server.key"], self.pki["ca.pem"])
        self.assertTrue(tls.requires_client_certificate)
        options = tls.options()
        self.assertTrue(options.verify)
        self.assertTrue(options.requireCertificate)
        plain = read_server_tls(self.pki["server.pem"], self.pki["server.key"])
        self.assertFalse(plain.requires_client_certificate)
        self.assertFalse(plain.options().verify)

    def test_chain_after_leaf(self) -> None:
        """Certificates after the first in the certificate file are sent as its chain."""
        chained = self.path("chained.pem")
        with open(chained, "wb") as f:
            for name in ("server.pem", "ca.pem"):
                with open(self.pki[name], "rb") as part:
                    f.write(part.read())
        tls = read_server_tls(chained, self.pki["server.key"])
        self.assertEqual([c.getSubject().commonName for c in tls.chain],
                         [b"tigertunnel test ca"])

    def errors(self, *args: str) -> str:
        """The one-line message read_server_tls(*args) fails with."""
        error = self.assertRaises(ConfigError, read_server_tls, *args)
        message = str(error)
        self.assertNotIn("\n", message)
        return message

    def test_bad_files(self) -> None:
        """Each unusable file is named, with what is wrong with it."""
        pki = self.pki
        key = pki["server.key"]
        cases = [
            ((self.path("absent.pem"), key), f"cannot read certificate file '{self.path('absent.pem')}'"),
            ((key, key), f"certificate file {key!r} holds no PEM certificate"),
            ((pki["server.pem"], pki["client.key"]),
             f"TLS key file {pki['client.key']!r} is not the private key of the certificate"),
            ((pki["server.pem"], pki["server.pem"]), f"{pki['server.pem']}: InsecurePermissions"),
            ((pki["server.pem"], key, self.path("absent-ca.pem")),
             f"cannot read client CA file '{self.path('absent-ca.pem')}'"),
            ((pki["server.pem"], key, key), f"client CA file {key!r} holds no PEM certificate"),
        ]
        for args, expected in cases:
            self.assertIn(expected, self.errors(*args))

    def test_key_permissions(self) -> None:
        """A key file group or others can read is refused like any secret file."""
        loose = self.copy("server.key", 0o640)
        self.assertIn(f"{loose}: InsecurePermissions (run: chmod 600 {loose})",
                      self.errors(self.pki["server.pem"], loose))

    def test_key_not_in_message(self) -> None:
        """A damaged key file is refused without showing its content."""
        damaged = self.path("damaged.key")
        with open(self.pki["server.key"], "rb") as f:
            pem = f.read()
        body = pem.splitlines()[1]
        with open(damaged, "wb") as f:
            f.write(pem.replace(body, body[::-1]))
        os.chmod(damaged, 0o600)
        message = self.errors(self.pki["server.pem"], damaged)
        self.assertIn(f"TLS key file {damaged!r} is not the private key", message)
        self.assertNotIn(body.decode()[:20], message)

    def test_damaged_certificate(self) -> None:
        """A PEM block that is no certificate is refused, naming the file and the block."""
        bad = self.path("bad.pem")
        with open(bad, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        message = str(self.assertRaises(ConfigError, read_certificates, bad))
        self.assertIn(f"certificate file {bad!r}: certificate 1 does not parse", message)

    def test_client(self) -> None:
        """The status client loads its CA and client certificate; a bad CA file is one line."""
        self.assertIsNotNone(client_tls("127.0.0.1", self.pki["ca.pem"],
                                        self.pki["client.pem"], self.pki["client.key"]))
        error = self.assertRaises(ConfigError, client_tls, "h", self.pki["client.key"])
        self.assertIn(f"CA file {self.pki['client.key']!r} holds no PEM certificate", str(error))


class OptionTests(TLSCase):
    """--metrics-tls-* options: pairing rules, files, and --metrics-public."""

    def parse(self, *extra: str) -> tap.Options:
        """Parse a plaintext server with ``extra`` options."""
        options = tap.Options()
        options.parseOptions(["server", "-p", PAIR, "--plaintext", *extra])
        return options

    def refused(self, *extra: str) -> str:
        """The one-line usage error of parsing with ``extra``."""
        error = self.assertRaises(usage.UsageError, self.parse, *extra)
        self.assertNotIn("\n", str(error))
        return str(error)

    def tls(self, *, client_ca: bool = False) -> List[str]:
        """The options for the test server certificate (and the client CA)."""
        args = ["--metrics-tls-cert", self.pki["server.pem"],
                "--metrics-tls-key", self.pki["server.key"]]
        return args + (["--metrics-tls-client-ca", self.pki["ca.pem"]] if client_ca else [])

    def test_pairing(self) -> None:
        """Cert and key go together, the client CA needs both, all need --metrics."""
        local = ["--metrics", "tcp:9101:interface=127.0.0.1"]
        cert, key = self.pki["server.pem"], self.pki["server.key"]
        self.assertEqual(self.refused(*local, "--metrics-tls-cert", cert),
                         "--metrics-tls-cert needs --metrics-tls-key")
        self.assertEqual(self.refused(*local, "--metrics-tls-key", key),
                         "--metrics-tls-key needs --metrics-tls-cert")
        self.assertEqual(self.refused(*local, "--metrics-tls-client-ca", self.pki["ca.pem"]),
                         "--metrics-tls-client-ca needs --metrics-tls-cert and --metrics-tls-key")
        self.assertEqual(self.refused(*self.tls()), "--metrics-tls-cert needs --metrics")

    def test_bad_file_named(self) -> None:
        """A bad file stops start-up with one line naming it."""
        args = ["--metrics", "tcp:9101:interface=127.0.0.1", "--metrics-tls-cert",
                self.pki["server.pem"], "--metrics-tls-key", self.pki["client.key"]]
        self.assertIn(f"--metrics TLS: TLS key file {self.pki['client.key']!r} is not the "
                      f"private key", self.refused(*args))

    def test_public_needs_client_certificates(self) -> None:
        """Beyond loopback, TLS alone still needs --metrics-public; a required client certificate does not."""
        public = ["--metrics", "tcp:9101"]
        message = self.refused(*public, *self.tls())
        self.assertIn("--metrics 'tcp:9101' can be reached from other hosts and has no "
                      "authentication", message)
        self.assertIn("--metrics-tls-client-ca", message)
        ops = self.parse(*public, *self.tls(client_ca=True)).subOptions.operations
        self.assertEqual(ops.metrics, "tcp:9101")
        assert ops.metrics_tls is not None
        self.assertTrue(ops.metrics_tls.requires_client_certificate)
        self.parse(*public, *self.tls(), "--metrics-public")

    def test_served_over_tls(self) -> None:
        """makeService serves the metrics site inside TLS; without the options, plain HTTP."""
        for extra, wrapped in ((self.tls(client_ca=True), True), ([], False)):
            options = self.parse("--metrics", "tcp:9101:interface=127.0.0.1", *extra)
            reactor = MemoryReactorClock()
            service = tap.makeService(options, reactor=reactor)
            assert isinstance(service, TunnelService)
            service.startService()
            self.addCleanup(service.stopService)
            factories = {port: factory for port, factory, _, _ in reactor.tcpServers}
            self.assertEqual(isinstance(factories[9101], TLSMemoryBIOFactory), wrapped)

    def test_config_file(self) -> None:
        """In a cluster config file the TLS files are relative to it and checked on their own."""
        directory = self.path("etc")
        os.makedirs(directory)
        for name in ("server.pem", "server.key", "ca.pem"):
            shutil.copyfile(self.pki[name], os.path.join(directory, name))
            os.chmod(os.path.join(directory, name), 0o600)
        config = os.path.join(directory, "cluster.ini")
        text = """[tunnel]
plaintext = true
metrics = tcp:9101:interface=127.0.0.1
metrics-tls-cert = server.pem
metrics-tls-key = {key}
metrics-tls-client-ca = ca.pem

[replica 0]
tunnel = 127.0.0.1:3000
backend = 127.0.0.1:3001
"""
        with open(config, "w") as f:
            f.write(text.format(key="server.key"))
        options = tap.Options()
        options.parseOptions(["server", "--config", config])
        tls = options.subOptions.operations.metrics_tls
        self.assertTrue(tls is not None and tls.requires_client_certificate)
        os.chmod(os.path.join(directory, "server.key"), 0o644)
        error = self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                                  ["server", "--config", config])
        self.assertIn("metrics-tls-key", str(error))
        self.assertIn("InsecurePermissions", str(error))


class WithoutPyOpenSSLTests(SynchronousTestCase):
    """Without pyOpenSSL the TLS options say what to install."""

    def test_message(self) -> None:
        """The error names the missing package and the install command."""
        if HAVE_TLS:
            self.skipTest("pyOpenSSL is installed here")
        error = self.assertRaises(ConfigError, read_certificates, "/nonexistent")
        self.assertIn("TLS needs pyOpenSSL, which is not installed: pip install "
                      "'twisted[tls]'", str(error))
