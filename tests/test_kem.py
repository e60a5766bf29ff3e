"""Tests for tigertunnel.crypto.kem: MLKEM768-X25519 (X-Wing)."""

import hashlib

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import load_vectors, unhex
from tigertunnel.crypto import kem
from tigertunnel.errors import KEMError

XWING = load_vectors("xwing")
CASES = XWING["cases"]
SEED = unhex(CASES[1]["seed"])
PUBLIC = unhex(CASES[1]["public_key"])
CIPHERTEXT = unhex(CASES[1]["ciphertext"])


class VectorTests(SynchronousTestCase):
    """Every value of the ``cases`` in xwing.json is reproduced."""

    def test_sizes(self) -> None:
        """The size constants equal the sizes recorded in xwing.json."""
        self.assertEqual(kem.PUBLIC_KEY_SIZE, XWING["public_key_length"])
        self.assertEqual(kem.SECRET_KEY_SIZE, XWING["secret_key_length"])
        self.assertEqual(kem.CIPHERTEXT_SIZE, XWING["ciphertext_length"])
        self.assertEqual(kem.SHARED_SECRET_SIZE, XWING["shared_secret_length"])
        self.assertEqual(kem.ENCAPS_SEED_SIZE, XWING["encaps_seed_length"])

    def test_seed_expansion(self) -> None:
        """The 96-byte SHAKE256 expansion of each seed matches."""
        self.assertEqual(len(CASES), 3)
        for case in CASES:
            self.assertEqual(unhex(case["secret_key"]), unhex(case["seed"]))
            self.assertEqual(kem.expand_seed(unhex(case["seed"])),
                             unhex(case["shake256_96"]))

    def test_public_key_native(self) -> None:
        """The native ML-KEM key expansion yields each vector public key."""
        self.assertTrue(kem.HAVE_NATIVE_MLKEM)
        for case in CASES:
            self.assertEqual(kem.public_key_from_seed(unhex(case["seed"])),
                             unhex(case["public_key"]))
            self.assertEqual(kem.SecretKey(unhex(case["seed"])).public_key,
                             unhex(case["public_key"]))

    def test_public_key_kyber(self) -> None:
        """kyber-py's key_derive yields the same public keys as the native path."""
        for case in CASES:
            secret = kem.SecretKey(unhex(case["seed"]), pure_python=True)
            self.assertEqual(secret.public_key, unhex(case["public_key"]))

    def test_encapsulate(self) -> None:
        """Deterministic encapsulation reproduces each ciphertext and shared secret."""
        for case in CASES:
            ciphertext, secret = kem.encapsulate(unhex(case["public_key"]),
                                                 unhex(case["encaps_seed"]))
            self.assertEqual(ciphertext, unhex(case["ciphertext"]))
            self.assertEqual(secret, unhex(case["shared_secret"]))

    def test_decapsulate_native(self) -> None:
        """Native decapsulation of each vector ciphertext gives decaps_shared_secret."""
        for case in CASES:
            secret = kem.SecretKey(unhex(case["seed"]))
            self.assertEqual(secret.decapsulate(unhex(case["ciphertext"])),
                             unhex(case["decaps_shared_secret"]))
            self.assertEqual(kem.decapsulate(unhex(case["seed"]), unhex(case["ciphertext"])),
                             unhex(case["decaps_shared_secret"]))

    def test_decapsulate_kyber(self) -> None:
        """kyber-py decapsulation of each vector ciphertext gives decaps_shared_secret."""
        for case in CASES:
            secret = kem.SecretKey(unhex(case["seed"]), pure_python=True)
            self.assertEqual(secret.decapsulate(unhex(case["ciphertext"])),
                             unhex(case["decaps_shared_secret"]))


class BehaviourTests(SynchronousTestCase):
    """Production encapsulation, implicit rejection and error handling."""

    def test_random_round_trip(self) -> None:
        """Production encapsulation decapsulates to the same secret, fresh each time."""
        secret = kem.SecretKey(SEED)
        ct1, ss1 = kem.encapsulate(secret.public_key)
        ct2, ss2 = kem.encapsulate(secret.public_key)
        self.assertEqual((len(ct1), len(ss1)), (kem.CIPHERTEXT_SIZE, kem.SHARED_SECRET_SIZE))
        self.assertEqual(secret.decapsulate(ct1), ss1)
        self.assertEqual(secret.decapsulate(ct2), ss2)
        self.assertNotEqual(ct1, ct2)
        self.assertNotEqual(ss1, ss2)

    @settings(max_examples=10)
    @given(st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64))
    def test_deterministic_round_trip(self, seed: bytes, randomness: bytes) -> None:
        """Deterministic encapsulation to any key decapsulates to the same secret."""
        secret = kem.SecretKey(seed)
        ciphertext, shared = kem.encapsulate(secret.public_key, randomness)
        self.assertEqual(secret.decapsulate(ciphertext), shared)

    def test_implicit_rejection(self) -> None:
        """A tampered ML-KEM part decapsulates to a different secret, not an error."""
        tampered = bytes([CIPHERTEXT[0] ^ 1]) + CIPHERTEXT[1:]
        secret = kem.SecretKey(SEED)
        self.assertNotEqual(secret.decapsulate(tampered), unhex(CASES[1]["shared_secret"]))
        self.assertEqual(secret.decapsulate(tampered),
                         kem.SecretKey(SEED, pure_python=True).decapsulate(tampered))

    def test_combiner(self) -> None:
        """The shared secret is SHA3-256 over ss_M, ss_X, ct_X, pk_X and the label."""
        randomness = unhex(CASES[1]["encaps_seed"])
        from kyber_py.ml_kem import ML_KEM_768
        from cryptography.hazmat.primitives.asymmetric.x25519 import (
            X25519PrivateKey, X25519PublicKey)
        ss_m, _ = ML_KEM_768._encaps_internal(PUBLIC[:1184], randomness[:32])
        eph = X25519PrivateKey.from_private_bytes(randomness[32:])
        ss_x = eph.exchange(X25519PublicKey.from_public_bytes(PUBLIC[1184:]))
        expected = hashlib.sha3_256(ss_m + ss_x + CIPHERTEXT[1088:] + PUBLIC[1184:]
                                    + bytes.fromhex("5c2e2f2f5e5c")).digest()
        self.assertEqual(expected, unhex(CASES[1]["shared_secret"]))

    def test_zero_x25519_ciphertext(self) -> None:
        """Decapsulating a ciphertext whose X25519 part is all zero raises KEMError."""
        for pure in (False, True):
            secret = kem.SecretKey(SEED, pure_python=pure)
            self.assertRaises(KEMError, secret.decapsulate, CIPHERTEXT[:1088] + bytes(32))

    def test_zero_x25519_public_key(self) -> None:
        """Encapsulating to a public key with an all-zero X25519 part raises KEMError."""
        self.assertRaises(KEMError, kem.encapsulate, PUBLIC[:1184] + bytes(32))
        self.assertRaises(KEMError, kem.encapsulate, PUBLIC[:1184] + bytes(32), bytes(64))

    def test_invalid_mlkem_public_key(self) -> None:
        """An ML-KEM public key failing the modulus check raises KEMError."""
        bad = b"\xff" * 1184 + PUBLIC[1184:]
        self.assertRaises(KEMError, kem.encapsulate, bad)
        self.assertRaises(KEMError, kem.encapsulate, bad, bytes(64))

    def test_bad_lengths(self) -> None:
        """Wrong-length seeds, keys, ciphertexts and randomness raise KEMError."""
        self.assertRaises(KEMError, kem.SecretKey, SEED[:31])
        self.assertRaises(KEMError, kem.public_key_from_seed, SEED + b"x")
        self.assertRaises(KEMError, kem.encapsulate, PUBLIC[:-1])
        self.assertRaises(KEMError, kem.encapsulate, PUBLIC, bytes(63))
        self.assertRaises(KEMError, kem.SecretKey(SEED).decapsulate, CIPHERTEXT + b"x")
        self.assertRaises(KEMError, kem.decapsulate, SEED, CIPHERTEXT[:-1])
        self.assertRaises(KEMError, kem.decapsulate, b"", CIPHERTEXT)

    def test_repr_hides_seed(self) -> None:
        """The repr of a SecretKey shows neither the seed nor its expansion."""
        text = repr(kem.SecretKey(SEED)) + repr(kem.SecretKey(SEED, pure_python=True))
        self.assertNotIn(SEED.hex(), text)
        self.assertNotIn(kem.expand_seed(SEED)[64:].hex(), text)
        self.assertNotIn(repr(SEED), text)
