"""Tests for tigertunnel.cli: the console script's commands, messages and exit statuses."""

import io
import os
import stat
import sys
from typing import List, Tuple


from tests.keydir import KeyDirCase

from tigertunnel import __version__, cli
from tigertunnel.keys.files import load_kem_public_file, load_psk_file
from tigertunnel.keys.generate import keygen


class MainTests(KeyDirCase):
    """``tigertunnel ARGS`` run in this process, its output captured."""

    def run_main(self, *args: str) -> Tuple[int, str, str]:
        """Run the console script; return its status, stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = cli.main(list(args))
        return status, out.getvalue(), err.getvalue()

    def error_line(self, *args: str) -> Tuple[int, str]:
        """Run a failing command; return its status and its one stderr line."""
        status, _, err = self.run_main(*args)
        lines: List[str] = err.splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("tigertunnel: error: "), lines[0])
        return status, lines[0][len("tigertunnel: error: "):]

    def test_version(self) -> None:
        """--version, alone or after any command, prints tigertunnel's version, data path and ML-KEM backend, and exits 0."""
        from tigertunnel.wire.implementation import ACTIVE
        for args in (["--version"], ["server", "--version"], ["client", "--version"],
                     ["keygen", "--version"], ["check-config", "--version"],
                     ["status", "--version"], ["demo", "--version"], ["bench", "--version"],
                     ["echo", "--version"]):
            status, out, err = self.run_main(*args)
            self.assertEqual((status, err), (0, ""), args)
            self.assertEqual(len(out.splitlines()), 1, out)
            self.assertTrue(out.startswith(f"tigertunnel {__version__}; data path: {ACTIVE.name}"),
                            (args, out))
            self.assertIn("; ML-KEM: native (cryptography ", out)

    def test_unknown_option(self) -> None:
        """An unknown flag before any command is an unknown option, not an unknown command."""
        self.assertEqual(self.error_line("--bogus"),
                         (2, "unknown option: '--bogus' (see tigertunnel --help)"))

    def test_help_examples_one_per_line(self) -> None:
        """The examples of status, bench, demo and echo --help stand one command per line."""
        for command, example in (("status", "  tigertunnel status 10.0.0.5:9101\n"),
                                 ("bench", "  tigertunnel bench\n"),
                                 ("demo", "  tigertunnel demo --sessions 32 --rounds 5\n"),
                                 ("echo", "  tigertunnel echo 3001 &\n")):
            status, out, _ = self.run_main(command, "--help")
            self.assertEqual(status, 0)
            self.assertIn("\nExample", out)
            self.assertIn(example, out)

    def test_internal_option_hidden(self) -> None:
        """server and client --help do not show --worker-index."""
        for command in ("server", "client"):
            status, out, _ = self.run_main(command, "--help")
            self.assertEqual(status, 0)
            self.assertIn("--workers=", out)
            self.assertNotIn("worker-index", out)

    def test_echo_usage_errors(self) -> None:
        """echo needs one port number, 1 to 65535."""
        self.assertEqual(self.error_line("echo"),
                         (2, "echo: give the PORT to listen on (127.0.0.1:PORT)"))
        self.assertEqual(self.error_line("echo", "70000"),
                         (2, "echo: invalid port: '70000' (1 to 65535)"))

    def test_broken_pipe_is_quiet(self) -> None:
        """A reader that stops reading ends the command with status 141 and nothing on stderr."""
        class Closed(io.StringIO):
            def write(self, text: str) -> int:
                raise BrokenPipeError(32, "Broken pipe")

            def flush(self) -> None:
                raise BrokenPipeError(32, "Broken pipe")

        keygen(self.path("k"), key_id=5)
        err = io.StringIO()
        self.patch(sys, "stdout", Closed())
        self.patch(sys, "stderr", err)
        status = cli.main(["check-config", "server", "-p", ":3000,127.0.0.1:3001",
                           "-k", self.path("k")])
        self.assertEqual((status, err.getvalue()), (141, ""))

    def test_help_lists_every_command(self) -> None:
        """No arguments, help, -h and --help print the commands and the twistd forms, status 0."""
        for args in ([], ["help"], ["-h"], ["--help"]):
            status, out, _ = self.run_main(*args)
            self.assertEqual(status, 0, args)
            for command in cli.COMMANDS:
                self.assertIn(f"    {command} ", out)
            self.assertIn("twistd -n tigertunnel server", out)

    def test_command_help_names_the_command(self) -> None:
        """A command's --help starts with its full usage line."""
        status, out, _ = self.run_main("check-config", "server", "--help")
        self.assertEqual(status, 0)
        self.assertTrue(out.startswith("Usage: tigertunnel check-config server [options] -p"), out)

    def test_unknown_command(self) -> None:
        """An unknown command is a usage error naming it."""
        self.assertEqual(self.error_line("frobnicate"),
                         (2, "unknown command: 'frobnicate' (see tigertunnel --help)"))

    def test_keygen(self) -> None:
        """keygen writes a loadable 0600 key file and reports its key id on stderr."""
        status, out, err = self.run_main("keygen", "-o", self.path("k"))
        self.assertEqual((status, out), (0, ""))
        (key_id,) = load_psk_file(self.path("k")).ids()
        self.assertEqual(err, f"Generated key {key_id} -> {self.path('k')}\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path("k")).st_mode), 0o600)

    def test_keygen_errors(self) -> None:
        """keygen without -o is a usage error (2); over an existing file an error (1) saying --force."""
        self.assertEqual(self.error_line("keygen"), (2, "output path (-o) is required"))
        keygen(self.path("k"))
        status, message = self.error_line("keygen", "-o", self.path("k"))
        self.assertEqual(status, 1)
        self.assertIn(self.path("k"), message)
        self.assertIn("--force", message)

    def test_kemgen(self) -> None:
        """kemgen writes PREFIX.pub and PREFIX.key with one key id."""
        status, _, err = self.run_main("kemgen", "-o", self.path("s"))
        self.assertEqual(status, 0)
        key_id, _ = load_kem_public_file(self.path("s.pub"))
        self.assertEqual(err, f"Generated KEM keypair {key_id} -> {self.path('s')}.pub, "
                              f"{self.path('s')}.key\n")

    def test_run_usage_error(self) -> None:
        """server/client option errors are usage errors (2) with the options' message."""
        self.assertEqual(self.error_line("client", "--plaintext"),
                         (2, "at least one proxy pair (-p LISTEN,TARGET) is required "
                             "for client mode"))

    def test_check_config(self) -> None:
        """check-config prints ok and the run for a valid run, and exits 1 with one line for a bad one."""
        keygen(self.path("k"), key_id=5)
        status, out, _ = self.run_main("check-config", "server", "-p", ":3000,127.0.0.1:3001",
                                       "-k", self.path("k"))
        self.assertEqual(status, 0)
        self.assertEqual(out.splitlines(), ["ok", "server: 1 proxy pairs; psk key ids [5]",
                                            "  pair0: :3000 -> 127.0.0.1:3001 (pair=127.0.0.1:3001)"])
        self.assertEqual(self.error_line("check-config", "server", "-p", ":3000,127.0.0.1:99999",
                                         "-k", self.path("k")),
                         (1, "invalid target address: '127.0.0.1:99999' (expected :PORT, "
                             "IPv4:PORT, [IPv6]:PORT or HOST:PORT)"))
        self.assertEqual(self.error_line("check-config"),
                         (1, "give server|client [options], or --config FILE"))

    def test_check_config_file(self) -> None:
        """check-config --config checks each replica's server and the clients of a cluster file."""
        keygen(self.path("k"))
        with open(self.path("c.ini"), "w") as f:
            f.write("[tunnel]\nkey = k\n[replica 0]\ntunnel = 127.0.0.1:3000\n"
                    "backend = 127.0.0.1:3001\n[replica 1]\ntunnel = 127.0.0.1:3010\n"
                    "backend = 127.0.0.1:3011\n")
        status, out, _ = self.run_main("check-config", "--config", self.path("c.ini"))
        self.assertEqual(status, 0)
        self.assertEqual([line for line in out.splitlines() if line.startswith("ok: ")], [
            f"ok: --config {self.path('c.ini')} --replica 0",
            f"ok: --config {self.path('c.ini')} --replica 1",
            f"ok: --config {self.path('c.ini')}",
            f"ok: --config {self.path('c.ini')} --replica 0",
            f"ok: --config {self.path('c.ini')} --replica 1"])
        status, message = self.error_line("check-config", "--config", self.path("none.ini"))
        self.assertEqual(status, 1)
        self.assertIn("none.ini: cannot read", message)

    def test_tool_usage_errors(self) -> None:
        """demo and bench usage errors name the command and exit 2."""
        self.assertEqual(self.error_line("bench", "--modes", "rsa"),
                         (2, "bench: modes are psk and kem"))
        self.assertEqual(self.error_line("demo", "--sessions", "0"),
                         (2, "demo: --sessions must be a whole number of at least 1, not '0'"))
