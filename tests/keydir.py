"""A test case with a fresh directory for key files, and small file probes."""

import os
import stat

from twisted.trial.unittest import SynchronousTestCase


def read(path: str) -> bytes:
    """Return the bytes of ``path``."""
    with open(path, "rb") as f:
        return f.read()


def mode_of(path: str) -> int:
    """Return the permission bits of ``path``."""
    return stat.S_IMODE(os.stat(path).st_mode)


class KeyDirCase(SynchronousTestCase):
    """A fresh directory per test, and a umask set for one test only."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def path(self, name: str) -> str:
        """A path in this test's directory."""
        return os.path.join(self.dir, name)

    def set_umask(self, mask: int) -> None:
        """Set the process umask for this test only."""
        old = os.umask(mask)
        self.addCleanup(os.umask, old)
