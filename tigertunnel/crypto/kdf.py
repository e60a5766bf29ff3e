"""Handshake hashes and session key derivation.

Implements the hashes of docs/protocol.rst §3 (ClientHello hash for
``connect`` and ``kemconnect``, the ServerHello auth hash) and the HKDF-SHA256
session key derivation of section 4::

    PRK = HMAC-SHA256(salt, psk)                    # salt "tigertunnel-v1-psk"
    PRK = HMAC-SHA256(salt, psk || kem_secret)      # salt "tigertunnel-v1-kem"
    out(label) = HMAC-SHA256(PRK, client_random || server_random || label || 01)[:16]

All integers are little-endian (section 1).  Only :mod:`hmac` and
:mod:`hashlib` are used.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

#: Bytes of a PSK.
PSK_SIZE = 32
RANDOM_SIZE = 16
KEY_SIZE = 16
KEM_SHARED_SECRET_SIZE = 32

# Context strings from docs/protocol.rst §1 (ASCII, no terminator).
PSK_HELLO_CONTEXT = b"tigertunnel-psk-hello-v1"
KEM_HELLO_CONTEXT = b"tigertunnel-kem-hello-v1"
PSK_SALT = b"tigertunnel-v1-psk"
KEM_SALT = b"tigertunnel-v1-kem"


@dataclass(frozen=True)
class SessionKeys:
    """The per-pool-connection keys and base nonces (16 bytes each).

    ``c2s_*`` protect what the client sends, ``s2c_*`` what the server sends.
    """

    c2s_key: bytes
    c2s_nonce: bytes
    s2c_key: bytes
    s2c_nonce: bytes

    def __repr__(self) -> str:
        return "SessionKeys(<secret>)"


def _check_size(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def _le(name: str, value: int, size: int) -> bytes:
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"{name} does not fit in {8 * size} unsigned bits")
    return value.to_bytes(size, "little")


def _byte(name: str, value: int) -> bytes:
    return _le(name, value, 1)


def derive_session_keys(psk: bytes, client_random: bytes, server_random: bytes,
                        kem_shared_secret: bytes | None = None) -> SessionKeys:
    """Derive the session keys of one pool connection (section 4).

    :param kem_shared_secret: the 32-byte X-Wing shared secret in
        ``kemconnect`` mode, ``None`` in ``connect`` (PSK-only) mode.
    :raises ValueError: an input has the wrong length.
    """
    _check_size("psk", psk, PSK_SIZE)
    _check_size("client_random", client_random, RANDOM_SIZE)
    _check_size("server_random", server_random, RANDOM_SIZE)
    if kem_shared_secret is None:
        prk = hmac.digest(PSK_SALT, psk, "sha256")
    else:
        _check_size("kem_shared_secret", kem_shared_secret, KEM_SHARED_SECRET_SIZE)
        prk = hmac.digest(KEM_SALT, bytes(psk) + kem_shared_secret, "sha256")
    prefix = bytes(client_random) + server_random

    def expand(label: bytes) -> bytes:
        return hmac.digest(prk, prefix + label + b"\x01", "sha256")[:KEY_SIZE]

    return SessionKeys(
        c2s_key=expand(b"c2s_key"),
        c2s_nonce=expand(b"c2s_nonce"),
        s2c_key=expand(b"s2c_key"),
        s2c_nonce=expand(b"s2c_nonce"),
    )


def connect_hello_hash(version: int, operation: int, key_id: int,
                       client_random: bytes, timestamp: int, psk: bytes) -> bytes:
    """Return the 32-byte hash of a ``connect`` ClientHello (section 3.1).

    :raises ValueError: an integer is out of range or a byte string has the
        wrong length.
    """
    _check_size("client_random", client_random, RANDOM_SIZE)
    _check_size("psk", psk, PSK_SIZE)
    return hashlib.sha256(
        PSK_HELLO_CONTEXT
        + _byte("version", version) + _byte("operation", operation)
        + _le("key_id", key_id, 8) + client_random
        + _le("timestamp", timestamp, 8) + psk
    ).digest()


def kemconnect_hello_hash(version: int, operation: int, key_id: int,
                          kem_key_id: int, client_random: bytes,
                          timestamp: int, psk: bytes) -> bytes:
    """Return the 32-byte hash of a ``kemconnect`` ClientHello (section 3.2).

    The KEM ciphertext is not covered (the reference does not hash it).

    :raises ValueError: an integer is out of range or a byte string has the
        wrong length.
    """
    _check_size("client_random", client_random, RANDOM_SIZE)
    _check_size("psk", psk, PSK_SIZE)
    return hashlib.sha256(
        KEM_HELLO_CONTEXT
        + _byte("version", version) + _byte("operation", operation)
        + _le("key_id", key_id, 8) + _le("kem_key_id", kem_key_id, 8)
        + client_random + _le("timestamp", timestamp, 8) + psk
    ).digest()


def server_auth_hash(psk: bytes, client_random: bytes, server_random: bytes,
                     cluster_id: int) -> bytes:
    """Return the 32-byte ServerHello auth hash (section 3.4).

    :param cluster_id: the configured ``-c`` value, 0 when none.
    :raises ValueError: the cluster id is not a u128 or a byte string has the
        wrong length.
    """
    _check_size("psk", psk, PSK_SIZE)
    _check_size("client_random", client_random, RANDOM_SIZE)
    _check_size("server_random", server_random, RANDOM_SIZE)
    return hashlib.sha256(
        bytes(psk) + client_random + server_random + _le("cluster_id", cluster_id, 16)
    ).digest()


#: Context of :func:`key_fingerprint` (ours; never on the wire).
FINGERPRINT_CONTEXT = b"tigertunnel-key-fingerprint-v1"
#: Separates :func:`public_key_fingerprint` from :func:`key_fingerprint`.
PUBLIC_FINGERPRINT_CONTEXT = b"tigertunnel-public-key-fingerprint-v1"
FINGERPRINT_SIZE = 16


def key_fingerprint(psk: bytes) -> bytes:
    """Return a 16-byte fingerprint of a PSK: which key bytes a pool
    connection was made with, without keeping a copy of them.

    SHA-256 of a fixed context and the key, truncated; it reveals nothing
    usable about a 256-bit random key. Compare fingerprints with
    :func:`hmac.compare_digest`.

    :raises ValueError: the PSK has the wrong length.
    """
    _check_size("psk", psk, PSK_SIZE)
    return hashlib.sha256(FINGERPRINT_CONTEXT + bytes(psk)).digest()[:FINGERPRINT_SIZE]


def public_key_fingerprint(public_key: bytes) -> bytes:
    """Return a 16-byte fingerprint of a public key (a tunnel client's KEM
    public key): which key a pool connection was made with, for key reload.

    :func:`key_fingerprint`'s hash under its own context, of a key of any
    length. Compare fingerprints with :func:`hmac.compare_digest`.
    """
    return hashlib.sha256(PUBLIC_FINGERPRINT_CONTEXT
                          + bytes(public_key)).digest()[:FINGERPRINT_SIZE]
