"""Process hardening, checked in a child process (it cannot be undone in the test runner)."""

import json
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.ops import hardening

CHILD = r"""
import json, os, resource
from tigertunnel.ops.hardening import harden_process, is_dumpable
before = is_dumpable()
result = harden_process()
with open("/proc/self/status") as f:
    status = f.read()
print(json.dumps({
    "before": before, "after": is_dumpable(),
    "not_dumpable": result.not_dumpable, "no_core_files": result.no_core_files,
    "problems": list(result.problems),
    "core_limit": list(resource.getrlimit(resource.RLIMIT_CORE)),
    "status_readable": "Pid:" in status,
}))
"""


class HardenTests(SynchronousTestCase):
    """harden_process in a real process."""

    def test_child_becomes_non_dumpable(self) -> None:
        """After harden_process, PR_GET_DUMPABLE says 0 and RLIMIT_CORE is 0 soft and hard."""
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        report = json.loads(out)
        self.assertEqual(report["before"], True)
        self.assertEqual(report["after"], False)
        self.assertEqual(report["problems"], [])
        self.assertTrue(report["not_dumpable"])
        self.assertTrue(report["no_core_files"])
        self.assertEqual(report["core_limit"], [0, 0])
        self.assertTrue(report["status_readable"])

    def test_runner_untouched(self) -> None:
        """Asking whether the test runner is dumpable does not change it."""
        self.assertTrue(hardening.is_dumpable())
        self.assertTrue(hardening.is_dumpable())
