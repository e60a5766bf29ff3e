"""Tests for :mod:`tigertunnel.crypto.libaegis`: libaegis is lent to the compiled data path only from a tested pyaegis."""

import configparser
import os
import re
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

import tigertunnel
from tigertunnel.crypto import libaegis
from tigertunnel.crypto.libaegis import SIGNATURE, TESTED_PYAEGIS, LibaegisError, aegis_addresses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tigertunnel.__file__)))


class FakeFFI:
    """cffi's ``ffi`` as far as :func:`aegis_addresses` uses it."""

    def __init__(self, signature: str = SIGNATURE) -> None:
        self.signature = signature

    def typeof(self, function: object) -> object:
        return function

    def getctype(self, ctype: object) -> str:
        return self.signature

    def cast(self, kind: str, function: Any) -> int:
        return int(function.address)


def ffi_module(signature: str = SIGNATURE, *names: str) -> Callable[[], ModuleType]:
    """A loader of a fake ``pyaegis._aegis_ffi`` with ``names`` (default: both functions)."""
    lib = SimpleNamespace(**{name: SimpleNamespace(address=10 + i)
                             for i, name in enumerate(names or libaegis.FUNCTIONS)})
    module = ModuleType("fake_aegis_ffi")
    setattr(module, "ffi", FakeFFI(signature))
    setattr(module, "lib", lib)
    return lambda: module


class AddressTests(SynchronousTestCase):
    """:func:`aegis_addresses` checks the version, the functions and their signature."""

    def test_installed_pyaegis(self) -> None:
        """The pyaegis this suite runs with lends two distinct, non-null addresses."""
        encrypt, decrypt = aegis_addresses()
        self.assertNotEqual(encrypt, 0)
        self.assertNotEqual(decrypt, 0)
        self.assertNotEqual(encrypt, decrypt)

    def test_fake_in_range(self) -> None:
        """A version in range with both functions of the right type gives their addresses."""
        self.assertEqual(aegis_addresses(lambda: "0.3.7", ffi_module()), (10, 11))

    def test_versions_outside_the_range(self) -> None:
        """Versions below or above the tested range are refused, naming the version and range."""
        for version in ("0.3.0", "0.2.9", "0.4.0", "0.4.0rc1", "1.0"):
            with self.assertRaises(LibaegisError) as caught:
                aegis_addresses(lambda: version, ffi_module())
            self.assertIn(f"pyaegis {version} is outside the tested range >= 0.3.1, < 0.4",
                          str(caught.exception))

    def test_versions_inside_the_range(self) -> None:
        """The first tested release and later patch releases are accepted."""
        for version in ("0.3.1", "0.3.2", "0.3.10.post1"):
            self.assertEqual(aegis_addresses(lambda: version, ffi_module()), (10, 11))

    def test_unparsable_version(self) -> None:
        """A version that is not a release number is refused."""
        with self.assertRaises(LibaegisError):
            aegis_addresses(lambda: "dev", ffi_module())

    def test_missing_function(self) -> None:
        """A cffi module without the decrypt function is refused, naming it."""
        loader = ffi_module(SIGNATURE, "aegis128x2_encrypt_detached")
        with self.assertRaises(LibaegisError) as caught:
            aegis_addresses(lambda: "0.3.1", loader)
        self.assertIn("aegis128x2_decrypt_detached", str(caught.exception))

    def test_other_signature(self) -> None:
        """A function with another C signature (a changed libaegis API) is refused."""
        other = "int(*)(uint8_t *, size_t, uint8_t *)"
        with self.assertRaises(LibaegisError) as caught:
            aegis_addresses(lambda: "0.3.1", ffi_module(other))
        self.assertIn(other, str(caught.exception))

    def test_no_ffi_module(self) -> None:
        """A pyaegis without its cffi module is refused."""
        def missing() -> ModuleType:
            raise ImportError("No module named 'pyaegis._aegis_ffi'")
        with self.assertRaises(LibaegisError) as caught:
            aegis_addresses(lambda: "0.3.1", missing)
        self.assertIn("no usable cffi module", str(caught.exception))

    def test_range_is_setup_cfg_pin(self) -> None:
        """setup.cfg pins pyaegis to exactly the range checked at import."""
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        requires = config["options"]["install_requires"]
        pin, = re.findall(r"^pyaegis\s*(.*)$", requires, re.MULTILINE)
        low, high = TESTED_PYAEGIS
        self.assertEqual(pin.replace(" ", ""),
                         f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}")
