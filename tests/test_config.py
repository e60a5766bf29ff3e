"""Tests for :mod:`tigertunnel.config.model` (address syntax, PROTOCOL.md section 9)."""

from hypothesis import given, strategies as st
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.config.model import (
    Address,
    ProxyPair,
    Role,
    TunnelConfig,
    listen_description,
    parse_address,
    label_pairs,
    parse_proxy,
)
from tigertunnel.errors import ConfigError


class ParseAddressAcceptedTests(SynchronousTestCase):
    """Every documented address form parses to the right host and port."""

    def test_port_only(self) -> None:
        """``:PORT`` means every IPv4 interface: an empty host."""
        self.assertEqual(parse_address(":3000", "x"), Address("", 3000))

    def test_ipv4(self) -> None:
        """An IPv4 literal with a port keeps the literal as host."""
        self.assertEqual(parse_address("127.0.0.1:3001", "x"),
                         Address("127.0.0.1", 3001))

    def test_ipv6_in_brackets(self) -> None:
        """``[IPv6]:PORT`` gives the bare IPv6 literal as host."""
        self.assertEqual(parse_address("[::1]:3000", "x"), Address("::1", 3000))
        self.assertEqual(parse_address("[2001:db8::7]:443", "x"),
                         Address("2001:db8::7", 443))

    def test_host_names(self) -> None:
        """Host names (the reference rejects them) are accepted with a port."""
        for text, host in [("localhost:3000", "localhost"),
                           ("tunnel.example.org:3000", "tunnel.example.org"),
                           ("r0-a.example:1", "r0-a.example"),
                           ("example.org.:80", "example.org.")]:
            self.assertEqual(parse_address(text, "x"), Address(host, int(text.rsplit(":", 1)[1])))

    def test_port_bounds(self) -> None:
        """Ports 1 and 65535 are the smallest and largest accepted."""
        self.assertEqual(parse_address(":1", "x").port, 1)
        self.assertEqual(parse_address("[::1]:65535", "x").port, 65535)

    def test_str_round_trip(self) -> None:
        """``str(Address)`` is the user syntax again, with brackets for IPv6."""
        for text in [":3000", "127.0.0.1:3001", "[::1]:3000", "db.example:5"]:
            address = parse_address(text, "x")
            self.assertEqual(str(address), text)
            self.assertEqual(parse_address(str(address), "x"), address)

    def test_is_ipv6(self) -> None:
        """Only an IPv6 literal host reports ``is_ipv6``."""
        self.assertTrue(Address("::1", 1).is_ipv6)
        self.assertFalse(Address("127.0.0.1", 1).is_ipv6)
        self.assertFalse(Address("example.org", 1).is_ipv6)
        self.assertFalse(Address("", 1).is_ipv6)


class ParseAddressRejectedTests(SynchronousTestCase):
    """Bad addresses raise ConfigError naming the value and what it was for."""

    def assert_rejected(self, text: str) -> None:
        """Assert that ``text`` is refused with a message naming it."""
        error = self.assertRaises(ConfigError, parse_address, text, "listen address")
        self.assertIn(repr(text), str(error))
        self.assertIn("listen address", str(error))

    def test_no_port(self) -> None:
        """An address without ``:PORT`` is refused (the reference's port 0 is not copied)."""
        for text in ["3000", "127.0.0.1", "localhost", "[::1]", "", "example.org"]:
            self.assert_rejected(text)

    def test_empty_port(self) -> None:
        """A colon with nothing after it is refused."""
        for text in [":", "127.0.0.1:", "[::1]:", "localhost:"]:
            self.assert_rejected(text)

    def test_port_out_of_range(self) -> None:
        """Port 0 and ports above 65535 are refused."""
        for text in [":0", ":00", "127.0.0.1:0", ":65536", "[::1]:65536", ":99999999999"]:
            self.assert_rejected(text)

    def test_port_not_decimal(self) -> None:
        """Signs, spaces, hex and letters in the port are refused."""
        for text in [":-1", ":+80", ": 80", ":80 ", ":0x50", ":http", ":8_0"]:
            self.assert_rejected(text)

    def test_non_ascii_decimal_digits(self) -> None:
        """A port written with non-ASCII decimal digits (Arabic-Indic 3000) is refused, not read as 3000."""
        self.assert_rejected(":\u0663\u0660\u0660\u0660")
        self.assert_rejected("127.0.0.1:\uff18\uff10")  # fullwidth 80

    def test_superscript_digits(self) -> None:
        """A port of superscript digits raises ConfigError, not a bare ValueError."""
        self.assert_rejected(":\u00b2")
        self.assert_rejected("127.0.0.1:\u00b9\u00b2")

    def test_bad_brackets(self) -> None:
        """Unbalanced or misplaced brackets are refused."""
        for text in ["[::1:3000", "::1]:3000", "[::1]3000", "[::1]:", "[]:3000",
                     "[[::1]]:3000", "[::1]:3000]", "x[::1]:3000"]:
            self.assert_rejected(text)

    def test_ipv4_in_brackets(self) -> None:
        """Brackets hold only IPv6 literals."""
        self.assert_rejected("[127.0.0.1]:3000")
        self.assert_rejected("[localhost]:3000")

    def test_ipv6_without_brackets(self) -> None:
        """An IPv6 literal without brackets is ambiguous and refused."""
        for text in ["::1:3000", "2001:db8::1:3000", "fe80::1:80"]:
            self.assert_rejected(text)

    def test_spaces(self) -> None:
        """Spaces anywhere are refused."""
        for text in [" :3000", "127.0.0.1 :3000", "local host:3000", "localhost :3000"]:
            self.assert_rejected(text)

    def test_bad_host_names(self) -> None:
        """Host names with empty, over-long or badly placed labels are refused."""
        for text in ["-bad.example:1", "bad-.example:1", "a..b:1", ".example:1",
                     "under_score:1", "caf\u00e9.example:1", "a" * 64 + ".example:1",
                     ".".join(["a" * 60] * 5) + ":1", "a,b:1", "a/b:1"]:
            self.assert_rejected(text)


class ParseProxyTests(SynchronousTestCase):
    """``-p LISTEN,TARGET`` pairs."""

    def test_pair(self) -> None:
        """A pair splits at the comma into a listen and a target address."""
        pair = parse_proxy(":4000,tunnel.example.org:3000", 3)
        self.assertEqual(pair, ProxyPair(3, Address("", 4000),
                                         Address("tunnel.example.org", 3000)))
        self.assertEqual(pair.name, "pair3")

    def test_ipv6_pair(self) -> None:
        """IPv6 literals on both sides parse (their colons do not confuse the split)."""
        pair = parse_proxy("[::1]:4000,[2001:db8::1]:3000", 0)
        self.assertEqual((pair.listen, pair.target),
                         (Address("::1", 4000), Address("2001:db8::1", 3000)))

    def test_missing_parts(self) -> None:
        """A pair without a comma or with an empty side is refused, naming the text."""
        for text in [":4000", ",127.0.0.1:3000", ":4000,", ",", ""]:
            error = self.assertRaises(ConfigError, parse_proxy, text, 0)
            self.assertIn(repr(text), str(error))
            self.assertIn("LISTEN,TARGET", str(error))

    def test_bad_listen(self) -> None:
        """A bad listen side is reported as the listen address, by value."""
        error = self.assertRaises(ConfigError, parse_proxy, "localhost,127.0.0.1:3000", 0)
        self.assertIn("listen address", str(error))
        self.assertIn("'localhost'", str(error))

    def test_bad_target(self) -> None:
        """A bad target side is reported as the target address, by value."""
        error = self.assertRaises(ConfigError, parse_proxy, ":4000,127.0.0.1:0", 0)
        self.assertIn("target address", str(error))
        self.assertIn("'127.0.0.1:0'", str(error))

    def test_third_part_must_be_a_name(self) -> None:
        """After LISTEN,TARGET only name=NAME may follow; anything else is refused, named."""
        error = self.assertRaises(ConfigError, parse_proxy, ":4000,a:1,b:2", 0)
        self.assertIn("only name=NAME may follow, not 'b:2'", str(error))
        error = self.assertRaises(ConfigError, parse_proxy, ":4000,a:1,name=x,y", 0)
        self.assertIn("invalid proxy pair name 'x,y'", str(error))


class ListenDescriptionTests(SynchronousTestCase):
    """Listen addresses become Twisted server endpoint descriptions."""

    def parsed(self, description: str) -> object:
        """Parse ``description`` with Twisted, as strports will."""
        return serverFromString(MemoryReactor(), description)

    def test_all_interfaces(self) -> None:
        """``:PORT`` listens on every IPv4 interface."""
        self.assertEqual(listen_description(Address("", 3000)), "tcp:3000:backlog=1024")
        self.assertEqual(self.parsed("tcp:3000:backlog=1024")._backlog, 1024)

    def test_ipv4(self) -> None:
        """An IPv4 host becomes the interface of a tcp endpoint."""
        description = listen_description(Address("127.0.0.1", 4000))
        self.assertEqual(description, "tcp:4000:interface=127.0.0.1:backlog=1024")
        endpoint = self.parsed(description)
        self.assertEqual((endpoint._port, endpoint._interface, endpoint._backlog),
                         (4000, "127.0.0.1", 1024))

    def test_ipv6_escaped(self) -> None:
        """An IPv6 host gets a tcp6 endpoint with its colons escaped, and parses back intact."""
        description = listen_description(Address("::1", 4000))
        self.assertEqual(description, "tcp6:4000:interface=\\:\\:1:backlog=1024")
        endpoint = self.parsed(description)
        self.assertEqual(type(endpoint).__name__, "TCP6ServerEndpoint")
        self.assertEqual((endpoint._port, endpoint._interface), (4000, "::1"))
        long = Address("2001:db8::42:1", 5)
        self.assertEqual(self.parsed(listen_description(long))._interface, "2001:db8::42:1")

    def test_host_name_resolved(self) -> None:
        """A host name is resolved once into an IP interface (``localhost`` via the hosts file)."""
        description = listen_description(Address("localhost", 4000))
        endpoint = self.parsed(description)
        self.assertIn(endpoint._interface, ("127.0.0.1", "::1"))
        self.assertEqual(endpoint._port, 4000)


addresses = st.one_of(
    st.builds(Address, st.just(""), st.integers(1, 65535)),
    st.builds(Address, st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
    st.builds(Address, st.ip_addresses(v=6).map(str), st.integers(1, 65535)),
    st.builds(Address,
              st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
                       min_size=1, max_size=4).map(".".join)
              .filter(lambda h: not h.replace(".", "").isdigit()),
              st.integers(1, 65535)),
)


class ParseAddressPropertyTests(SynchronousTestCase):
    """Properties of the address parser over generated input."""

    @given(st.text())
    def test_text_gives_address_or_config_error(self, text: str) -> None:
        """Arbitrary text parses to an Address with a port in 1..65535 or raises ConfigError, nothing else."""
        try:
            address = parse_address(text, "x")
        except ConfigError:
            return
        self.assertIsInstance(address, Address)
        self.assertTrue(1 <= address.port <= 65535)

    @given(st.text(alphabet=st.sampled_from("[]:.0123456789abcdef-x "), max_size=20))
    def test_address_alphabet_gives_address_or_config_error(self, text: str) -> None:
        """Text made of address characters parses or raises ConfigError, nothing else."""
        try:
            address = parse_address(text, "x")
        except ConfigError:
            return
        self.assertTrue(1 <= address.port <= 65535)

    @given(st.sampled_from(["", "127.0.0.1", "[::1]", "example.org"]),
           st.text(alphabet=st.characters(categories=("Nd", "No"), exclude_characters="0123456789"),
                   min_size=1, max_size=5))
    def test_non_ascii_port_refused(self, host: str, port: str) -> None:
        """A port containing any non-ASCII digit-like character raises ConfigError."""
        self.assertRaises(ConfigError, parse_address, f"{host}:{port}", "x")

    @given(addresses)
    def test_round_trip(self, address: Address) -> None:
        """Every valid address survives ``parse_address(str(address))`` unchanged."""
        self.assertEqual(parse_address(str(address), "x"), address)

    @given(addresses, addresses, st.integers(0, 15))
    def test_proxy_round_trip(self, listen: Address, target: Address, index: int) -> None:
        """A pair written as ``LISTEN,TARGET`` parses back to the same addresses."""
        self.assertEqual(parse_proxy(f"{listen},{target}", index),
                         ProxyPair(index, listen, target))


class RoleTests(SynchronousTestCase):
    """The role of a tunnel end is a Role, given by name or as one."""

    def test_config_takes_name(self) -> None:
        """TunnelConfig turns a role name into its Role."""
        config = TunnelConfig("server", [])
        self.assertIs(config.role, Role.SERVER)
        self.assertIs(TunnelConfig(Role.CLIENT, []).role, Role.CLIENT)

    def test_formats_as_name(self) -> None:
        """A Role formats, prints and compares as its name (log fields and JSON stay the same)."""
        self.assertEqual(f"{Role.CLIENT} end", "client end")
        self.assertEqual(str(Role.SERVER), "server")
        self.assertEqual("{role:>7}".format(role=Role.SERVER), " server")
        self.assertEqual(Role.CLIENT, "client")

    def test_bad_role(self) -> None:
        """An unknown role is a ConfigError naming the value."""
        with self.assertRaises(ConfigError) as caught:
            TunnelConfig("relay", [])
        self.assertEqual(str(caught.exception),
                         "invalid role: 'relay' (expected client or server)")


class PairNameTests(SynchronousTestCase):
    """-p LISTEN,TARGET[,name=NAME]: the pair's label is its name, else its target."""

    def test_name_suffix(self) -> None:
        """name=NAME is kept as the pair's given name; without it there is none."""
        self.assertEqual(parse_proxy(":4000,r2.example:3000,name=east-2", 0).given_name, "east-2")
        self.assertIsNone(parse_proxy(":4000,r2.example:3000", 0).given_name)

    def test_bad_names(self) -> None:
        """An empty, too long or oddly spelled name is refused, naming it."""
        for bad in ("", "a b", "x" * 65, "é", "a/b"):
            error = self.assertRaises(ConfigError, parse_proxy, f":1,:2,name={bad}", 0)
            self.assertIn(f"invalid proxy pair name {bad!r}", str(error))
        error = self.assertRaises(ConfigError, parse_proxy, ":1,:2,label=x", 0)
        self.assertIn("not 'label=x'", str(error))

    def test_labels(self) -> None:
        """A config labels each pair with its name or target; same targets get #INDEX."""
        pairs = [parse_proxy(t, i) for i, t in enumerate(
            [":4000,10.0.0.1:3000", ":4001,10.0.0.2:3000,name=b", ":4002,10.0.0.3:3000",
             ":4003,10.0.0.3:3000", "[::1]:4004,[::1]:3000"])]
        cfg = TunnelConfig("client", pairs)
        self.assertEqual([p.label for p in cfg.pairs],
                         ["10.0.0.1:3000", "b", "10.0.0.3:3000#2", "10.0.0.3:3000#3",
                          "[::1]:3000"])
        self.assertEqual([p.name for p in cfg.pairs], [f"pair{i}" for i in range(5)])

    def test_duplicate_names(self) -> None:
        """Two pairs with one name, or a name that is another pair's label, are refused."""
        same = [parse_proxy(":1,:2,name=x", 0), parse_proxy(":3,:4,name=x", 1)]
        error = self.assertRaises(ConfigError, label_pairs, same)
        self.assertIn("two proxy pairs are named 'x'", str(error))
        clash = [parse_proxy(":1,10.0.0.1:2", 0), parse_proxy(":3,:4,name=10.0.0.1:2", 1)]
        self.assertRaises(ConfigError, label_pairs, clash)
