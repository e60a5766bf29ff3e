"""``.ci/summarize.py``: one 'N passed, N failed' line over every tox environment.

Fed tox logs shaped like tox 4's (each environment's commands, trial's
closing lines, tox's report), it adds up every trial run, counts a tox
environment that failed without a failing trial summary (a crash, a failed
build, mypy) as one failure, and repeats the fuzz's case count.
"""

import importlib.util
import io
import os
import sys
from types import ModuleType
from typing import Tuple

from twisted.trial.unittest import SynchronousTestCase

import tigertunnel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tigertunnel.__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "summarize.py")


def trial(env: str, closing: str, ran: int = 5) -> str:
    """The log of one tox environment that ran trial."""
    return (f"{env}: commands_pre[0]> python setup.py -q build_ext --inplace --force\n"
            f"{env}: commands[0]> python -m twisted.trial --random=0 -j2 tests\n"
            f"tests.test_frames\n  FrameTests\n    test_x ...  [OK]\n"
            f"{'-' * 79}\nRan {ran} tests in 1.234s\n\n{closing}\n")


FUZZ_OK = ("fuzz: commands[0]> python -m tests.fuzz.sanitized /x/.tox/fuzz/tmp/tree tests.fuzz\n"
           "    test_twins_agree ... \n"
           "fuzz: 40000 cases in 140.2 s (cpu 270.1 s, 2 processes), seed 42, 0 differences "
           "(parser 8000)\n"
           "                [OK]\n" + f"{'-' * 79}\nRan 11 tests in 141.0s\n\n"
           "PASSED (successes=11)\n")
FUZZ_ABORTED = ("fuzz: commands[0]> python -m tests.fuzz.sanitized /x/.tox/fuzz/tmp/tree tests.fuzz\n"
                "    test_twins_agree ... \n"
                "==123==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6020\n")
MYPY_FAILED = ("mypy: commands[0]> mypy -p tigertunnel\n"
               "tigertunnel/x.py:1: error: oops\nFound 1 error in 1 file\n")


def report(*lines: str) -> str:
    """tox's closing report."""
    return "".join(f"  {line}\n" for line in lines) + "  evaluation failed :( (300 seconds)\n"


class SummaryTests(SynchronousTestCase):
    """The CI summary line covers every environment tox ran."""

    def setUp(self) -> None:
        if not os.path.exists(SCRIPT):
            raise self.skipTest("not run from a checkout (no .ci/summarize.py)")
        spec = importlib.util.spec_from_file_location("ci_summarize", SCRIPT)
        assert spec is not None and spec.loader is not None
        self.module: ModuleType = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)

    def summarize(self, log: str) -> Tuple[int, str, str]:
        """Exit status, stdout and stderr of the summary of ``log``."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(log)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = self.module.main(path)
        return status, out.getvalue(), err.getvalue()

    def test_all_passed(self) -> None:
        """Every environment's trial counts are added up; the fuzz's case count is repeated."""
        status, out, err = self.summarize(
            trial("py", "PASSED (skips=1, successes=4)") + trial("pure", "PASSED (successes=5)")
            + "mypy: commands[0]> mypy -p tigertunnel\nSuccess\n" + FUZZ_OK
            + "  py: OK\n  pure: OK\n  mypy: OK\n  fuzz: OK\n  congratulations :)\n")
        self.assertEqual((status, out), (0, "20 passed, 0 failed, 1 skipped\n"))
        self.assertIn("the fuzz ran 40000 cases, 0 differences", err)

    def test_fuzz_abort_fails(self) -> None:
        """A fuzz run killed by a sanitizer (no trial summary) counts as a failure."""
        status, out, err = self.summarize(
            trial("py", "PASSED (successes=5)") + FUZZ_ABORTED
            + report("py: OK", "fuzz: FAIL code 1 (160.00=setup[20.00]+cmd[140.00] seconds)"))
        self.assertEqual((status, out), (1, "5 passed, 1 failed, 0 skipped\n"))
        self.assertIn("tox environment fuzz failed", err)

    def test_mypy_failure_counts(self) -> None:
        """A failed environment that runs no trial (mypy) counts as one failure."""
        status, out, _ = self.summarize(
            trial("py", "PASSED (successes=5)") + MYPY_FAILED
            + report("py: OK", "mypy: FAIL code 1 (3.00 seconds)"))
        self.assertEqual((status, out), (1, "5 passed, 1 failed, 0 skipped\n"))

    def test_failing_tests_counted_once(self) -> None:
        """An environment whose trial run failed adds its failures, not one more."""
        status, out, err = self.summarize(
            trial("py", "FAILED (failures=2, successes=3)")
            + report("py: FAIL code 1 (30.00 seconds)"))
        self.assertEqual((status, out), (1, "3 passed, 2 failed, 0 skipped\n"))
        self.assertNotIn("tox environment", err)

    def test_nothing_ran(self) -> None:
        """A log without any trial summary fails."""
        status, out, _ = self.summarize("py: commands[0]> python -m twisted.trial tests\n"
                                        "ImportError: no\n" + report("py: FAIL code 1"))
        self.assertEqual((status, out), (1, "0 passed, 1 failed\n"))
