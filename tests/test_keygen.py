"""Tests for tigertunnel.keys.generate: keygen and kemgen."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from tests.keydir import KeyDirCase, mode_of, read

from tigertunnel.crypto.kem import public_key_from_seed
from tigertunnel.errors import KeyFileError
from tigertunnel.keys.files import (
    load_kem_public_file,
    load_kem_secret_file,
    load_psk_file,
    write_public_file,
    write_secret_file,
)
from tigertunnel.keys.format import format_key_line
from tigertunnel.keys.generate import generate_key_id, kemgen, keygen
from tests.helpers import load_vectors, unhex

XWING = load_vectors("xwing")


def fixed_random(data: bytes) -> Callable[[int], bytes]:
    """Return a random source that hands out ``data`` and checks it is used up."""
    remaining = [data]

    def random(n: int) -> bytes:
        chunk, remaining[0] = remaining[0][:n], remaining[0][n:]
        assert len(chunk) == n, "fixed random source exhausted"
        return chunk
    return random


class KeygenTests(KeyDirCase):
    """tigertunnel keygen: one PSK in a new 0600 file."""

    def test_keygen_writes_0600_line(self) -> None:
        """keygen creates a 0600 file (whatever the umask) holding one reference-format line."""
        self.set_umask(0)
        p = self.path("psk.key")
        key_id = keygen(p, key_id=42, random=fixed_random(bytes(range(32))))
        self.assertEqual(key_id, 42)
        self.assertEqual(read(p), format_key_line(42, bytes(range(32))).encode())
        self.assertEqual(mode_of(p), 0o600)
        self.assertEqual(load_psk_file(p).first(), (42, bytes(range(32))))

    def test_keygen_default_id_is_time(self) -> None:
        """Without a key id keygen uses the current Unix time in nanoseconds."""
        before = time.time_ns()
        key_id = keygen(self.path("psk.key"))
        self.assertTrue(before <= key_id <= time.time_ns())
        self.assertEqual(load_psk_file(self.path("psk.key")).ids(), [key_id])

    def test_generate_key_id_clock(self) -> None:
        """generate_key_id returns the injected clock's nanoseconds as a u64."""
        self.assertEqual(generate_key_id(lambda: 1732712345000000000), 1732712345000000000)

    def test_no_overwrite(self) -> None:
        """keygen refuses an existing file and leaves it untouched."""
        p = self.path("psk.key")
        write_secret_file(p, "old\n")
        err = self.assertRaises(KeyFileError, keygen, p)
        self.assertEqual((err.reason, err.detail), ("FileExists", "use --force to replace it"))
        self.assertEqual(read(p), b"old\n")

    def test_force_replaces(self) -> None:
        """keygen with force replaces an existing 0644 file by a 0600 key file."""
        p = self.path("psk.key")
        write_public_file(p, "old\n")
        keygen(p, force=True, key_id=1, random=fixed_random(b"\x11" * 32))
        self.assertEqual(read(p), format_key_line(1, b"\x11" * 32).encode())
        self.assertEqual(mode_of(p), 0o600)

    def test_short_random_source(self) -> None:
        """A random source that returns too few bytes is refused before anything is written."""
        p = self.path("psk.key")
        self.assertRaises(ValueError, keygen, p, random=lambda n: bytes(n - 1))
        self.assertFalse(os.path.exists(p))


class KemgenTests(KeyDirCase):
    """tigertunnel kemgen: an X-Wing pair in PREFIX.pub (0644) and PREFIX.key (0600)."""

    def test_kemgen_reproduces_files(self) -> None:
        """kemgen with the case's seed as randomness and its key id writes both files exactly."""
        d = self.dir
        for case in XWING["cases"]:
            prefix = os.path.join(d, "k" + case["key_id"])
            got = kemgen(prefix, key_id=int(case["key_id"]),
                         random=fixed_random(unhex(case["seed"])))
            self.assertEqual(got, int(case["key_id"]))
            self.assertEqual(read(prefix + ".pub"), case["pub_file"].encode())
            self.assertEqual(read(prefix + ".key"), case["key_file"].encode())

    def test_kemgen_modes_and_pair(self) -> None:
        """kemgen writes a 0644 .pub and a 0600 .key whose seed derives the public key."""
        prefix = self.path("server")
        key_id = kemgen(prefix, key_id=5, random=fixed_random(b"\x07" * 32))
        self.assertEqual((key_id, mode_of(prefix + ".pub"), mode_of(prefix + ".key")),
                         (5, 0o644, 0o600))
        self.assertEqual(load_kem_public_file(prefix + ".pub"),
                         (5, public_key_from_seed(b"\x07" * 32)))
        self.assertEqual(load_kem_secret_file(prefix + ".key").first(), (5, b"\x07" * 32))

    def test_kemgen_checks_both_files(self) -> None:
        """kemgen writes nothing if either PREFIX.pub or PREFIX.key already exists."""
        for existing, other in ((".key", ".pub"), (".pub", ".key")):
            prefix = self.path("p" + existing[1:])
            write_secret_file(prefix + existing, "old\n")
            err = self.assertRaises(KeyFileError, kemgen, prefix)
            self.assertEqual((err.reason, err.path), ("FileExists", prefix + existing))
            self.assertFalse(os.path.exists(prefix + other))
            self.assertEqual(read(prefix + existing), b"old\n")

    def test_kemgen_force(self) -> None:
        """kemgen with force replaces both files with the new pair."""
        prefix = self.path("s")
        kemgen(prefix, key_id=1, random=fixed_random(b"\x01" * 32))
        kemgen(prefix, force=True, key_id=2, random=fixed_random(b"\x02" * 32))
        self.assertEqual(load_kem_public_file(prefix + ".pub")[0], 2)
        self.assertEqual(load_kem_secret_file(prefix + ".key").first(), (2, b"\x02" * 32))
