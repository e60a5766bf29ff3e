"""Tests for :mod:`tigertunnel.keys.ring` (the live keys and their check)."""

from dataclasses import FrozenInstanceError

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.crypto import kdf, kem
from tigertunnel.keys.format import KeyStore
from tigertunnel.keys.ring import KeyRing
from tigertunnel.keys.ring import KeyUse

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


OTHER = bytes(range(1, 33))


def use(psk_id: int = 1, key: bytes = GOOD, kem_id: "int | None" = None,
        kem_fp: "bytes | None" = None) -> KeyUse:
    """The KeyUse of a connection made with PSK ``key`` under ``psk_id``."""
    return KeyUse(psk_id, kdf.key_fingerprint(key), kem_id, kem_fp)


class KeyUseTests(SynchronousTestCase):
    """Which pool connections a ring takes as current (what a reload retires)."""

    def test_client_first_key_only(self) -> None:
        """A client is current only with the first PSK of the file, with the same bytes."""
        ring = KeyRing(KeyStore([(2, GOOD), (1, OTHER)]))
        self.assertTrue(ring.client_current(use(2, GOOD)))
        self.assertFalse(ring.client_current(use(1, OTHER)))  # in the file, not first
        self.assertFalse(ring.client_current(use(2, OTHER)))  # same id, new bytes

    def test_client_kem_public_key(self) -> None:
        """A client's KEM use must match the configured public key (id and bytes),
        and a connection made with KEM is outdated once none is configured."""
        public = kem.public_key_from_seed(GOOD)
        fingerprint = kdf.public_key_fingerprint(public)
        ring = KeyRing(KeyStore([(1, GOOD)]), kem_public=(7, public))
        self.assertTrue(ring.client_current(use(kem_id=7, kem_fp=fingerprint)))
        self.assertFalse(ring.client_current(use(kem_id=8, kem_fp=fingerprint)))
        other = kdf.public_key_fingerprint(kem.public_key_from_seed(OTHER))
        self.assertFalse(ring.client_current(use(kem_id=7, kem_fp=other)))
        self.assertFalse(ring.client_current(use()))
        self.assertFalse(KeyRing(KeyStore([(1, GOOD)])).client_current(
            use(kem_id=7, kem_fp=fingerprint)))

    def test_server_any_key_in_the_file(self) -> None:
        """A server accepts any PSK id still in the file with the same bytes, and
        a KEM key id still in its KEM file with the same seed."""
        ring = KeyRing(KeyStore([(2, GOOD), (1, OTHER)]),
                       kem_secret=KeyStore([(7, GOOD)]))
        self.assertTrue(ring.server_accepts(use(1, OTHER)))
        self.assertFalse(ring.server_accepts(use(3, GOOD)))
        self.assertFalse(ring.server_accepts(use(1, GOOD)))
        self.assertTrue(ring.server_accepts(use(2, kem_id=7, kem_fp=kdf.key_fingerprint(GOOD))))
        self.assertFalse(ring.server_accepts(use(2, kem_id=7,
                                                 kem_fp=kdf.key_fingerprint(OTHER))))
        self.assertFalse(ring.server_accepts(use(2, kem_id=9, kem_fp=kdf.key_fingerprint(GOOD))))
        self.assertFalse(KeyRing(KeyStore([(1, GOOD)])).server_accepts(
            use(kem_id=7, kem_fp=kdf.key_fingerprint(GOOD))))

    def test_unknown_fingerprint_counts_as_current(self) -> None:
        """A use without a recorded fingerprint is judged by its ids alone; plaintext
        takes everything."""
        ring = KeyRing(KeyStore([(1, GOOD)]))
        self.assertTrue(ring.client_current(KeyUse(1)))
        self.assertTrue(ring.server_accepts(KeyUse(1)))
        self.assertFalse(ring.server_accepts(KeyUse(2)))
        self.assertTrue(KeyRing().client_current(KeyUse(5)))
        self.assertTrue(KeyRing().server_accepts(KeyUse(5)))
