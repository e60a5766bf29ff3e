"""Tests for tigertunnel.crypto.kem: MLKEM768-X25519 (X-Wing)."""

import hashlib
import os
from typing import Any, Dict

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import load_vectors, unhex
from tigertunnel.crypto import kem
from cryptography.exceptions import UnsupportedAlgorithm

from tigertunnel.errors import KEMError, KEMUnavailableError

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


class _UnsupportedMLKEM:
    """Stands in for cryptography's ML-KEM classes on a backend without ML-KEM."""

    @classmethod
    def from_seed_bytes(cls, data: bytes) -> Any:
        """Fail as cryptography documents for an unsupported backend."""
        raise UnsupportedAlgorithm("ML-KEM-768 is not supported by this backend")

    @classmethod
    def from_public_bytes(cls, data: bytes) -> Any:
        """Fail as cryptography documents for an unsupported backend."""
        raise UnsupportedAlgorithm("ML-KEM-768 is not supported by this backend")


class AvailabilityTests(SynchronousTestCase):
    """Without native ML-KEM the KEM refuses to run, unless the test-only switch is on."""

    def without_native(self, allow_kyber: bool = False) -> None:
        """Make this test run as if cryptography had no ML-KEM."""
        self.patch(kem, "HAVE_NATIVE_MLKEM", False)
        environ: Dict[str, str] = {k: v for k, v in os.environ.items()
                                   if k != kem.ALLOW_KYBER_ENV}
        if allow_kyber:
            environ[kem.ALLOW_KYBER_ENV] = "1"
        self.patch(os, "environ", environ)

    def test_native_here(self) -> None:
        """This installation has native ML-KEM, so nothing needs the switch."""
        self.assertTrue(kem.HAVE_NATIVE_MLKEM)
        kem.check_available()
        self.assertTrue(kem.use_native())

    def test_refused_without_native(self) -> None:
        """Key expansion, encapsulation and the start-up check raise KEMUnavailableError."""
        self.without_native()
        self.assertRaises(KEMUnavailableError, kem.check_available)
        self.assertRaises(KEMUnavailableError, kem.SecretKey, SEED)
        self.assertRaises(KEMUnavailableError, kem.public_key_from_seed, SEED)
        self.assertRaises(KEMUnavailableError, kem.encapsulate, PUBLIC)
        self.assertRaises(KEMUnavailableError, kem.decapsulate, SEED, CIPHERTEXT)

    def test_message(self) -> None:
        """The error is one line naming the installed cryptography version and the switch."""
        self.without_native()
        import cryptography
        error = self.assertRaises(KEMUnavailableError, kem.check_available)
        text = str(error)
        self.assertNotIn("\n", text)
        self.assertIn(f"cryptography {cryptography.__version__}", text)
        self.assertIn("no native ML-KEM-768", text)
        self.assertIn(kem.ALLOW_KYBER_ENV, text)
        self.assertIsInstance(error, KEMError)

    def test_backend_description(self) -> None:
        """--version's ML-KEM part names the backend: native, the test-only kyber-py, or unavailable."""
        import cryptography
        self.assertEqual(kem.backend_description(), f"native (cryptography {cryptography.__version__})")
        self.without_native(allow_kyber=True)
        self.assertIn(f"kyber-py (not constant time; {kem.ALLOW_KYBER_ENV}=1, tests only)",
                      kem.backend_description())
        self.without_native()
        self.assertTrue(kem.backend_description().startswith("unavailable ("))
        self.assertIn("KEM keys are refused at start", kem.backend_description())

    def test_switch_must_be_one(self) -> None:
        """Only the value 1 turns the kyber-py fallback on."""
        self.without_native()
        for value in ("0", "yes", "", "true"):
            os.environ[kem.ALLOW_KYBER_ENV] = value
            self.assertFalse(kem.kyber_allowed())
            self.assertRaises(KEMUnavailableError, kem.SecretKey, SEED)

    def test_test_switch_uses_kyber(self) -> None:
        """With TIGERTUNNEL_ALLOW_KYBER_PY=1 the KEM runs on kyber-py and matches the vectors."""
        self.without_native(allow_kyber=True)
        secret = kem.SecretKey(SEED)
        self.assertEqual(secret.public_key, PUBLIC)
        self.assertEqual(secret.decapsulate(CIPHERTEXT), unhex(CASES[1]["decaps_shared_secret"]))
        ciphertext, shared = kem.encapsulate(PUBLIC)
        self.assertEqual(secret.decapsulate(ciphertext), shared)

    def test_explicit_arguments_still_work(self) -> None:
        """Vector tests' explicit kyber-py uses (randomness=, pure_python=) need no switch."""
        self.without_native()
        case = CASES[1]
        self.assertEqual(kem.encapsulate(PUBLIC, unhex(case["encaps_seed"])),
                         (CIPHERTEXT, unhex(case["shared_secret"])))
        self.assertEqual(kem.SecretKey(SEED, pure_python=True).public_key, PUBLIC)

    def test_unsupported_algorithm_converted(self) -> None:
        """A backend raising UnsupportedAlgorithm gives KEMUnavailableError, never the raw exception."""
        self.patch(kem, "MLKEM768PrivateKey", _UnsupportedMLKEM)
        self.patch(kem, "MLKEM768PublicKey", _UnsupportedMLKEM)
        self.assertRaises(KEMUnavailableError, kem.SecretKey, SEED)
        self.assertRaises(KEMUnavailableError, kem.encapsulate, PUBLIC)

    def test_start_up_refused(self) -> None:
        """A server or client configured with KEM keys fails to load them, naming the problem."""
        from tigertunnel.config.model import TunnelConfig
        from tigertunnel.keys.generate import kemgen, keygen
        from tigertunnel.ops.reload import ReloadError, load_keys
        directory = self.mktemp()
        os.mkdir(directory)
        psk = os.path.join(directory, "psk.key")
        prefix = os.path.join(directory, "kem")
        keygen(psk)
        kemgen(prefix)
        self.without_native()
        for role, path in (("server", prefix + ".key"), ("client", prefix + ".pub")):
            config = TunnelConfig(role, [], key_path=psk, kem_path=path)
            error = self.assertRaises(ReloadError, load_keys, config)
            self.assertIn("no native ML-KEM-768", str(error))
