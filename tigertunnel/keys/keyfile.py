"""Key files: parsing, loading, formatting and generation (PROTOCOL.md section 2).

Every key file is text with one key per line::

    <key_id>:<hex>

``key_id`` is a decimal u64 read with Zig's lenient integer parser (an optional
``+``, leading zeros, ``_`` between digits and ``-0`` are accepted, see
:func:`parse_int`); ``hex`` is exactly twice the key size in hex digits, upper
or lower case. Lines are split on ``\\n`` only and stripped of spaces, tabs and
``\\r``; empty lines and lines whose first character is ``#`` are skipped.

* PSK file (``-k``): 32-byte keys, up to :data:`MAX_KEYS`. The client uses the
  first key, the server looks keys up by the key id of the ClientHello.
* KEM secret file (``PREFIX.key``, ``--kemsecret``): 32-byte X-Wing seeds,
  same rules.
* KEM public file (``PREFIX.pub``, ``--kempublic``): exactly one 1216-byte
  X-Wing public key.

``keygen`` and ``kemgen`` write ``<decimal key_id>:<lowercase hex>\\n``, byte
for byte what the reference writes.

Deliberate differences from the reference (PROTOCOL.md section 11, items 9, 29
and 30): the whole file is read (the reference silently truncates at 2048,
1376 or 2454 bytes); the ``.pub`` file accepts comments and blank lines too;
secret files are created with mode 0600 and refused when group or others have
any access to them; existing files are never overwritten without ``force``;
new key ids are the current Unix time in nanoseconds instead of random
numbers (both are valid u64, the wire does not care).

Every failure is a :class:`~tigertunnel.errors.KeyFileError` naming the file,
the line and the reference's error name; messages never contain key material.
"""

from __future__ import annotations

import binascii
import os
import re
import shlex
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from tigertunnel.errors import KeyFileError

#: Maximum number of keys in one key file (the reference's ``max_keys``).
MAX_KEYS = 16
#: PSK size in bytes (section 1).
PSK_SIZE = 32
#: X-Wing secret key (seed) size in bytes (section 5).
KEM_SEED_SIZE = 32
#: X-Wing public key size in bytes (section 5).
KEM_PUBLIC_KEY_SIZE = 1216

#: Guard against pointing a key option at a huge file or a device such as
#: ``/dev/zero``; a full file of 16 public keys with comments is ~40 KiB.
MAX_KEY_FILE_SIZE = 1 << 20

_U64_MAX = (1 << 64) - 1
_DIGITS = re.compile(r"[0-9_]+")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_STRIP = b" \t\r"
_INSECURE_BITS = stat.S_IRWXG | stat.S_IRWXO

RandomSource = Callable[[int], bytes]


def parse_int(text: str, bits: int = 64) -> int:
    """Parse a decimal unsigned integer the way Zig's ``std.fmt.parseInt`` does.

    Accepted: an optional leading ``+`` or ``-``, then ASCII digits with ``_``
    allowed anywhere except first or last; leading zeros are fine. With ``-``
    only zero is representable (``-0``, ``-00`` give 0). Nothing else is
    accepted: no surrounding spaces, no ``0x`` prefix, no non-ASCII digits.

    :param text: the number as written.
    :param bits: width of the unsigned result (64 for key ids, 128 for the
        cluster id).
    :return: the value, ``0 <= value < 2**bits``.
    :raises ValueError: on any invalid character, an empty number or a value
        that does not fit in ``bits`` bits.
    """
    negative = False
    body = text
    if body[:1] in ("+", "-"):
        negative = body[0] == "-"
        body = body[1:]
    if not body or body[0] == "_" or body[-1] == "_" or not _DIGITS.fullmatch(body):
        raise ValueError("not a decimal unsigned integer")
    digits = body.replace("_", "").lstrip("0")
    if not digits:
        return 0
    if negative:
        raise ValueError("negative number for an unsigned integer")
    limit = 1 << bits
    # The length test first keeps int() away from megabytes of digits.
    if len(digits) > len(str(limit)) or int(digits) >= limit:
        raise ValueError(f"number does not fit in {bits} bits")
    return int(digits)


class KeyStore(Mapping[int, bytes]):
    """The keys of one key file: key id to key bytes, in file order.

    Immutable. Its ``repr`` shows the key ids only, never key bytes.
    """

    def __init__(self, entries: Iterable[tuple[int, bytes]] = ()) -> None:
        """
        :param entries: ``(key_id, key)`` pairs; a later duplicate id replaces
            an earlier one (the parsers reject duplicates before this point).
        """
        self._keys: dict[int, bytes] = dict(entries)

    def __getitem__(self, key_id: int) -> bytes:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyStore(ids={self.ids()!r})"

    def first(self) -> tuple[int, bytes]:
        """Return the first key of the file, the one a client uses.

        :return: ``(key_id, key)``.
        :raises LookupError: if the store is empty (parsed stores never are).
        """
        for key_id, key in self._keys.items():
            return key_id, key
        raise LookupError("empty KeyStore")

    def ids(self) -> list[int]:
        """Return the key ids in file order."""
        return list(self._keys)


def _iter_key_lines(text: bytes, path: str,
                    key_size: int) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(line_number, key_id, key)`` for each key line of ``text``.

    Applies the per-line rules of section 2.1; duplicates and counts are the
    caller's business.

    :raises KeyFileError: ``InvalidKeyFormat`` or ``InvalidKeySize``.
    """
    hex_len = 2 * key_size
    for number, raw in enumerate(text.split(b"\n"), start=1):
        line = raw.strip(_STRIP)
        if not line or line[:1] == b"#":
            continue
        id_part, colon, hex_part = line.partition(b":")
        if not colon:
            raise KeyFileError(path, "InvalidKeyFormat", number,
                               "expected <key_id>:<hex>, found no ':'")
        try:
            key_id = parse_int(id_part.decode("latin-1"), 64)
        except ValueError:
            raise KeyFileError(
                path, "InvalidKeyFormat", number,
                f"key id is not a decimal number from 0 to {_U64_MAX}") from None
        if len(hex_part) != hex_len:
            raise KeyFileError(
                path, "InvalidKeySize", number,
                f"expected {hex_len} hex digits, got {len(hex_part)}")
        try:
            key = binascii.unhexlify(hex_part)
        except (binascii.Error, ValueError):
            lead = len(raw) - len(raw.lstrip(_STRIP))
            column = lead + len(id_part) + 2 + next(
                i for i, c in enumerate(hex_part) if c not in _HEX_DIGITS)
            raise KeyFileError(path, "InvalidKeyFormat", number,
                               f"non-hex character in the key at column "
                               f"{column}") from None
        yield number, key_id, key


def parse_key_text(text: bytes, path: str, key_size: int) -> KeyStore:
    """Parse the content of a multi-key file (PSK file or KEM secret file).

    :param text: the whole file content.
    :param path: the file name to put into errors.
    :param key_size: key length in bytes (32 for PSKs and KEM seeds).
    :return: the keys in file order (at least one, at most :data:`MAX_KEYS`).
    :raises KeyFileError: ``InvalidKeyFormat`` / ``InvalidKeySize`` for a bad
        line, ``DuplicateKeyId``, ``KeyStoreFull`` (more than
        :data:`MAX_KEYS` keys) or ``NoKeysFound``, with the line number where
        there is one.
    """
    keys: dict[int, bytes] = {}
    lines: dict[int, int] = {}
    for number, key_id, key in _iter_key_lines(text, path, key_size):
        # Same order of checks as the reference: duplicate, then capacity.
        if key_id in keys:
            raise KeyFileError(path, "DuplicateKeyId", number,
                               f"key id {key_id} already on line {lines[key_id]}")
        if len(keys) >= MAX_KEYS:
            raise KeyFileError(path, "KeyStoreFull", number,
                               f"a key file holds at most {MAX_KEYS} keys")
        keys[key_id] = key
        lines[key_id] = number
    if not keys:
        raise KeyFileError(path, "NoKeysFound", None,
                           "no <key_id>:<hex> line in the file")
    return KeyStore(keys.items())


def _read_key_file(path: str, secret: bool) -> bytes:
    """Return the whole content of a key file.

    :param secret: refuse the file if group or others have any access to it
        (like ssh, stricter than "can read": a group-writable secret key
        could be swapped by someone else).
    :raises KeyFileError: ``Unreadable``, ``InsecurePermissions``, or
        ``InvalidKeyFormat`` for a file over :data:`MAX_KEY_FILE_SIZE` bytes.
    """
    try:
        with open(path, "rb") as f:
            if secret and os.name == "posix":
                mode = os.fstat(f.fileno()).st_mode
                if mode & _INSECURE_BITS:
                    raise KeyFileError(path, "InsecurePermissions", None,
                                       f"run: chmod 600 {shlex.quote(path)}")
            data = f.read(MAX_KEY_FILE_SIZE + 1)
    except OSError as e:
        raise KeyFileError(path, "Unreadable", None,
                           e.strerror or str(e)) from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise KeyFileError(path, "InvalidKeyFormat", None,
                           f"file is larger than {MAX_KEY_FILE_SIZE} bytes")
    return data


def load_psk_file(path: str) -> KeyStore:
    """Load a PSK file (``-k``).

    :return: the 32-byte keys in file order; a client uses
        :meth:`KeyStore.first`.
    :raises KeyFileError: see :func:`parse_key_text`, plus ``Unreadable`` and
        ``InsecurePermissions``.
    """
    return parse_key_text(_read_key_file(path, secret=True), path, PSK_SIZE)


def load_kem_secret_file(path: str) -> KeyStore:
    """Load a KEM secret key file (``--kemsecret``, ``PREFIX.key``).

    :return: the 32-byte X-Wing seeds in file order.
    :raises KeyFileError: see :func:`load_psk_file`.
    """
    return parse_key_text(_read_key_file(path, secret=True), path, KEM_SEED_SIZE)


def load_kem_public_file(path: str) -> tuple[int, bytes]:
    """Load a KEM public key file (``--kempublic``, ``PREFIX.pub``).

    Comments and blank lines are accepted (the reference refuses them).

    :return: ``(key_id, public_key)``, the key being 1216 bytes.
    :raises KeyFileError: ``InvalidKeyFormat`` with detail "a .pub file holds
        exactly one key" for a second key line, ``NoKeysFound`` for no key,
        the per-line errors of :func:`parse_key_text`, and ``Unreadable``.
    """
    text = _read_key_file(path, secret=False)
    found: tuple[int, bytes] | None = None
    for number, key_id, key in _iter_key_lines(text, path, KEM_PUBLIC_KEY_SIZE):
        if found is not None:
            raise KeyFileError(path, "InvalidKeyFormat", number,
                               "a .pub file holds exactly one key")
        found = (key_id, key)
    if found is None:
        raise KeyFileError(path, "NoKeysFound", None,
                           "no <key_id>:<hex> line in the file")
    return found


def format_key_line(key_id: int, key: bytes) -> str:
    """Return one key-file line, ``<decimal key_id>:<lowercase hex>\\n``.

    :raises ValueError: if ``key_id`` is not a u64.
    """
    if not 0 <= key_id <= _U64_MAX:
        raise ValueError("key id must be an unsigned 64-bit integer")
    return f"{key_id}:{key.hex()}\n"


def generate_key_id(clock: Callable[[], int] = time.time_ns) -> int:
    """Return a new key id: the current Unix time in nanoseconds.

    Newer keys thus sort later (the reference draws random ids instead; any
    u64 interoperates).

    :param clock: returns nanoseconds since the epoch.
    """
    return clock() & _U64_MAX


def _unwritable(path: str, error: OSError) -> KeyFileError:
    """Return the ``Unwritable`` error for an OS failure while writing ``path``."""
    return KeyFileError(path, "Unwritable", None, error.strerror or str(error))


def _fill(fd: int, data: bytes, mode: int) -> None:
    """Give ``fd`` exactly ``mode`` (not umask-dependent), write ``data``, sync, close."""
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, text: str, mode: int, force: bool) -> None:
    """Create ``path`` with exactly ``mode`` and content ``text``.

    Without ``force`` the file is created with ``O_EXCL`` (never replacing
    anything, not even a dangling symlink). With ``force`` a temporary file
    (mode 0600) is written in the same directory and renamed over ``path``,
    so readers see the old or the new file, never a partial one.

    :raises KeyFileError: ``FileExists`` or ``Unwritable``.
    """
    data = text.encode("ascii")
    if force:
        try:
            fd, target = tempfile.mkstemp(
                prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                dir=os.path.dirname(os.path.abspath(path)))
        except OSError as e:
            raise _unwritable(path, e) from None
    else:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileError(path, "FileExists", None,
                               "use --force to replace it") from None
        except OSError as e:
            raise _unwritable(path, e) from None
        target = path
    try:
        _fill(fd, data, mode)
        if force:
            os.replace(target, path)
    except OSError as e:
        try:
            os.unlink(target)  # never leave a partial key file behind
        except OSError:
            pass
        raise _unwritable(path, e) from None


def write_secret_file(path: str, text: str, force: bool = False) -> None:
    """Write a secret key file with mode 0600.

    :param force: replace an existing file (atomically) instead of refusing.
    :raises KeyFileError: ``FileExists`` (detail "use --force to replace it")
        or ``Unwritable``.
    """
    _write_file(path, text, 0o600, force)


def write_public_file(path: str, text: str, force: bool = False) -> None:
    """Write a public key file with mode 0644.

    :raises KeyFileError: as :func:`write_secret_file`.
    """
    _write_file(path, text, 0o644, force)


def keygen(path: str, force: bool = False, key_id: int | None = None,
           random: RandomSource = os.urandom) -> int:
    """Generate a PSK and write it to ``path`` as a one-line secret key file.

    :param key_id: the key id to use; default :func:`generate_key_id`.
    :param random: returns that many random bytes; called once for the key.
    :return: the key id.
    :raises KeyFileError: ``FileExists`` or ``Unwritable``.
    :raises ValueError: if ``key_id`` is not a u64.
    """
    if key_id is None:
        key_id = generate_key_id()
    key = random(PSK_SIZE)
    if len(key) != PSK_SIZE:
        raise ValueError("random source returned the wrong number of bytes")
    write_secret_file(path, format_key_line(key_id, key), force)
    return key_id


def kemgen(prefix: str, force: bool = False, key_id: int | None = None,
           random: RandomSource = os.urandom) -> int:
    """Generate an X-Wing key pair and write ``PREFIX.pub`` then ``PREFIX.key``.

    Both files carry the same key id. Without ``force`` nothing is written if
    either file already exists.

    :param key_id: the key id to use; default :func:`generate_key_id`.
    :param random: returns that many random bytes; called once for the seed.
    :return: the key id.
    :raises KeyFileError: ``FileExists`` or ``Unwritable``.
    :raises ValueError: if ``key_id`` is not a u64.
    """
    # Imported here so that key files can be loaded without the KEM code.
    from tigertunnel.crypto.kem import public_key_from_seed

    pub_path, key_path = prefix + ".pub", prefix + ".key"
    if not force:
        for p in (pub_path, key_path):
            if os.path.lexists(p):
                raise KeyFileError(p, "FileExists", None,
                                   "use --force to replace it")
    if key_id is None:
        key_id = generate_key_id()
    seed = random(KEM_SEED_SIZE)
    if len(seed) != KEM_SEED_SIZE:
        raise ValueError("random source returned the wrong number of bytes")
    public_key = public_key_from_seed(seed)
    pub_line = format_key_line(key_id, public_key)
    key_line = format_key_line(key_id, seed)
    write_public_file(pub_path, pub_line, force)
    try:
        write_secret_file(key_path, key_line, force)
    except KeyFileError:
        if not force:
            # Don't leave a public key whose secret half was never written.
            try:
                os.unlink(pub_path)
            except OSError:
                pass
        raise
    return key_id
