"""Reading and writing key files, with their permissions.

Deliberate differences from the reference (docs/protocol.rst §11, items 9
and 29): the whole file is read (the reference silently truncates at 2048,
1376 or 2454 bytes); secret files are created with mode 0600 and refused when
group or others have any access to them, or when they belong to a user
other than the one reading them or root (that user could replace the key);
existing files are never overwritten without ``force``.

The content is parsed by :mod:`tigertunnel.keys.format`. Every failure is a
:class:`~tigertunnel.errors.KeyFileError` naming the file and the reference's
error name (``Unreadable``, ``InsecurePermissions``, ``FileExists``,
``Unwritable``, or a format error); messages never contain key material.
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
import tempfile
from typing import Iterable

from tigertunnel.crypto.kdf import PSK_SIZE
from tigertunnel.crypto.kem import PUBLIC_KEY_SIZE, SECRET_KEY_SIZE
from tigertunnel.errors import KeyFileError
from tigertunnel.keys.format import KeyStore, first_key, parse_key_text, parse_public_key_text

#: Guard against pointing a key option at a huge file or a device such as
#: ``/dev/zero``; a full file of 16 public keys with comments is ~40 KiB.
MAX_KEY_FILE_SIZE = 1 << 20

_INSECURE_BITS = stat.S_IRWXG | stat.S_IRWXO


def trusted_owners(extra: Iterable[int] = ()) -> frozenset[int]:
    """The users a secret key file may belong to: this process's effective
    user, root, and ``extra`` (the user ``twistd -u`` will switch to)."""
    return frozenset({os.geteuid(), 0, *extra})


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"


#: The kinds of key file, by the option that takes them.
PSK = "-k"
#: The option that names a KEM secret key file.
KEM_SECRET = "--kemsecret"
#: The option that names a KEM public key file.
KEM_PUBLIC = "--kempublic"


def _wrong_kind(path: str, data: bytes, kind: str) -> "KeyFileError | None":
    """The error for a key file of another kind than ``kind``, if it is one.

    A KEM public key is told by its size (1216 bytes); a KEM secret key has
    the size of a PSK (32 bytes) and is told by the ``PREFIX.pub`` that
    kemgen wrote next to it with the same key id.
    """
    found = first_key(data)
    if found is None:
        return None
    key_id, size = found
    wanted = {PSK: "-k takes a PSK file from tigertunnel keygen",
              KEM_SECRET: "--kemsecret takes kemgen's PREFIX.key"}.get(kind, "")
    if size == PUBLIC_KEY_SIZE and kind != KEM_PUBLIC:
        return KeyFileError(path, "WrongKeyKind", None,
                            f"a KEM public key, kemgen's PREFIX.pub for the "
                            f"client's --kempublic; {wanted}")
    if size == SECRET_KEY_SIZE and kind == PSK and path.endswith(".key"):
        public = path[:-len(".key")] + ".pub"
        try:
            with open(public, "rb") as f:
                public_id, _ = parse_public_key_text(f.read(MAX_KEY_FILE_SIZE), public)
        except (OSError, KeyFileError):
            return None
        if public_id == key_id:
            return KeyFileError(path, "WrongKeyKind", None,
                                f"a KEM secret key, kemgen's PREFIX.key paired "
                                f"with {public} for the server's --kemsecret; {wanted}")
    return None


def read_key_file(path: str, secret: bool,
                  owners: "Iterable[int] | None" = None,
                  kind: "str | None" = None) -> bytes:
    """Return the whole content of a key file.

    :param secret: refuse the file if group or others have any access to it
        (like ssh, stricter than "can read": a group-writable secret key
        could be swapped by someone else), or if it belongs to a user not
        in ``owners``.
    :param owners: the users a secret file may belong to
        (:func:`trusted_owners` by default).
    :param kind: the option the file was given to (:data:`PSK`,
        :data:`~tigertunnel.keys.files.KEM_SECRET`,
        :data:`~tigertunnel.keys.files.KEM_PUBLIC`): a key file of another kind
        is refused as ``WrongKeyKind`` first, before its permissions are
        looked at (a public key needs no ``chmod``).
    :raises KeyFileError: ``Unreadable``, ``WrongKeyKind``,
        ``InsecurePermissions``, ``InsecureOwner``, or ``InvalidKeyFormat``
        for a file over :data:`MAX_KEY_FILE_SIZE` bytes.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_SIZE + 1)
            wrong = _wrong_kind(path, data, kind) if kind is not None else None
            if wrong is not None:
                raise wrong
            if secret and os.name == "posix":
                st = os.fstat(f.fileno())
                if st.st_mode & _INSECURE_BITS:
                    raise KeyFileError(path, "InsecurePermissions", None,
                                       f"run: chmod 600 {shlex.quote(path)}")
                allowed = trusted_owners() if owners is None else frozenset(owners)
                if st.st_uid not in allowed:
                    raise KeyFileError(
                        path, "InsecureOwner", None,
                        f"owned by uid {st.st_uid} ({_user_name(st.st_uid)}), "
                        f"not by this user (uid {os.geteuid()}) or root; chown "
                        f"it to the user the tunnel runs as")
    except OSError as e:
        raise KeyFileError(path, "Unreadable", None,
                           e.strerror or str(e)) from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise KeyFileError(path, "InvalidKeyFormat", None,
                           f"file is larger than {MAX_KEY_FILE_SIZE} bytes")
    return data


def load_psk_file(path: str, owners: "Iterable[int] | None" = None) -> KeyStore:
    """Load a PSK file (``-k``).

    :param owners: see :func:`read_key_file`.
    :return: the keys in file order; a client uses :meth:`~tigertunnel.keys.format.KeyStore.first`.
    :raises KeyFileError: see :func:`~tigertunnel.keys.format.parse_key_text`
        and :func:`read_key_file`.
    """
    return parse_key_text(read_key_file(path, secret=True, owners=owners, kind=PSK),
                          path, PSK_SIZE)


def load_kem_secret_file(path: str, owners: "Iterable[int] | None" = None) -> KeyStore:
    """Load a KEM secret key file (``--kemsecret``, ``PREFIX.key``).

    :param owners: see :func:`read_key_file`.
    :return: the X-Wing seeds in file order.
    :raises KeyFileError: see :func:`load_psk_file`.
    """
    return parse_key_text(read_key_file(path, secret=True, owners=owners,
                                        kind=KEM_SECRET), path, SECRET_KEY_SIZE)


def load_kem_public_file(path: str) -> tuple[int, bytes]:
    """Load a KEM public key file (``--kempublic``, ``PREFIX.pub``).

    :return: ``(key_id, public_key)``.
    :raises KeyFileError: see
        :func:`~tigertunnel.keys.format.parse_public_key_text`, and
        ``Unreadable``.
    """
    return parse_public_key_text(read_key_file(path, secret=False, kind=KEM_PUBLIC),
                                 path)


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


def refuse_existing(*paths: str) -> None:
    """Refuse to go on when any of ``paths`` exists (a dangling symlink counts).

    :raises KeyFileError: ``FileExists`` naming the first existing path.
    """
    for path in paths:
        if os.path.lexists(path):
            raise KeyFileError(path, "FileExists", None, "use --force to replace it")


def remove_quietly(path: str) -> None:
    """Remove ``path``; a file that is already gone or cannot be removed is left be."""
    try:
        os.unlink(path)
    except OSError:
        pass
