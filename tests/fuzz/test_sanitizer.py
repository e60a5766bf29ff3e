"""The sanitizer build runs instrumented code: a planted fault in the extension aborts.

``tox -e fuzz`` sets ``TIGERTUNNEL_SANITIZE=1`` for the build (``setup.py``
then compiles the extension with ASan and UBSan and a self-test entry,
``_sanitizer_selftest``) and for the run, where these tests require that
build. Each fault runs in a child process, which must abort with the
sanitizer's report; the same child without the fault must exit cleanly.
Elsewhere these tests are skipped.
"""

import os
import subprocess
import sys
from typing import Tuple

from twisted.trial.unittest import SynchronousTestCase

import tigertunnel
from tigertunnel.wire import implementation

SANITIZE_VARIABLE = "TIGERTUNNEL_SANITIZE"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tigertunnel.__file__)))


def run_child(statement: str) -> Tuple[int, str]:
    """Exit status and stderr of a Python child that imports the extension and runs ``statement``."""
    env = dict(os.environ)
    for name in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):  # the report on stderr, not in a file
        env[name] = ":".join(o for o in env.get(name, "").split(":")
                             if o and not o.startswith("log_path="))
    child = subprocess.run(
        [sys.executable, "-c", f"from tigertunnel.wire import _hotpath\n{statement}"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, timeout=120)
    return child.returncode, child.stderr.decode(errors="replace")


class SanitizerTests(SynchronousTestCase):
    """Under TIGERTUNNEL_SANITIZE the extension is instrumented, and a fault in it is caught."""

    def setUp(self) -> None:
        if os.environ.get(SANITIZE_VARIABLE, "") in ("", "0"):
            raise self.skipTest(f"{SANITIZE_VARIABLE} is not set (not the sanitizer build)")

    def test_built_with_sanitizers(self) -> None:
        """The extension in use was compiled with AddressSanitizer and the self-test entry."""
        module = implementation.EXTENSION
        self.assertIsNotNone(module, implementation.REASON)
        assert module is not None
        self.assertIn("address-sanitizer", getattr(module, "BUILD_FEATURES"))
        self.assertIn("sanitizer-selftest", getattr(module, "BUILD_FEATURES"))

    def test_clean_child(self) -> None:
        """A child that only loads the instrumented extension exits 0 (the aborts below come from the faults)."""
        status, err = run_child("assert 'address-sanitizer' in _hotpath.BUILD_FEATURES")
        self.assertEqual(status, 0, err)

    def test_heap_overread_aborts(self) -> None:
        """A read one byte past a heap block in the extension aborts with ASan's heap-buffer-overflow report."""
        status, err = run_child("_hotpath._sanitizer_selftest('heap-read')")
        self.assertNotEqual(status, 0, err)
        self.assertIn("AddressSanitizer: heap-buffer-overflow", err)
        self.assertIn("sanitizer_selftest", err)

    def test_undefined_shift_aborts(self) -> None:
        """A shift wider than an int in the extension aborts with UBSan's report."""
        status, err = run_child("_hotpath._sanitizer_selftest('shift')")
        self.assertNotEqual(status, 0, err)
        self.assertIn("runtime error: shift exponent 40 is too large", err)
