"""MLKEM768-X25519 ("X-Wing") hybrid KEM, as the Zig reference uses it.

Implements docs/protocol.rst §5.  The secret key is a 32-byte seed ``sk``;
everything else is re-derived from it::

    E = SHAKE256(sk)[0:96]
    (ek_M, dk_M) = ML-KEM-768.KeyGen_internal(d=E[0:32], z=E[32:64])
    x_sk = E[64:96];  pk_X = X25519(x_sk, 9)
    public key (1216)  = ek_M (1184) || pk_X (32)
    ciphertext (1120)  = ct_M (1088) || ct_X (32)
    shared secret (32) = SHA3-256(ss_M || ss_X || ct_X || pk_X || "\\.//^\\")

Production code uses ``cryptography``'s native, constant-time ML-KEM-768
(``cryptography`` 48 or later, on a backend that has ML-KEM). kyber-py (pure
Python, *not* constant time, so its timing may leak the secret key) is used
only when asked for explicitly:

* ``randomness=`` in :func:`encapsulate` (deterministic encapsulation, how
  the reference vectors were made) and ``pure_python=True`` in
  :class:`SecretKey` (cross-checks), both for tests;
* the environment variable ``TIGERTUNNEL_ALLOW_KYBER_PY=1``
  (:data:`ALLOW_KYBER_ENV`), **for tests only**: without native ML-KEM it
  lets the KEM run on kyber-py instead of refusing.

Otherwise a KEM operation without native ML-KEM raises
:class:`tigertunnel.errors.KEMUnavailableError` (a :class:`~tigertunnel.errors.KEMError`) with a
message saying what to install. Both tunnel ends call :func:`check_available`
when their options name a KEM key file (``tigertunnel/tap.py``), so a tunnel
end configured with a KEM key refuses to start, with one line, instead of
failing every handshake. ``cryptography``'s
``UnsupportedAlgorithm`` never escapes this module.

Every other failure (a wrong length, an invalid ML-KEM public key, an
all-zero X25519 shared secret) raises :class:`tigertunnel.errors.KEMError`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import cryptography
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from tigertunnel.errors import KEMError, KEMUnavailableError

try:
    from cryptography.hazmat.primitives.asymmetric.mlkem import (
        MLKEM768PrivateKey,
        MLKEM768PublicKey,
    )
    _MLKEM_IMPORTED = True
except ImportError:  # pragma: no cover - depends on the installed cryptography
    _MLKEM_IMPORTED = False

#: Set to ``1`` to let the KEM fall back to kyber-py (tests only).
ALLOW_KYBER_ENV = "TIGERTUNNEL_ALLOW_KYBER_PY"


def _probe_native() -> bool:
    """Tell whether ``cryptography`` can really run ML-KEM-768 here.

    The module may import while its backend lacks the algorithm; that shows
    as ``UnsupportedAlgorithm`` on first use.
    """
    if not _MLKEM_IMPORTED:
        return False  # pragma: no cover - depends on the installed cryptography
    try:
        MLKEM768PrivateKey.from_seed_bytes(bytes(64))
    except UnsupportedAlgorithm:  # pragma: no cover - depends on the backend
        return False
    return True


#: ``cryptography`` offers a working native ML-KEM-768.
HAVE_NATIVE_MLKEM = _probe_native()

# Sizes from docs/protocol.rst §§1 and 5.
#: Bytes of an X-Wing public key.
PUBLIC_KEY_SIZE = 1216
#: Bytes of an X-Wing secret key (the seed everything is derived from).
SECRET_KEY_SIZE = 32
CIPHERTEXT_SIZE = 1120
SHARED_SECRET_SIZE = 32
ENCAPS_SEED_SIZE = 64

MLKEM_PUBLIC_KEY_SIZE = 1184
MLKEM_CIPHERTEXT_SIZE = 1088
X25519_SIZE = 32

# The X-Wing combiner label: the six bytes 5c 2e 2f 2f 5e 5c.
XWING_LABEL = b"\\.//^\\"


def _kyber() -> Any:
    """Return kyber-py's ML-KEM-768 object, imported on first use.

    :raises KEMError: kyber-py is not installed.
    """
    try:
        from kyber_py.ml_kem import ML_KEM_768
    except ImportError as e:  # pragma: no cover - kyber-py is a dependency
        raise KEMError("kyber-py is required for this ML-KEM operation") from e
    return ML_KEM_768


def kyber_allowed() -> bool:
    """Tell whether the test-only kyber-py fallback is switched on (:data:`ALLOW_KYBER_ENV`)."""
    return os.environ.get(ALLOW_KYBER_ENV) == "1"


def _unavailable() -> KEMUnavailableError:
    return KEMUnavailableError(
        f"KEM is configured but the installed cryptography {cryptography.__version__} "
        f"has no native ML-KEM-768; install cryptography 48 or later (with a "
        f"backend that has ML-KEM), or run without --kempublic/--kemsecret "
        f"(the pure-Python kyber-py is not constant time and is only used with "
        f"{ALLOW_KYBER_ENV}=1, for tests)")


def use_native() -> bool:
    """Decide how ML-KEM runs for an operation that was not forced to kyber-py.

    :returns: ``True`` for native ML-KEM, ``False`` for the test-only
        kyber-py fallback.
    :raises KEMUnavailableError: no native ML-KEM and no fallback allowed.
    """
    if HAVE_NATIVE_MLKEM:
        return True
    if kyber_allowed():
        return False
    raise _unavailable()


def check_available() -> None:
    """Raise unless a KEM operation could run here (call it where KEM is configured).

    :raises KEMUnavailableError: no native ML-KEM and no fallback allowed.
    """
    use_native()


def backend_description() -> str:
    """How ML-KEM-768 runs here, for ``--version``: ``native (cryptography X)``,
    ``kyber-py (tests only, ...)`` or ``unavailable (...)``."""
    if HAVE_NATIVE_MLKEM:
        return f"native (cryptography {cryptography.__version__})"
    if kyber_allowed():
        return f"kyber-py (not constant time; {ALLOW_KYBER_ENV}=1, tests only)"
    return (f"unavailable (cryptography {cryptography.__version__} has no native "
            f"ML-KEM-768: KEM keys are refused at start)")


def _check_length(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise KEMError(f"{name} must be {size} bytes, got {len(value)}")


def _x25519(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 agreement; an all-zero result (low-order point) is an error."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise KEMError("X25519 shared secret is all zero") from e
    if shared == bytes(X25519_SIZE):  # cryptography already refuses; be sure
        raise KEMError("X25519 shared secret is all zero")
    return shared


def _combine(ss_m: bytes, ss_x: bytes, ct_x: bytes, pk_x: bytes) -> bytes:
    return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest()


def expand_seed(seed: bytes) -> bytes:
    """Return the 96-byte SHAKE256 expansion of a secret-key seed.

    Bytes 0..64 are the ML-KEM-768 seed ``d || z``, bytes 64..96 the X25519
    private scalar.

    :raises KEMError: the seed is not 32 bytes.
    """
    _check_length("X-Wing secret key", seed, SECRET_KEY_SIZE)
    return hashlib.shake_256(bytes(seed)).digest(96)


class SecretKey:
    """An expanded X-Wing secret key, ready to decapsulate.

    Expanding the seed costs an ML-KEM key generation, so build one object per
    key and reuse it.  The seed itself is not kept.

    :ivar public_key: the 1216-byte public key.
    """

    __slots__ = ("public_key", "_pk_x", "_x_private", "_native", "_kyber_dk")

    def __init__(self, seed: bytes, *, pure_python: bool = False) -> None:
        """Expand ``seed``.

        :param seed: the 32-byte secret key (the seed kemgen writes).
        :param pure_python: use kyber-py for ML-KEM even if the native
            implementation is available (for cross-checking in tests).
        :raises KEMError: the seed is not 32 bytes.
        :raises KEMUnavailableError: no native ML-KEM (see the module
            docstring).
        """
        expanded = expand_seed(seed)
        self._x_private = X25519PrivateKey.from_private_bytes(expanded[64:96])
        self._pk_x = self._x_private.public_key().public_bytes_raw()
        self._native: Any = None
        self._kyber_dk: bytes | None = None
        if not pure_python and use_native():
            try:
                self._native = MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
                ek = self._native.public_key().public_bytes_raw()
            except UnsupportedAlgorithm:
                raise _unavailable() from None
        else:
            ek, self._kyber_dk = _kyber().key_derive(expanded[:64])
        self.public_key: bytes = ek + self._pk_x

    def __repr__(self) -> str:
        return f"<SecretKey public_key={self.public_key[:8].hex()}...>"

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """Recover the 32-byte shared secret from a 1120-byte ciphertext.

        ML-KEM uses implicit rejection, so a tampered ML-KEM part yields a
        different secret rather than an error.

        :raises KEMError: wrong ciphertext length, or the X25519 part gives
            an all-zero shared secret.
        """
        _check_length("X-Wing ciphertext", ciphertext, CIPHERTEXT_SIZE)
        ct = bytes(ciphertext)
        ct_m, ct_x = ct[:MLKEM_CIPHERTEXT_SIZE], ct[MLKEM_CIPHERTEXT_SIZE:]
        try:
            if self._native is not None:
                ss_m = self._native.decapsulate(ct_m)
            else:
                ss_m = _kyber().decaps(self._kyber_dk, ct_m)
        except ValueError as e:
            raise KEMError("ML-KEM-768 decapsulation failed") from e
        except UnsupportedAlgorithm:  # pragma: no cover - the key was made natively
            raise _unavailable() from None
        ss_x = _x25519(self._x_private, ct_x)
        return _combine(ss_m, ss_x, ct_x, self._pk_x)


def public_key_from_seed(seed: bytes) -> bytes:
    """Return the 1216-byte public key of a 32-byte secret-key seed.

    :raises KEMError: the seed is not 32 bytes.
    :raises KEMUnavailableError: no native ML-KEM.
    """
    return SecretKey(seed).public_key


def encapsulate(public_key: bytes,
                randomness: bytes | None = None) -> tuple[bytes, bytes]:
    """Encapsulate a fresh shared secret to ``public_key``.

    :param public_key: the server's 1216-byte X-Wing public key.
    :param randomness: ``None`` in production (native ML-KEM and a fresh
        X25519 ephemeral key); 64 bytes to be deterministic (``m`` =
        bytes 0..32, X25519 ephemeral scalar = bytes 32..64), which is how
        the reference vectors were made.
    :return: ``(ciphertext, shared_secret)``, 1120 and 32 bytes.
    :raises KEMError: bad lengths, an invalid ML-KEM public key, or an
        all-zero X25519 shared secret (low-order public key).
    :raises KEMUnavailableError: ``randomness`` is ``None`` and there is
        no native ML-KEM (see the module docstring).
    """
    _check_length("X-Wing public key", public_key, PUBLIC_KEY_SIZE)
    pk = bytes(public_key)
    ek_m, pk_x = pk[:MLKEM_PUBLIC_KEY_SIZE], pk[MLKEM_PUBLIC_KEY_SIZE:]
    try:
        if randomness is None:
            if use_native():
                ss_m, ct_m = MLKEM768PublicKey.from_public_bytes(ek_m).encapsulate()
            else:
                ss_m, ct_m = _kyber().encaps(ek_m)
            ephemeral = X25519PrivateKey.generate()
        else:
            _check_length("encapsulation randomness", randomness, ENCAPS_SEED_SIZE)
            r = bytes(randomness)
            ss_m, ct_m = _kyber()._encaps_internal(ek_m, r[:32])
            ephemeral = X25519PrivateKey.from_private_bytes(r[32:])
    except ValueError as e:
        raise KEMError("invalid ML-KEM-768 public key") from e
    except UnsupportedAlgorithm:
        raise _unavailable() from None
    ct_x = ephemeral.public_key().public_bytes_raw()
    ss_x = _x25519(ephemeral, pk_x)
    return ct_m + ct_x, _combine(ss_m, ss_x, ct_x, pk_x)


def decapsulate(seed: bytes, ciphertext: bytes) -> bytes:
    """Expand ``seed`` and decapsulate ``ciphertext`` (convenience).

    Servers should keep a :class:`SecretKey` instead of calling this per
    handshake.

    :return: the 32-byte shared secret.
    :raises KEMError: as :meth:`SecretKey.decapsulate`, or a bad seed length.
    """
    return SecretKey(seed).decapsulate(ciphertext)
