"""Tests for tigertunnel.crypto.kdf: session keys and handshake hashes."""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import load_vectors, unhex
from tigertunnel.crypto.kdf import (
    SessionKeys,
    connect_hello_hash,
    derive_session_keys,
    kemconnect_hello_hash,
    server_auth_hash,
)

KDF = load_vectors("kdf")
HELLO = load_vectors("hello")

PSK = bytes(range(32))
CR = bytes(range(0xA0, 0xB0))
SR = bytes(range(0xB0, 0xC0))


def expected_keys(case: dict) -> SessionKeys:
    return SessionKeys(
        c2s_key=unhex(case["c2s_key"]), c2s_nonce=unhex(case["c2s_nonce"]),
        s2c_key=unhex(case["s2c_key"]), s2c_nonce=unhex(case["s2c_nonce"]))


class DeriveSessionKeysTests(SynchronousTestCase):
    """HKDF-SHA256 session key derivation (PROTOCOL.md section 4)."""

    def test_psk_vectors(self) -> None:
        """Every PSK-mode case of kdf.json is reproduced exactly."""
        self.assertEqual(len(KDF["psk_cases"]), 3)
        for case in KDF["psk_cases"]:
            keys = derive_session_keys(unhex(case["psk"]), unhex(case["client_random"]),
                                       unhex(case["server_random"]))
            self.assertEqual(keys, expected_keys(case))

    def test_kem_vectors(self) -> None:
        """Every KEM-mode case of kdf.json is reproduced exactly."""
        self.assertEqual(len(KDF["kem_cases"]), 2)
        for case in KDF["kem_cases"]:
            keys = derive_session_keys(unhex(case["psk"]), unhex(case["client_random"]),
                                       unhex(case["server_random"]),
                                       unhex(case["kem_shared_secret"]))
            self.assertEqual(keys, expected_keys(case))

    def test_all_outputs_are_16_bytes(self) -> None:
        """Each of the four session values is 16 bytes long."""
        keys = derive_session_keys(PSK, CR, SR, bytes(32))
        for value in (keys.c2s_key, keys.c2s_nonce, keys.s2c_key, keys.s2c_nonce):
            self.assertEqual(len(value), 16)

    def test_repr_hides_keys(self) -> None:
        """The repr of SessionKeys shows none of the key or nonce bytes."""
        keys = derive_session_keys(PSK, CR, SR)
        text = repr(keys) + str(keys)
        for value in (keys.c2s_key, keys.c2s_nonce, keys.s2c_key, keys.s2c_nonce):
            self.assertNotIn(value.hex(), text)
            self.assertNotIn(repr(value), text)

    def test_bad_lengths(self) -> None:
        """Inputs of the wrong length raise ValueError instead of deriving keys."""
        for args in [(PSK[:31], CR, SR, None), (PSK, CR + b"x", SR, None),
                     (PSK, CR, SR[:15], None), (PSK, CR, SR, bytes(31))]:
            self.assertRaises(ValueError, derive_session_keys, *args)

    @given(st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16),
           st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32))
    def test_kem_secret_changes_keys(self, psk: bytes, cr: bytes, sr: bytes,
                                     ss: bytes) -> None:
        """KEM-mode keys differ from PSK-mode keys for the same PSK and randoms."""
        psk_keys = derive_session_keys(psk, cr, sr)
        kem_keys = derive_session_keys(psk, cr, sr, ss)
        self.assertNotEqual(psk_keys.c2s_key, kem_keys.c2s_key)
        self.assertNotEqual(psk_keys.s2c_key, kem_keys.s2c_key)

    @given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16))
    def test_directions_differ(self, cr: bytes, sr: bytes) -> None:
        """The client-to-server and server-to-client keys and nonces differ."""
        keys = derive_session_keys(PSK, cr, sr)
        self.assertNotEqual(keys.c2s_key, keys.s2c_key)
        self.assertNotEqual(keys.c2s_nonce, keys.s2c_nonce)


class HelloHashTests(SynchronousTestCase):
    """ClientHello and ServerHello hashes (PROTOCOL.md section 3)."""

    def test_connect_hash_vector(self) -> None:
        """The connect ClientHello hash of hello.json is reproduced."""
        v = HELLO["connect_hash"]
        digest = connect_hello_hash(v["version"], v["operation"], int(v["key_id"]),
                                    unhex(v["client_random"]), int(v["timestamp"]),
                                    unhex(v["psk"]))
        self.assertEqual(digest, unhex(v["hash"]))

    def test_kemconnect_hash_vector(self) -> None:
        """The kemconnect ClientHello hash of hello.json is reproduced."""
        v = HELLO["kemconnect_hash"]
        digest = kemconnect_hello_hash(v["version"], v["operation"], int(v["key_id"]),
                                       int(v["kem_key_id"]), unhex(v["client_random"]),
                                       int(v["timestamp"]), unhex(v["psk"]))
        self.assertEqual(digest, unhex(v["hash"]))

    def test_server_auth_hash_vectors(self) -> None:
        """All three server auth hash cases (cluster 0, 12345, a large id) match."""
        self.assertEqual(len(HELLO["server_auth_hash"]), 3)
        for v in HELLO["server_auth_hash"]:
            digest = server_auth_hash(unhex(v["psk"]), unhex(v["client_random"]),
                                      unhex(v["server_random"]), int(v["cluster_id"]))
            self.assertEqual(digest, unhex(v["hash"]))

    def test_version_is_hashed(self) -> None:
        """Changing only the version byte changes the ClientHello hash."""
        self.assertNotEqual(connect_hello_hash(1, 0, 5, CR, 1000, PSK),
                            connect_hello_hash(2, 0, 5, CR, 1000, PSK))

    def test_out_of_range_integers(self) -> None:
        """Integers that do not fit their wire width raise ValueError."""
        self.assertRaises(ValueError, connect_hello_hash, 256, 0, 1, CR, 1, PSK)
        self.assertRaises(ValueError, connect_hello_hash, 1, 0, 1 << 64, CR, 1, PSK)
        self.assertRaises(ValueError, connect_hello_hash, 1, 0, 1, CR, -1, PSK)
        self.assertRaises(ValueError, kemconnect_hello_hash, 1, 1, 1, 1 << 64, CR, 1, PSK)
        self.assertRaises(ValueError, server_auth_hash, PSK, CR, SR, 1 << 128)
        self.assertRaises(ValueError, server_auth_hash, PSK, CR, SR, -1)

    def test_bad_lengths(self) -> None:
        """Byte strings of the wrong length raise ValueError."""
        self.assertRaises(ValueError, connect_hello_hash, 1, 0, 1, CR[:15], 1, PSK)
        self.assertRaises(ValueError, kemconnect_hello_hash, 1, 1, 1, 2, CR, 1, PSK + b"x")
        self.assertRaises(ValueError, server_auth_hash, PSK, CR, SR + b"x", 0)
