"""Tests for tigertunnel.keys.files: reading key files with permission checks, writing them safely."""

from __future__ import annotations

import os

from tests.keydir import KeyDirCase, mode_of, read

from tigertunnel.errors import KeyFileError
from tigertunnel.keys.files import (
    MAX_KEY_FILE_SIZE,
    load_kem_public_file,
    load_kem_secret_file,
    load_psk_file,
    write_public_file,
    write_secret_file,
)
from tigertunnel.keys.format import U64_MAX, format_key_line
from tests.helpers import load_vectors, unhex

XWING = load_vectors("xwing")
HEX64 = "0123456789abcdef" * 4


class LoadTests(KeyDirCase):
    """Loading key files from disk."""

    def test_kem_files_load(self) -> None:
        """Every case's files, written to disk, load through the KEM file loaders."""
        d = self.dir
        for case in XWING["cases"]:
            prefix = os.path.join(d, case["key_id"])
            write_public_file(prefix + ".pub", case["pub_file"])
            write_secret_file(prefix + ".key", case["key_file"])
            key_id = int(case["key_id"])
            self.assertEqual(load_kem_public_file(prefix + ".pub"),
                             (key_id, unhex(case["public_key"])))
            self.assertEqual(load_kem_secret_file(prefix + ".key").first(),
                             (key_id, unhex(case["seed"])))

    def test_insecure_permissions(self) -> None:
        """Secret files with any group or other permission are refused with the chmod hint."""
        for loader in (load_psk_file, load_kem_secret_file):
            for mode in (0o644, 0o640, 0o604, 0o620, 0o660):
                p = self.path("insecure.key")
                write_secret_file(p, format_key_line(1, bytes(32)), force=True)
                os.chmod(p, mode)
                err = self.assertRaises(KeyFileError, loader, p)
                self.assertEqual((err.reason, err.detail),
                                 ("InsecurePermissions", f"run: chmod 600 {p}"))
                self.assertNotIn("\n", str(err))
            os.chmod(p, 0o400)
            self.assertEqual(loader(p).ids(), [1])

    def test_public_file_may_be_world_readable(self) -> None:
        """A 0644 .pub file loads (only secret files are permission-checked)."""
        kem = XWING["cases"][0]
        p = self.path("a.pub")
        write_public_file(p, kem["pub_file"])
        self.assertEqual(load_kem_public_file(p)[0], int(kem["key_id"]))

    def test_unreadable(self) -> None:
        """A missing file or a directory is Unreadable with the OS reason."""
        for loader in (load_psk_file, load_kem_secret_file, load_kem_public_file):
            err = self.assertRaises(KeyFileError, loader, self.path("nope"))
            self.assertEqual(err.reason, "Unreadable")
            self.assertIn("No such file or directory", str(err))
        sub = self.path("dir")
        os.mkdir(sub, 0o700)
        err = self.assertRaises(KeyFileError, load_kem_public_file, sub)
        self.assertEqual(err.reason, "Unreadable")

    def test_line_number_from_file(self) -> None:
        """A bad line in a loaded file is reported with the file name and its line number."""
        p = self.path("psk.key")
        write_secret_file(p, f"# a\n# b\n1:{HEX64}\n\n2:{HEX64}x\n")
        err = self.assertRaises(KeyFileError, load_psk_file, p)
        self.assertEqual(str(err), f"{p}:5: InvalidKeySize (expected 64 hex digits, got 65)")

    def test_long_file_loads(self) -> None:
        """A key after a 2100-character comment loads (the reference truncates at 2048 bytes)."""
        p = self.path("psk.key")
        write_secret_file(p, "#" + "x" * 2100 + "\n" + format_key_line(3, b"\x33" * 32))
        self.assertGreater(os.path.getsize(p), 2048)
        self.assertEqual(load_psk_file(p).first(), (3, b"\x33" * 32))
        pub = self.path("k.pub")
        kem = XWING["cases"][2]
        write_public_file(pub, "\n# " + "y" * 3000 + "\n\n" + kem["pub_file"] + "\n")
        self.assertEqual(load_kem_public_file(pub)[0], U64_MAX)

    def test_oversized_file(self) -> None:
        """A file larger than MAX_KEY_FILE_SIZE is refused rather than read without bound."""
        p = self.path("big.key")
        write_secret_file(p, format_key_line(1, bytes(32)) + "#" * MAX_KEY_FILE_SIZE)
        err = self.assertRaises(KeyFileError, load_psk_file, p)
        self.assertEqual(err.reason, "InvalidKeyFormat")


class KindTests(KeyDirCase):
    """A key file given to an option of another kind says so first."""

    def kem_pair(self, prefix: str) -> str:
        """Write kemgen-style PREFIX.pub (0644) and PREFIX.key (0600); return the prefix path."""
        case = XWING["cases"][0]
        path = self.path(prefix)
        write_public_file(path + ".pub", case["pub_file"])
        write_secret_file(path + ".key", case["key_file"])
        return path

    def test_public_key_as_psk_before_permissions(self) -> None:
        """A 0644 .pub given as -k or --kemsecret is named a KEM public key, not told to chmod 600."""
        pub = self.kem_pair("server-kem") + ".pub"
        for loader, wanted in ((load_psk_file, "-k takes a PSK file from tigertunnel keygen"),
                               (load_kem_secret_file, "--kemsecret takes kemgen's PREFIX.key")):
            err = self.assertRaises(KeyFileError, loader, pub)
            self.assertEqual(err.reason, "WrongKeyKind")
            self.assertIn("a KEM public key, kemgen's PREFIX.pub for the client's --kempublic",
                          err.detail)
            self.assertIn(wanted, err.detail)
            self.assertNotIn("chmod", str(err))

    def test_kem_secret_key_as_psk(self) -> None:
        """A kemgen PREFIX.key (its PREFIX.pub beside it, same key id) given as -k is named a KEM secret key."""
        prefix = self.kem_pair("server-kem")
        err = self.assertRaises(KeyFileError, load_psk_file, prefix + ".key")
        self.assertEqual(err.reason, "WrongKeyKind")
        self.assertIn(f"a KEM secret key, kemgen's PREFIX.key paired with {prefix}.pub "
                      f"for the server's --kemsecret", err.detail)
        # Given where it belongs, it loads.
        self.assertEqual(len(load_kem_secret_file(prefix + ".key")), 1)

    def test_psk_next_to_an_unrelated_pub_loads(self) -> None:
        """A PSK file whose name ends in .key loads when the .pub beside it has another key id."""
        prefix = self.kem_pair("server-kem")
        write_secret_file(self.path("psk.key"), format_key_line(5, bytes(32)))
        os.rename(prefix + ".pub", self.path("psk.pub"))
        self.assertEqual(load_psk_file(self.path("psk.key")).ids(), [5])


class WriteTests(KeyDirCase):
    """Writing key files: exact modes, no silent overwrite, atomic replacement."""

    def test_secret_file_0600_whatever_the_umask(self) -> None:
        """write_secret_file creates a 0600 file even under umask 000."""
        self.set_umask(0)
        p = self.path("psk.key")
        write_secret_file(p, "1:00\n")
        self.assertEqual((read(p), mode_of(p)), (b"1:00\n", 0o600))

    def test_no_overwrite(self) -> None:
        """write_secret_file refuses an existing file, says how to replace it and leaves it untouched."""
        p = self.path("psk.key")
        write_secret_file(p, "old\n")
        err = self.assertRaises(KeyFileError, write_secret_file, p, "new\n")
        self.assertEqual((err.reason, err.detail), ("FileExists", "use --force to replace it"))
        self.assertIn(p, str(err))
        self.assertEqual(read(p), b"old\n")

    def test_force_replaces(self) -> None:
        """With force an existing 0644 file is replaced by a 0600 one and no temp file is left."""
        p = self.path("psk.key")
        write_public_file(p, "old\n")
        write_secret_file(p, "new\n", force=True)
        self.assertEqual((read(p), mode_of(p)), (b"new\n", 0o600))
        self.assertEqual(os.listdir(self.dir), ["psk.key"])

    def test_no_overwrite_symlink(self) -> None:
        """A dangling symlink at the path is not followed: FileExists."""
        p = self.path("link.key")
        os.symlink(self.path("elsewhere"), p)
        err = self.assertRaises(KeyFileError, write_secret_file, p, "x\n")
        self.assertEqual(err.reason, "FileExists")
        self.assertFalse(os.path.exists(self.path("elsewhere")))

    def test_public_file_mode(self) -> None:
        """write_public_file creates 0644 files, also when forced."""
        self.set_umask(0o077)
        p = self.path("k.pub")
        write_public_file(p, "1:00\n")
        self.assertEqual(mode_of(p), 0o644)
        self.assertRaises(KeyFileError, write_public_file, p, "2:00\n")
        write_public_file(p, "2:00\n", force=True)
        self.assertEqual((read(p), mode_of(p)), (b"2:00\n", 0o644))

    def test_unwritable(self) -> None:
        """Writing into a missing directory is Unwritable with the OS reason."""
        p = self.path("missing/psk.key")
        for force in (False, True):
            err = self.assertRaises(KeyFileError, write_secret_file, p, "x\n", force)
            self.assertEqual(err.reason, "Unwritable")
            self.assertIn("No such file", err.detail)
