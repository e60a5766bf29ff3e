"""The live keys of a tunnel end: one frozen :class:`KeyRing`.

A tunnel end reads its key files at start-up and again on every reload
(SIGHUP). What it read is a :class:`KeyRing`, never changed afterwards: a
reload builds a new ring, checks it (:meth:`KeyRing.check`) and, only if
every file is good, the multiplexers of the tunnel end take the new ring in
one step. The settings (:class:`~tigertunnel.config.model.TunnelConfig`)
name the key files; the ring holds what is in them.
"""

import hmac
from dataclasses import dataclass
from typing import List, Optional, Tuple

from tigertunnel.crypto import kdf, kem
from tigertunnel.errors import KEMError
from tigertunnel.keys.format import KeyStore
from tigertunnel.crypto.layout import MAX_U64


@dataclass(frozen=True)
class KeyUse:
    """Which keys a pool connection's handshake used (never the keys).

    Both ends make one from the handshake's outcome
    (:attr:`~tigertunnel.wire.handshake.Established.key_use`); a key reload compares it with the new
    :class:`KeyRing` to retire connections keyed
    with a key that is gone or whose bytes changed.

    :ivar psk_id: the PSK key id.
    :ivar psk_fingerprint: :func:`~tigertunnel.crypto.kdf.key_fingerprint`
        of the PSK bytes (empty: unknown, counts as current).
    :ivar kem_id: the KEM key id in ``kemconnect`` mode, else ``None``.
    :ivar kem_fingerprint: the KEM key's fingerprint: of the secret seed a
        server used (:func:`~tigertunnel.crypto.kdf.key_fingerprint`), of
        the public key a client used
        (:func:`~tigertunnel.crypto.kdf.public_key_fingerprint`); ``None``
        when not known.
    """

    psk_id: int
    psk_fingerprint: bytes = b""
    kem_id: int | None = None
    kem_fingerprint: bytes | None = None


@dataclass(frozen=True)
class KeyRing:
    """The key material of one tunnel end, as read from its key files.

    :ivar psk: the PSK key file's keys (``None``: plaintext mode).
    :ivar kem_public: a client's ``(kem key id, X-Wing public key)``.
    :ivar kem_secret: a server's X-Wing secret keys (seeds) by key id.
    """

    psk: Optional[KeyStore] = None
    kem_public: Optional[Tuple[int, bytes]] = None
    kem_secret: Optional[KeyStore] = None

    def check(self) -> None:
        """Check the key material itself, as the handshakes will use it:
        key ids are u64, PSKs are :data:`~tigertunnel.crypto.kdf.PSK_SIZE`
        bytes, a KEM public key has the X-Wing size and a KEM secret key is
        a seed X-Wing expands.

        :raises ValueError: naming the key id and what is wrong (never key
            bytes).
        """
        problems: List[str] = []
        if self.psk is not None:
            if not self.psk:
                problems.append("no PSK")
            for key_id, key in self.psk.items():
                if not 0 <= key_id <= MAX_U64:
                    problems.append(f"PSK key id {key_id} is not a u64")
                if len(key) != kdf.PSK_SIZE:
                    problems.append(f"PSK key id {key_id} is not {kdf.PSK_SIZE} bytes")
        if self.kem_public is not None:
            key_id, public = self.kem_public
            if not 0 <= key_id <= MAX_U64:
                problems.append(f"KEM key id {key_id} is not a u64")
            if len(public) != kem.PUBLIC_KEY_SIZE:
                problems.append(f"KEM public key id {key_id} is not "
                                f"{kem.PUBLIC_KEY_SIZE} bytes")
        if self.kem_secret is not None:
            for key_id, seed in self.kem_secret.items():
                if not 0 <= key_id <= MAX_U64:
                    problems.append(f"KEM key id {key_id} is not a u64")
                try:
                    kem.SecretKey(seed)
                except (KEMError, ValueError) as e:
                    problems.append(f"KEM secret key id {key_id}: {e}")
        if problems:
            raise ValueError("; ".join(problems))

    def describe(self, client: bool) -> str:
        """A one-line summary of key ids for logs (never key material).

        :param client: a client names the one PSK it uses.
        """
        if self.psk is None:
            return "plaintext (no keys)"
        ids = self.psk.ids()
        text = (f"psk key id {ids[0]} (of {len(ids)})" if client
                else f"psk key ids {ids}")
        if self.kem_public is not None:
            text += f", kem public key id {self.kem_public[0]}"
        if self.kem_secret is not None:
            text += f", kem key ids {self.kem_secret.ids()}"
        return text

    def client_current(self, use: KeyUse) -> bool:
        """Whether a tunnel client's pool connection keyed with ``use`` uses
        the current keys: the first PSK (same id and bytes) and the current
        KEM public key (or none, if none is configured). Plaintext: always.
        """
        if self.psk is None:
            return True
        key_id, key = self.psk.first()
        if use.psk_id != key_id or not _same(use.psk_fingerprint, kdf.key_fingerprint(key)):
            return False
        if self.kem_public is None:
            return use.kem_id is None
        kem_id, public = self.kem_public
        return use.kem_id == kem_id and _same(use.kem_fingerprint,
                                              kdf.public_key_fingerprint(public))

    def server_accepts(self, use: KeyUse) -> bool:
        """Whether a tunnel server still accepts a pool connection keyed with
        ``use``: its PSK id is in the file with the same bytes, and its KEM
        key id (if any) too. Plaintext: always."""
        if self.psk is None:
            return True
        if use.psk_id not in self.psk or not _same(use.psk_fingerprint,
                                                   kdf.key_fingerprint(self.psk[use.psk_id])):
            return False
        if use.kem_id is None:
            return True
        if self.kem_secret is None or use.kem_id not in self.kem_secret:
            return False
        return _same(use.kem_fingerprint, kdf.key_fingerprint(self.kem_secret[use.kem_id]))


def _same(used: Optional[bytes], fingerprint: bytes) -> bool:
    """Whether a recorded fingerprint matches (an unrecorded one counts as
    matching: only a known difference retires a connection)."""
    return not used or hmac.compare_digest(used, fingerprint)
