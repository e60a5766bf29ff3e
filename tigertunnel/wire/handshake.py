"""The pool-connection handshake as a sans-IO state machine.

Implements docs/protocol.rst §3 (messages, checks, status codes) and uses the
key derivation of section 4 and the X-Wing KEM of section 5.  Nothing here
touches a socket, the reactor, the clock or the random source directly: bytes
go in through ``feed()``, bytes to send and events come out, and time and
randomness are injected.

Narrative, once per pool connection (only in encrypted mode, ``-k``):

1. Right after the TCP connect the **client** sends a ClientHello:

   * ``connect`` (operation 0, 66 bytes): version, operation, LE64 key_id,
     client_random(16), LE64 timestamp (whole Unix seconds), and
     SHA-256("tigertunnel-psk-hello-v1" || those fields || psk);
   * ``kemconnect`` (operation 1, 1194 bytes): the same plus LE64 kem_key_id
     before client_random, hashed under "tigertunnel-kem-hello-v1", followed
     by a 1120-byte X-Wing ciphertext encapsulated to the server's KEM public
     key (not covered by the hash).

2. The **server** reads 2 bytes; an operation other than 0 or 1 closes the
   connection with no reply.  With the rest it checks, in this order: the
   key_id is known (else status 1, ``unknown_key``), the hash verifies in
   constant time (else 4, ``client_auth_failed``), the timestamp is within
   3600 s of its clock, bounds included (else 5, ``timestamp_invalid``),
   and for ``kemconnect`` that it has a KEM secret key with that kem_key_id
   (else 3, ``unknown_kem_key``) and that decapsulation works (else 2,
   ``server_error``).  A failure is answered with the single status byte and
   the connection is closed.

3. On success the server answers a 49-byte ServerHello: status 0,
   server_random(16), SHA-256(psk || client_random || server_random ||
   LE128(cluster_id)).  The client rejects a status other than 0 and an auth
   hash that does not match its own cluster id (``-c``, 0 when unset).

4. Both sides derive :class:`~tigertunnel.crypto.kdf.SessionKeys` from the
   PSK, both randoms and (``kemconnect``) the KEM shared secret, and switch
   to mux frames (section 7).

Our extensions, all invisible to a reference peer:

* The version byte.  The reference sends 1 and never checks it (it is only
  hashed).  Our client sends :data:`~tigertunnel.wire.handshake.EXTENDED_VERSION` (2) by
  default, which a
  reference server accepts; our server accepts any version and reports it as
  :attr:`Established.peer_version`, so the layers above can tell one of our
  clients (2) from a reference client (1) and only use behaviour a reference
  peer would not understand with the former.  A client cannot learn the
  server's version (the ServerHello has none): its ``peer_version`` is the
  version it sent.
* Pipelined bytes.  The reference drops whatever arrives after a hello in
  the same read; we hand it back as :attr:`Established.leftover` for the mux
  decoder.
* ``require_kem``: a server may refuse PSK-only (``connect``) hellos, with
  status 4, once their hash has verified.
* Hardening (docs/protocol.rst §11, items 1, 6 and 7): ``versions``
  restricts the version byte (our server accepts 1 and 2 only, and closes
  anything else, such as an HTTP request or a TLS ClientHello, at its first
  byte); with a :class:`ReplayCache` the server refuses a byte-identical
  ClientHello seen before inside the timestamp window (status 4), and any
  hello the cache cannot record (full, or an I/O error: status 2); with
  ``hide_unknown_key`` an unknown key id gets the same status (4) as a bad
  hash, so a stranger cannot learn which key ids exist. The reference
  client treats every failure status alike, so both stay compatible.
"""

from __future__ import annotations

import enum
import functools
import hmac
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from tigertunnel.crypto import kdf, kem
from tigertunnel.crypto.kdf import SessionKeys
from tigertunnel.errors import HandshakeError, KEMError
from tigertunnel.keys.ring import KeyUse
from tigertunnel.crypto.layout import MAX_U64
from tigertunnel.wire.replaywindow import (
    DEFAULT_BUCKETS,
    DEFAULT_SLOTS,
    MemoryBuckets,
    ReplayTable,
    Verdict,
)

# Wire facts, docs/protocol.rst §§1 and 3.
PROTOCOL_VERSION = 1
#: The version byte of a ClientHello from one of our clients (version 2).
EXTENDED_VERSION = 2
OP_CONNECT = 0
OP_KEMCONNECT = 1
CONNECT_HELLO_SIZE = 66
KEMCONNECT_HELLO_SIZE = 1194
SERVER_HELLO_SIZE = 49
#: Seconds a ClientHello's timestamp may be off, either way.
TIMESTAMP_TOLERANCE = 3600

_RANDOM_SIZE = kdf.RANDOM_SIZE
_HASH_SIZE = 32
_KEM_CIPHERTEXT_OFFSET = 74


class Status(enum.IntEnum):
    """ServerHello status codes (docs/protocol.rst §3.4)."""

    OK = 0
    UNKNOWN_KEY = 1
    SERVER_ERROR = 2
    UNKNOWN_KEM_KEY = 3
    CLIENT_AUTH_FAILED = 4
    TIMESTAMP_INVALID = 5


@dataclass(frozen=True)
class Established:
    """The handshake succeeded; the pool connection switches to mux frames.

    :ivar mode: ``"connect"`` or ``"kemconnect"``.
    :ivar peer_version: the ClientHello version byte (see module docstring).
    :ivar kem_key_id: the KEM key id in ``kemconnect`` mode, else ``None``.
    :ivar leftover: bytes that arrived after the hello, to feed to the mux
        decoder.
    :ivar key_fingerprint: :func:`~tigertunnel.crypto.kdf.key_fingerprint`
        of the PSK used (a key reload retires connections made with key
        bytes since replaced under the same key id).
    :ivar kem_fingerprint: in ``kemconnect`` mode, the fingerprint of the
        KEM secret key a tunnel server used or of the public key a tunnel
        client used (see :class:`~tigertunnel.keys.ring.KeyUse`), else ``None``.
    """

    keys: SessionKeys
    mode: str
    peer_version: int
    key_id: int
    kem_key_id: int | None
    leftover: bytes
    key_fingerprint: bytes = b""
    kem_fingerprint: bytes | None = None

    @property
    def key_use(self) -> KeyUse:
        """Which keys this handshake used."""
        return KeyUse(self.key_id, self.key_fingerprint, self.kem_key_id,
                      self.kem_fingerprint)


@dataclass(frozen=True)
class Accepted:
    """Server side: send ``reply`` (the ServerHello), then use ``established``."""

    reply: bytes
    established: Established


class RejectKind(enum.Enum):
    """Why the server rejected a ClientHello, as a value (metric label).

    The status byte cannot tell these apart (several share status 4, and
    some send no reply at all); :attr:`Rejected.reason` says the same for
    people.
    """

    BAD_VERSION = "bad_version"
    BAD_OPERATION = "bad_operation"
    UNKNOWN_KEY = "unknown_key"
    BAD_HASH = "bad_hash"
    TIMESTAMP = "timestamp"
    REPLAY = "replay"
    #: The replay cache had no room for the hello (it is full of unexpired ones).
    REPLAY_CACHE_FULL = "replay_cache_full"
    #: The replay cache could not record the hello (an I/O error).
    REPLAY_CACHE_ERROR = "replay_cache_error"
    KEM_REQUIRED = "kem_required"
    KEM = "kem"


@dataclass(frozen=True)
class Rejected:
    """Server side: send ``reply`` (one status byte, or nothing), then close.

    :ivar status: the status sent, ``None`` when no reply is sent.
    :ivar reason: a human-readable reason for the log.
    :ivar kind: why, as a value.
    :ivar skew: for timestamp rejections, client timestamp minus server time
        in seconds.
    """

    reply: bytes
    status: Status | None
    reason: str
    kind: RejectKind
    skew: int | None = None


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def build_connect_hello(version: int, key_id: int, psk: bytes,
                        client_random: bytes, timestamp: int) -> bytes:
    """Return the 66-byte ``connect`` ClientHello (section 3.1).

    :raises ValueError: a field is out of range or has the wrong length.
    """
    digest = kdf.connect_hello_hash(version, OP_CONNECT, key_id, client_random,
                                    timestamp, psk)
    return (bytes((version, OP_CONNECT)) + _u64(key_id) + client_random
            + _u64(timestamp) + digest)


def build_kemconnect_hello(version: int, key_id: int, psk: bytes,
                           kem_key_id: int, client_random: bytes,
                           timestamp: int, kem_ciphertext: bytes) -> bytes:
    """Return the 1194-byte ``kemconnect`` ClientHello (section 3.2).

    :raises ValueError: a field is out of range or has the wrong length.
    """
    if len(kem_ciphertext) != kem.CIPHERTEXT_SIZE:
        raise ValueError(f"KEM ciphertext must be {kem.CIPHERTEXT_SIZE} bytes")
    digest = kdf.kemconnect_hello_hash(version, OP_KEMCONNECT, key_id,
                                       kem_key_id, client_random, timestamp, psk)
    return (bytes((version, OP_KEMCONNECT)) + _u64(key_id) + _u64(kem_key_id)
            + client_random + _u64(timestamp) + digest + kem_ciphertext)


def build_server_hello(psk: bytes, client_random: bytes, server_random: bytes,
                       cluster_id: int) -> bytes:
    """Return the 49-byte successful ServerHello (section 3.4).

    :raises ValueError: a field is out of range or has the wrong length.
    """
    digest = kdf.server_auth_hash(psk, client_random, server_random, cluster_id)
    return bytes((Status.OK,)) + server_random + digest


def _random(random: Callable[[int], bytes]) -> bytes:
    value = random(_RANDOM_SIZE)
    if len(value) != _RANDOM_SIZE:
        raise HandshakeError("random source returned the wrong number of bytes")
    return bytes(value)


class _State(enum.Enum):
    NEW = "new"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"


class ClientHandshake:
    """The client half of the handshake for one pool connection.

    Call :meth:`start` once and send what it returns, then :meth:`feed` every
    byte received until it returns :class:`Established` or raises.
    """

    def __init__(self, key_id: int, psk: bytes, cluster_id: int = 0, *,
                 kem_public: tuple[int, bytes] | None = None,
                 version: int = EXTENDED_VERSION,
                 random: Callable[[int], bytes] = os.urandom,
                 now: Callable[[], float] = time.time,
                 encapsulate: Callable[[bytes], tuple[bytes, bytes]] = kem.encapsulate,
                 ) -> None:
        """
        :param key_id: the PSK key id (first key of the client's key file).
        :param cluster_id: the client's ``-c`` value, 0 when unset.
        :param kem_public: ``(kem_key_id, public_key)`` for ``kemconnect``,
            ``None`` for ``connect``.
        :param version: the version byte to send.
        :raises ValueError: a parameter is out of range or has a bad length.
        """
        if len(psk) != kdf.PSK_SIZE:
            raise ValueError(f"PSK must be {kdf.PSK_SIZE} bytes")
        if not 0 <= cluster_id < 1 << 128:
            raise ValueError("cluster id must be an unsigned 128-bit integer")
        if not 0 <= key_id <= MAX_U64:
            raise ValueError("key id must be an unsigned 64-bit integer")
        if not 0 <= version <= 255:
            raise ValueError("version must fit in one byte")
        if kem_public is not None:
            if not 0 <= kem_public[0] <= MAX_U64:
                raise ValueError("KEM key id must be an unsigned 64-bit integer")
            if len(kem_public[1]) != kem.PUBLIC_KEY_SIZE:
                raise ValueError(f"KEM public key must be {kem.PUBLIC_KEY_SIZE} bytes")
        self._key_id = key_id
        self._psk = bytes(psk)
        self._cluster_id = cluster_id
        self._kem_public = kem_public
        self._version = version
        self._random = random
        self._now = now
        self._encapsulate = encapsulate
        self._state = _State.NEW
        self._buffer = bytearray()
        self._client_random = b""
        self._kem_secret: bytes | None = None
        self._timestamp = 0

    def __repr__(self) -> str:
        return f"<ClientHandshake key_id={self._key_id} state={self._state.value}>"

    def start(self) -> bytes:
        """Draw client_random (then the KEM randomness) and return the ClientHello.

        :raises HandshakeError: called twice, or KEM encapsulation failed.
        """
        if self._state is not _State.NEW:
            raise HandshakeError("handshake already started")
        self._state = _State.FAILED  # until the hello is built
        self._client_random = _random(self._random)
        timestamp = max(0, min(int(self._now()), MAX_U64))
        self._timestamp = timestamp
        if self._kem_public is None:
            hello = build_connect_hello(self._version, self._key_id, self._psk,
                                        self._client_random, timestamp)
        else:
            kem_key_id, public_key = self._kem_public
            try:
                ciphertext, secret = self._encapsulate(public_key)
            except KEMError as e:
                raise HandshakeError(f"KEM encapsulation failed: {e}") from e
            if (len(ciphertext) != kem.CIPHERTEXT_SIZE
                    or len(secret) != kem.SHARED_SECRET_SIZE):
                raise HandshakeError("KEM encapsulation returned bad lengths")
            self._kem_secret = bytes(secret)
            hello = build_kemconnect_hello(
                self._version, self._key_id, self._psk, kem_key_id,
                self._client_random, timestamp, ciphertext)
        self._state = _State.WAITING
        return hello

    def feed(self, data: bytes) -> Established | None:
        """Process bytes of the ServerHello.

        :return: :class:`Established` once the ServerHello is complete and
            verified, ``None`` while more bytes are needed.
        :raises HandshakeError: the server rejected the handshake, sent an
            invalid status or a wrong auth hash, or the handshake is not
            waiting for the ServerHello (not started, finished or failed).
        """
        if self._state is not _State.WAITING:
            raise HandshakeError(f"ServerHello received in state {self._state.value}")
        buffer = self._buffer
        buffer += data
        if not buffer:
            return None
        status = buffer[0]
        if status != Status.OK:
            self._state = _State.FAILED
            if status > max(Status):
                raise HandshakeError(f"server sent an invalid handshake status {status}",
                                     status=status)
            hint = ""
            if status == Status.TIMESTAMP_INVALID:
                hint = (f" (our clock says {self._timestamp} Unix seconds; the "
                        f"server's differs by more than {TIMESTAMP_TOLERANCE} s:"
                        f" check NTP on both ends)")
            elif status == Status.CLIENT_AUTH_FAILED:
                hint = " (wrong or unknown key, replayed hello, or KEM required)"
            raise HandshakeError(
                f"server rejected handshake: {Status(status).name.lower()}{hint}",
                status=Status(status))
        if len(buffer) < SERVER_HELLO_SIZE:
            return None
        server_random = bytes(buffer[1:1 + _RANDOM_SIZE])
        expected = kdf.server_auth_hash(self._psk, self._client_random,
                                        server_random, self._cluster_id)
        if not hmac.compare_digest(expected, bytes(buffer[17:SERVER_HELLO_SIZE])):
            self._state = _State.FAILED
            raise HandshakeError(
                "server authentication failed (check that both ends use the "
                "same -c cluster id and key)")
        keys = kdf.derive_session_keys(self._psk, self._client_random,
                                       server_random, self._kem_secret)
        leftover = bytes(buffer[SERVER_HELLO_SIZE:])
        self._buffer = bytearray()
        self._state = _State.DONE
        return Established(
            keys=keys,
            mode="connect" if self._kem_public is None else "kemconnect",
            peer_version=self._version, key_id=self._key_id,
            kem_key_id=None if self._kem_public is None else self._kem_public[0],
            leftover=leftover, key_fingerprint=kdf.key_fingerprint(self._psk),
            kem_fingerprint=None if self._kem_public is None
            else kdf.public_key_fingerprint(self._kem_public[1]))


class HelloReplayCache(Protocol):
    """What :class:`ServerHandshake` needs of a replay cache: this
    in-memory :class:`ReplayCache`, or the file or shared memory of a
    tunnel end's processes (:class:`tigertunnel.ops.replayfile.FileReplayCache`)."""

    def check_and_add(self, digest: bytes, timestamp: int) -> Verdict:
        """Record a hello by its hash; say whether it is fresh, a replay, or
        cannot be recorded (then it is refused)."""


class ReplayCache:
    """Remembers authenticated ClientHellos for as long as they could be
    replayed, in this process's memory.

    A hello is only accepted within :data:`~tigertunnel.wire.handshake.TIMESTAMP_TOLERANCE`
    seconds of
    its timestamp, so an entry can be forgotten once its timestamp is more
    than that in the past (:mod:`tigertunnel.wire.replaywindow`, shared with
    the file cache). Only hellos whose hash verified are recorded, so
    strangers cannot fill the cache; a hello that finds no room is refused
    (:attr:`~tigertunnel.wire.replaywindow.Verdict.FULL`), an unexpired one is never dropped.
    """

    def __init__(self, buckets: int = DEFAULT_BUCKETS, slots: int = DEFAULT_SLOTS,
                 now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._buckets = MemoryBuckets(slots)
        self.table = ReplayTable(self._buckets, buckets, slots, TIMESTAMP_TOLERANCE)

    def __len__(self) -> int:
        """The number of hellos in the window."""
        now = self._now()
        return sum(self.table.live_in(bucket, now)
                   for _, bucket in self._buckets.written())

    def check_and_add(self, digest: bytes, timestamp: int) -> Verdict:
        """Record a hello by its hash (see :class:`~tigertunnel.wire.replaywindow.Verdict`)."""
        return self.table.check_and_add(digest, timestamp, self._now())


@functools.lru_cache(maxsize=64)
def _expand_kem_seed(seed: bytes) -> kem.SecretKey:
    # Key stores hold at most 16 keys; expanding ML-KEM once per process
    # instead of once per handshake.
    return kem.SecretKey(seed)


class ServerHandshake:
    """The server half of the handshake for one pool connection.

    :meth:`feed` every received byte until it returns :class:`Accepted` or
    :class:`Rejected`; then send its ``reply`` (and close on rejection).
    """

    def __init__(self, psk_keys: Mapping[int, bytes],
                 kem_keys: Mapping[int, bytes | kem.SecretKey] | None = None,
                 cluster_id: int = 0, *,
                 random: Callable[[int], bytes] = os.urandom,
                 now: Callable[[], float] = time.time,
                 require_kem: bool = False,
                 replay_cache: HelloReplayCache | None = None,
                 hide_unknown_key: bool = False,
                 versions: "tuple[int, ...] | None" = None) -> None:
        """
        :param psk_keys: PSK by key id (the server's ``-k`` file).
        :param kem_keys: X-Wing secret key by KEM key id: the 32-byte seeds
            of the ``--kemsecret`` file (expanded on first use and cached
            process-wide) or already expanded :class:`kem.SecretKey` objects.
        :param cluster_id: the server's ``-c`` value, 0 when unset.
        :param require_kem: refuse ``connect`` (PSK-only) hellos.
        :param replay_cache: refuse hellos seen before (shared by every
            pool connection of a tunnel end).
        :param hide_unknown_key: answer an unknown key id with status 4,
            like a bad hash (the reason still says which it was).
        :param versions: the version bytes accepted (``None``: any, as the
            reference server does); another version is closed without reply
            as soon as its first byte arrives.
        :raises ValueError: a key or the cluster id is malformed.
        """
        if not 0 <= cluster_id < 1 << 128:
            raise ValueError("cluster id must be an unsigned 128-bit integer")
        if any(len(psk) != kdf.PSK_SIZE for psk in psk_keys.values()):
            raise ValueError(f"every PSK must be {kdf.PSK_SIZE} bytes")
        if any(not isinstance(secret, kem.SecretKey)
               and len(secret) != kem.SECRET_KEY_SIZE
               for secret in (kem_keys or {}).values()):
            raise ValueError(f"every KEM secret key must be {kem.SECRET_KEY_SIZE} bytes")
        self._psk_keys = psk_keys
        self._kem_keys = kem_keys
        self._cluster_id = cluster_id
        self._random = random
        self._now = now
        self._require_kem = require_kem
        self._replay_cache = replay_cache
        self._hide_unknown_key = hide_unknown_key
        self._versions = versions
        self._state = _State.WAITING
        self._buffer = bytearray()

    def __repr__(self) -> str:
        return f"<ServerHandshake state={self._state.value}>"

    def feed(self, data: bytes) -> Accepted | Rejected | None:
        """Process bytes of the ClientHello.

        :return: ``None`` while more bytes are needed, else the outcome.
        :raises HandshakeError: the handshake has already ended.
        """
        if self._state is not _State.WAITING:
            raise HandshakeError(f"ClientHello data received in state {self._state.value}")
        buffer = self._buffer
        buffer += data
        if (self._versions is not None and buffer
                and buffer[0] not in self._versions):
            return self._reject(None, f"unknown version byte {buffer[0]}",
                                RejectKind.BAD_VERSION)
        if len(buffer) < 2:
            return None
        operation = buffer[1]
        if operation == OP_CONNECT:
            size = CONNECT_HELLO_SIZE
        elif operation == OP_KEMCONNECT:
            size = KEMCONNECT_HELLO_SIZE
        else:
            return self._reject(None, f"unknown operation byte {operation}",
                                RejectKind.BAD_OPERATION)
        if len(buffer) < size:
            return None
        hello = bytes(buffer[:size])
        leftover = bytes(buffer[size:])
        self._buffer = bytearray()
        return self._check(hello, leftover)

    def _reject(self, status: Status | None, reason: str, kind: RejectKind,
                skew: int | None = None) -> Rejected:
        self._state = _State.FAILED
        self._buffer = bytearray()
        reply = b"" if status is None else bytes((status,))
        return Rejected(reply=reply, status=status, reason=reason, kind=kind,
                        skew=skew)

    def _check(self, hello: bytes, leftover: bytes) -> Accepted | Rejected:
        version, operation = hello[0], hello[1]
        key_id = int.from_bytes(hello[2:10], "little")
        kem_key_id: int | None = None
        if operation == OP_KEMCONNECT:
            kem_key_id = int.from_bytes(hello[10:18], "little")
            fields = hello[18:]
        else:
            fields = hello[10:]
        client_random = fields[:_RANDOM_SIZE]
        timestamp = int.from_bytes(fields[16:24], "little")
        digest = fields[24:24 + _HASH_SIZE]

        psk = self._psk_keys.get(key_id)
        if psk is None:
            status = (Status.CLIENT_AUTH_FAILED if self._hide_unknown_key
                      else Status.UNKNOWN_KEY)
            return self._reject(status, f"unknown key id {key_id}",
                                RejectKind.UNKNOWN_KEY)
        if kem_key_id is None:
            expected = kdf.connect_hello_hash(version, operation, key_id,
                                              client_random, timestamp, psk)
        else:
            expected = kdf.kemconnect_hello_hash(version, operation, key_id, kem_key_id,
                                                 client_random, timestamp, psk)
        if not hmac.compare_digest(expected, digest):
            return self._reject(Status.CLIENT_AUTH_FAILED,
                                f"ClientHello hash mismatch for key id {key_id}",
                                RejectKind.BAD_HASH)
        skew = timestamp - int(self._now())
        if abs(skew) > TIMESTAMP_TOLERANCE:
            return self._reject(
                Status.TIMESTAMP_INVALID,
                f"ClientHello timestamp is {skew:+d} s off the server clock "
                f"(tolerance {TIMESTAMP_TOLERANCE} s)", RejectKind.TIMESTAMP,
                skew=skew)
        if self._replay_cache is not None:
            verdict = self._replay_cache.check_and_add(digest, timestamp)
            if verdict is Verdict.REPLAYED:
                return self._reject(Status.CLIENT_AUTH_FAILED,
                                    f"replayed ClientHello for key id {key_id}",
                                    RejectKind.REPLAY)
            if verdict is Verdict.FULL:
                return self._reject(Status.SERVER_ERROR,
                                    "replay cache full of unexpired ClientHellos: "
                                    "new hellos are refused until some expire",
                                    RejectKind.REPLAY_CACHE_FULL)
            if verdict is not Verdict.FRESH:
                return self._reject(Status.SERVER_ERROR,
                                    "replay cache cannot record the ClientHello",
                                    RejectKind.REPLAY_CACHE_ERROR)

        kem_secret: bytes | None = None
        if kem_key_id is None:
            if self._require_kem:
                return self._reject(Status.CLIENT_AUTH_FAILED,
                                    "PSK-only handshake refused (server requires KEM)",
                                    RejectKind.KEM_REQUIRED)
        else:
            if not self._kem_keys:
                return self._reject(Status.UNKNOWN_KEM_KEY, "no KEM secret keys configured",
                                    RejectKind.KEM)
            secret = self._kem_keys.get(kem_key_id)
            if secret is None:
                return self._reject(Status.UNKNOWN_KEM_KEY,
                                    f"unknown KEM key id {kem_key_id}", RejectKind.KEM)
            try:
                if not isinstance(secret, kem.SecretKey):
                    secret = _expand_kem_seed(bytes(secret))
                kem_secret = secret.decapsulate(hello[_KEM_CIPHERTEXT_OFFSET:])
            except KEMError as e:
                return self._reject(Status.SERVER_ERROR, f"KEM decapsulation failed: {e}",
                                    RejectKind.KEM)

        kem_fingerprint: bytes | None = None
        if kem_key_id is not None and self._kem_keys:
            seed = self._kem_keys.get(kem_key_id)
            if isinstance(seed, (bytes, bytearray)):
                kem_fingerprint = kdf.key_fingerprint(bytes(seed))
        server_random = _random(self._random)
        reply = build_server_hello(psk, client_random, server_random, self._cluster_id)
        keys = kdf.derive_session_keys(psk, client_random, server_random, kem_secret)
        self._state = _State.DONE
        return Accepted(reply=reply, established=Established(
            keys=keys, mode="connect" if kem_key_id is None else "kemconnect",
            peer_version=version, key_id=key_id, kem_key_id=kem_key_id,
            leftover=leftover, key_fingerprint=kdf.key_fingerprint(psk),
            kem_fingerprint=kem_fingerprint))
