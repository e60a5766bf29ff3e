"""Tests for :mod:`tigertunnel.keys.ring` (the live keys and their check)."""

from dataclasses import FrozenInstanceError

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.crypto import kem
from tigertunnel.keys.format import KeyStore
from tigertunnel.keys.ring import KeyRing

GOOD = bytes(range(32))


class KeyRingTests(SynchronousTestCase):
    """A KeyRing is frozen, and its check names what is wrong without key bytes."""

    def test_good_keys_pass(self) -> None:
        """Parsed-looking keys of both roles pass the check."""
        KeyRing(KeyStore([(1, GOOD), (2, GOOD)])).check()
        KeyRing(KeyStore([(1, GOOD)]),
                kem_public=(7, kem.public_key_from_seed(GOOD))).check()
        KeyRing(KeyStore([(1, GOOD)]), kem_secret=KeyStore([(7, GOOD)])).check()
        KeyRing().check()  # plaintext

    def test_bad_material_named(self) -> None:
        """Wrong sizes and out-of-range ids are refused, naming the key id only."""
        short = b"\x01" * 31
        cases = [
            (KeyRing(KeyStore([(3, short)])), "PSK key id 3 is not 32 bytes"),
            (KeyRing(KeyStore([(1 << 64, GOOD)])), f"PSK key id {1 << 64} is not a u64"),
            (KeyRing(KeyStore()), "no PSK"),
            (KeyRing(KeyStore([(1, GOOD)]), kem_public=(9, b"\x02" * 100)),
             f"KEM public key id 9 is not {kem.PUBLIC_KEY_SIZE} bytes"),
        ]
        for ring, expected in cases:
            with self.assertRaises(ValueError) as caught:
                ring.check()
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn(repr(short), str(caught.exception))

    def test_frozen(self) -> None:
        """A ring is never changed; a reload makes a new one."""
        ring = KeyRing(KeyStore([(1, GOOD)]))
        with self.assertRaises(FrozenInstanceError):
            ring.psk = None  # type: ignore[misc]

    def test_describe(self) -> None:
        """The summary names key ids, the client its one PSK."""
        ring = KeyRing(KeyStore([(4, GOOD), (5, GOOD)]), kem_secret=KeyStore([(8, GOOD)]))
        self.assertEqual(ring.describe(client=False), "psk key ids [4, 5], kem key ids [8]")
        self.assertEqual(KeyRing(KeyStore([(4, GOOD), (5, GOOD)])).describe(client=True),
                         "psk key id 4 (of 2)")
        self.assertEqual(KeyRing().describe(client=True), "plaintext (no keys)")
