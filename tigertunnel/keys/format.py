"""The key-file format (docs/protocol.rst §2): parsing and formatting lines.

Every key file is text with one key per line::

    <key_id>:<hex>

``key_id`` is a decimal u64 read with Zig's lenient integer parser (an optional
``+``, leading zeros, ``_`` between digits and ``-0`` are accepted, see
:func:`parse_int`); ``hex`` is exactly twice the key size in hex digits, upper
or lower case. Lines are split on ``\\n`` only and stripped of spaces, tabs and
``\\r``; empty lines and lines whose first character is ``#`` are skipped.

* PSK file (``-k``): keys of :data:`~tigertunnel.crypto.kdf.PSK_SIZE` bytes,
  up to :data:`MAX_KEYS`. The client uses the first key, the server looks
  keys up by the key id of the ClientHello.
* KEM secret file (``PREFIX.key``, ``--kemsecret``): X-Wing seeds of
  :data:`~tigertunnel.crypto.kem.SECRET_KEY_SIZE` bytes, same rules.
* KEM public file (``PREFIX.pub``, ``--kempublic``): exactly one X-Wing public
  key of :data:`~tigertunnel.crypto.kem.PUBLIC_KEY_SIZE` bytes. Comments and
  blank lines are accepted here too (the reference refuses them, docs/protocol.rst
  §11 item 30).

:func:`format_key_line` writes ``<decimal key_id>:<lowercase hex>\\n``, byte
for byte what the reference's keygen writes.

This module works on bytes already read; :mod:`tigertunnel.keys.files` reads
and writes the files. Every failure is a
:class:`~tigertunnel.errors.KeyFileError` naming the file, the line and the
reference's error name; messages never contain key material.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Iterator, Mapping

from tigertunnel.crypto.kem import PUBLIC_KEY_SIZE
from tigertunnel.errors import KeyFileError

#: Maximum number of keys in one key file (the reference's ``max_keys``).
MAX_KEYS = 16

U64_MAX = (1 << 64) - 1
_DIGITS = re.compile(r"[0-9_]+")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_STRIP = b" \t\r"


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
                f"key id is not a decimal number from 0 to {U64_MAX}") from None
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


def parse_public_key_text(text: bytes, path: str) -> tuple[int, bytes]:
    """Parse the content of a KEM public key file (``PREFIX.pub``).

    :param text: the whole file content.
    :param path: the file name to put into errors.
    :return: ``(key_id, public_key)``.
    :raises KeyFileError: ``InvalidKeyFormat`` with detail "a .pub file holds
        exactly one key" for a second key line, ``NoKeysFound`` for no key,
        and the per-line errors of :func:`parse_key_text`.
    """
    found: tuple[int, bytes] | None = None
    for number, key_id, key in _iter_key_lines(text, path, PUBLIC_KEY_SIZE):
        if found is not None:
            raise KeyFileError(path, "InvalidKeyFormat", number,
                               "a .pub file holds exactly one key")
        found = (key_id, key)
    if found is None:
        raise KeyFileError(path, "NoKeysFound", None,
                           "no <key_id>:<hex> line in the file")
    return found


def first_key(text: bytes) -> "tuple[int, int] | None":
    """The key id and key size (bytes) of the first key line, to tell what
    kind of key file ``text`` is before checking it for one kind.

    Lenient: a line that does not look like ``<key_id>:<hex>`` is skipped,
    and ``None`` means no line does.
    """
    for raw in text.split(b"\n"):
        line = raw.strip(_STRIP)
        if not line or line[:1] == b"#":
            continue
        id_part, colon, hex_part = line.partition(b":")
        if not colon or not hex_part or len(hex_part) % 2 or not set(hex_part) <= _HEX_DIGITS:
            continue
        try:
            return parse_int(id_part.decode("latin-1"), 64), len(hex_part) // 2
        except ValueError:
            continue
    return None


def format_key_line(key_id: int, key: bytes) -> str:
    """Return one key-file line, ``<decimal key_id>:<lowercase hex>\\n``.

    :raises ValueError: if ``key_id`` is not a u64.
    """
    if not 0 <= key_id <= U64_MAX:
        raise ValueError("key id must be an unsigned 64-bit integer")
    return f"{key_id}:{key.hex()}\n"
