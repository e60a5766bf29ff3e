"""New keys: ``tigertunnel keygen`` (a PSK) and ``kemgen`` (an X-Wing pair).

New key ids are the current Unix time in nanoseconds instead of the
reference's random numbers (both are valid u64, the wire does not care), so
newer keys sort later. The files are written by :mod:`tigertunnel.keys.files`
in the format of :mod:`tigertunnel.keys.format`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from tigertunnel.crypto.kdf import PSK_SIZE
from tigertunnel.crypto.kem import SECRET_KEY_SIZE, public_key_from_seed
from tigertunnel.errors import KeyFileError
from tigertunnel.keys.files import (
    refuse_existing,
    remove_quietly,
    write_public_file,
    write_secret_file,
)
from tigertunnel.keys.format import U64_MAX, format_key_line

#: Returns that many random bytes (``os.urandom``; tests pass fixed bytes).
RandomSource = Callable[[int], bytes]


def generate_key_id(clock: Callable[[], int] = time.time_ns) -> int:
    """Return a new key id: the current Unix time in nanoseconds.

    :param clock: returns nanoseconds since the epoch.
    """
    return clock() & U64_MAX


def _random_key(random: RandomSource, size: int) -> bytes:
    key = random(size)
    if len(key) != size:
        raise ValueError(f"random source returned {len(key)} bytes, not {size}")
    return key


def keygen(path: str, force: bool = False, key_id: int | None = None,
           random: RandomSource = os.urandom) -> int:
    """Generate a PSK and write it to ``path`` as a one-line secret key file.

    :param key_id: the key id to use; default :func:`generate_key_id`.
    :param random: called once for the key.
    :return: the key id.
    :raises KeyFileError: ``FileExists`` or ``Unwritable``.
    :raises ValueError: if ``key_id`` is not a u64.
    """
    if key_id is None:
        key_id = generate_key_id()
    key = _random_key(random, PSK_SIZE)
    write_secret_file(path, format_key_line(key_id, key), force)
    return key_id


def kemgen(prefix: str, force: bool = False, key_id: int | None = None,
           random: RandomSource = os.urandom) -> int:
    """Generate an X-Wing key pair and write ``PREFIX.pub`` then ``PREFIX.key``.

    Both files carry the same key id. Without ``force`` nothing is written if
    either file already exists.

    :param key_id: the key id to use; default :func:`generate_key_id`.
    :param random: called once for the seed.
    :return: the key id.
    :raises KeyFileError: ``FileExists`` or ``Unwritable``.
    :raises ValueError: if ``key_id`` is not a u64.
    """
    pub_path, key_path = prefix + ".pub", prefix + ".key"
    if not force:
        refuse_existing(pub_path, key_path)
    if key_id is None:
        key_id = generate_key_id()
    seed = _random_key(random, SECRET_KEY_SIZE)
    pub_line = format_key_line(key_id, public_key_from_seed(seed))
    key_line = format_key_line(key_id, seed)
    write_public_file(pub_path, pub_line, force)
    try:
        write_secret_file(key_path, key_line, force)
    except KeyFileError:
        if not force:
            # Don't leave a public key whose secret half was never written.
            remove_quietly(pub_path)
        raise
    return key_id
