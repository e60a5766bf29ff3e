"""Tests for :mod:`tigertunnel.ops.plan` and :mod:`tigertunnel.ops.validators`:
parse (no I/O), then plan (the I/O, once), with one table of option values."""

import dataclasses
import os
import socket
from typing import Any, List, Tuple

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel import tap
from tigertunnel.config import model
from tigertunnel.keys.generate import keygen
from tigertunnel.net.listeners import pair_listen_description
from tigertunnel.ops import validators
from tigertunnel.ops.plan import Plan, make_plan


def parse(*argv: str) -> tap.Options:
    """``argv`` parsed by the plugin options."""
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def plan_of(options: tap.Options, pidfile: Any = None) -> Plan:
    """The start-up plan of parsed options (as ``makeService`` makes it)."""
    sub = options.subOptions
    index = sub["worker-index"]
    return make_plan(sub.config, sub.operations, sub["log-level"],
                     None if index is None else int(index), sub.raw_args, sub.cwd,
                     pidfile)


class CountingResolver:
    """Stands in for ``socket.getaddrinfo``: counts lookups, answers 127.0.0.1."""

    def __init__(self) -> None:
        self.asked: List[Tuple[str, int]] = []

    def __call__(self, host: str, port: int, *args: Any) -> Any:
        self.asked.append((host, port))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


class ParseThenPlanTests(SynchronousTestCase):
    """Parsing checks values; the plan does the I/O, once, and is what runs."""

    def setUp(self) -> None:
        self.resolver = CountingResolver()
        self.patch(model.socket, "getaddrinfo", self.resolver)

    def test_parse_resolves_nothing(self) -> None:
        """A listen host name is not looked up while the options are parsed."""
        options = parse("client", "--plaintext", "-p", "tunnel-host.example:4000,:3000")
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(options.subOptions.config.listen_overrides, {})

    def test_plan_resolves_once_and_the_listener_uses_it(self) -> None:
        """The plan looks the name up once; the listener's description is that answer."""
        plan = plan_of(parse("client", "--plaintext", "-p", "tunnel-host.example:4000,:3000"))
        self.assertEqual(self.resolver.asked, [("tunnel-host.example", 4000)])
        pair = plan.config.pairs[0]
        self.assertEqual(pair_listen_description(plan.config, pair),
                         "tcp:4000:interface=127.0.0.1:backlog=1024")
        self.assertEqual(len(self.resolver.asked), 1)

    def test_make_service_resolves_once(self) -> None:
        """Building and starting a client looks its listen host up once in
        all (the plan), and listens on that answer."""
        reactor = MemoryReactorClock()
        service = tap.makeService(parse("client", "--plaintext", "-n", "1", "-p",
                                        "tunnel-host.example:4000,127.0.0.1:3000"),
                                  reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(self.resolver.asked, [("tunnel-host.example", 4000)])
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers],
                         [(4000, "127.0.0.1")])

    def test_plan_names_the_unresolvable_host(self) -> None:
        """A name that does not resolve fails the plan with one line naming it."""
        def fail(*args: Any) -> Any:
            raise socket.gaierror(-2, "Name or service not known")
        self.patch(model.socket, "getaddrinfo", fail)
        options = parse("client", "--plaintext", "-p", "nowhere.invalid:4000,:3000")
        with self.assertRaises(model.ConfigError) as caught:
            plan_of(options)
        self.assertIn("cannot resolve listen host 'nowhere.invalid'", str(caught.exception))
        with self.assertRaises(usage.UsageError) as refused:
            tap.makeService(options, reactor=object())  # type: ignore[arg-type]
        self.assertIn("'nowhere.invalid'", str(refused.exception))

    def test_server_replay_file_in_the_plan(self) -> None:
        """A server's replay file is named by the plan (next to the pidfile),
        and its workers are told it."""
        key = self.mktemp()
        keygen(key)
        options = parse("server", "-k", key, "-p", "127.0.0.1:3000,127.0.0.1:3001")
        plan = plan_of(options, pidfile="run/tt.pid")
        self.assertEqual(plan.replay_path, os.path.abspath("run/tt.pid") + ".replay")
        self.assertEqual(plan.worker_args[0], "server")
        self.assertEqual(plan.worker_args[-1], f"--replay-file={plan.replay_path}")
        self.assertFalse(plan.supervises)

    def test_settings_are_frozen(self) -> None:
        """The parsed settings cannot be changed afterwards, field by field."""
        options = parse("client", "--plaintext", "-p", "127.0.0.1:4000,:3000")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            options.subOptions.config.max_sessions = 3  # type: ignore[misc]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            options.subOptions.operations.metrics = "tcp:1"  # type: ignore[misc]


class ValidatorTableTests(SynchronousTestCase):
    """One table of option values serves the flags and the config file."""

    def test_every_file_key_with_a_value_has_a_validator(self) -> None:
        """Each [tunnel] key that takes a value is in the table; flags are not."""
        table = tap.config_file_options()
        with_value = {name for name, option in table.items() if not option.flag}
        self.assertEqual(with_value, set(validators.VALIDATORS) - {"workers"})
        self.assertFalse({name for name, option in table.items() if option.flag}
                         & set(validators.VALIDATORS))

    def test_file_value_checked_without_a_probe_parse(self) -> None:
        """A config-file value is checked by its validator alone: no options
        object is built to parse a stand-in command line."""
        built: List[object] = []
        real = tap._EndOptions.__init__

        def counting(options: tap._EndOptions) -> None:
            built.append(options)
            real(options)

        self.patch(tap._EndOptions, "__init__", counting)
        checker = tap.ClientOptions()
        built.clear()
        with self.assertRaises(usage.UsageError) as caught:
            checker.check_file_option("handshake-timeout", "soon")
        self.assertEqual(str(caught.exception), "invalid handshake-timeout: 'soon'")
        checker.check_file_option("max-sessions", "5")
        self.assertEqual(built, [])

    def test_same_message_for_flag_and_file(self) -> None:
        """The flag and the file refuse a value with the same words."""
        with self.assertRaises(usage.UsageError) as flag:
            parse("client", "--plaintext", "-p", ":1,:2", "--num-conns", "2000")
        with self.assertRaises(usage.UsageError) as file_value:
            tap.ClientOptions().check_file_option("num-conns", "2000")
        self.assertEqual(str(flag.exception), str(file_value.exception))
        self.assertEqual(str(flag.exception), "invalid num-conns: '2000' (must be 1 to 1024)")
