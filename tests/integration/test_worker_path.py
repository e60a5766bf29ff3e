"""A worker process never imports a module from the directory it was started in."""

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel import __version__
from tigertunnel.ops.workers.bootstrap import worker_command

#: A module that would shadow the package when the working directory is on sys.path.
PLANTED = """
open("planted-module-ran", "w").close()
print("planted module")
"""


class SafePathTests(SynchronousTestCase):
    """``worker_command`` keeps the working directory off the import path."""

    def run_in(self, directory: str, argv: list) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``directory``; bounded in time."""
        return subprocess.run(argv, cwd=directory, capture_output=True, text=True,
                              timeout=60)

    def test_planted_module_ignored(self) -> None:
        """With a tigertunnel.py in the working directory, a worker's command runs the real package; a plain ``python -m`` would have run the planted file."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "tigertunnel.py"), "w") as f:
            f.write(PLANTED)
        marker = os.path.join(directory, "planted-module-ran")
        worker = self.run_in(directory, worker_command(["--version"]))
        self.assertEqual(worker.returncode, 0, worker.stderr)
        self.assertTrue(worker.stdout.startswith(f"tigertunnel {__version__}; data path: "),
                        worker.stdout)
        self.assertFalse(os.path.exists(marker))
        # The control: without the flag the planted file is what runs.
        plain = self.run_in(directory, [sys.executable, "-m", "tigertunnel", "--version"])
        self.assertEqual(plain.stdout, "planted module\n")
        self.assertTrue(os.path.exists(marker))
