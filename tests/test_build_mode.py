"""Which data path this test run uses, and how :mod:`tigertunnel.wire.implementation` picks it.

tox's default environment sets ``TIGERTUNNEL_REQUIRE_COMPILED=1``: there the
compiled extension must have been built and be in use, so a build that
silently fell back to pure Python fails CI instead of passing on the
fallback. The ``pure`` environment sets ``TIGERTUNNEL_PURE=1``: there every
module must use its pure-Python classes.

The chooser itself is tested with fake extension modules: a constant that
differs, a missing build hash, a build from other source, a pyaegis it
cannot use.
"""

import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

from twisted.trial.unittest import SynchronousTestCase

import tigertunnel
from tigertunnel.crypto import aead, libaegis
from tigertunnel.wire import datapath, frames, implementation
from tigertunnel.wire.implementation import (
    PURE,
    PURE_VARIABLE,
    REQUIRE_VARIABLE,
    CompiledPathError,
    Extension,
    choose,
    wire_constants,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tigertunnel.__file__)))
HASH = "ab" * 32


def _wanted(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def fake_extension(**changes: Any) -> Any:
    """A stand-in for the extension: the right constants and hash, with ``changes``."""
    bound = []
    attributes: Dict[str, Any] = dict(wire_constants(), BUILD_HASH=HASH,
                                      FrameParser=object, FrameSealer=object,
                                      FrameOpener=object, FrameEncoder=object,
                                      MuxReceiver=object,
                                      bind_aegis=lambda e, d: bound.append((e, d)))
    attributes.update(changes)
    module = SimpleNamespace(**{k: v for k, v in attributes.items() if v is not None})
    module.bound = bound
    return module


def pick(module: Any, environ: Optional[Dict[str, str]] = None,
         source: Optional[str] = HASH,
         addresses: Optional[Any] = None) -> implementation.Choice:
    """Run the chooser on ``module`` with ``environ``."""
    def load() -> Extension:
        if isinstance(module, Exception):
            raise module
        extension: Extension = module
        return extension

    def found() -> Tuple[int, int]:
        return 1, 2

    return choose(environ or {}, load, addresses or found, lambda: source)


class BuildModeTests(SynchronousTestCase):
    """The data path in use is the one the test environment asked for."""

    def test_compiled_when_required(self) -> None:
        """With TIGERTUNNEL_REQUIRE_COMPILED set, the extension is loaded and the active classes come from it."""
        if not _wanted(REQUIRE_VARIABLE):
            raise self.skipTest(f"{REQUIRE_VARIABLE} is not set")
        self.assertIsNotNone(implementation.EXTENSION, implementation.REASON)
        self.assertEqual(implementation.REASON, "")
        active = implementation.ACTIVE
        self.assertIs(implementation.COMPILED, active)
        self.assertEqual(active.name, "c")
        for cls in (active.FrameParser, active.FrameSealer, active.FrameOpener,
                    active.FrameEncoder, active.MuxReceiver):
            self.assertEqual(getattr(cls, "__module__"), "tigertunnel.wire._hotpath", cls)

    def test_pure_when_forced(self) -> None:
        """With TIGERTUNNEL_PURE set, no active class comes from the extension."""
        if not _wanted(PURE_VARIABLE):
            raise self.skipTest(f"{PURE_VARIABLE} is not set")
        self.assertIsNone(implementation.EXTENSION)
        self.assertIs(implementation.ACTIVE, PURE)
        self.assertIsNone(implementation.COMPILED)

    def test_names_are_the_pure_classes(self) -> None:
        """Whatever runs, the module names of the data-path classes are the pure-Python reference."""
        for cls in (frames.FrameParser, aead.FrameSealer, aead.FrameOpener,
                    datapath.FrameEncoder, datapath.MuxReceiver):
            self.assertNotEqual(cls.__module__, "tigertunnel.wire._hotpath", cls)
        self.assertEqual([PURE.FrameParser, PURE.FrameSealer, PURE.FrameOpener,
                          PURE.FrameEncoder, PURE.MuxReceiver],
                         [frames.FrameParser, aead.FrameSealer, aead.FrameOpener,
                          datapath.FrameEncoder, datapath.MuxReceiver])


class ChooserTests(SynchronousTestCase):
    """:func:`~tigertunnel.wire.implementation.choose` uses the extension only when it matches."""

    def test_matching_extension_is_chosen_and_bound(self) -> None:
        """An extension with every constant and the source's hash is chosen, and given libaegis."""
        module = fake_extension()
        choice = pick(module)
        self.assertEqual((choice.implementation.name, choice.reason, choice.refused),
                         ("c", "", False))
        self.assertIs(choice.implementation.MuxReceiver, module.MuxReceiver)
        self.assertIs(choice.extension, module)
        self.assertEqual(module.bound, [(1, 2)])

    def test_forced_pure(self) -> None:
        """TIGERTUNNEL_PURE=1 picks the pure classes without loading the extension."""
        def boom() -> Extension:
            raise AssertionError("loaded")
        choice = choose({PURE_VARIABLE: "1"}, boom, lambda: (1, 2), lambda: HASH)
        self.assertIs(choice.implementation, PURE)
        self.assertEqual(choice.reason, f"{PURE_VARIABLE} is set")
        self.assertFalse(choice.refused)

    def test_pure_zero_is_not_forcing(self) -> None:
        """TIGERTUNNEL_PURE=0 does not force the pure classes."""
        self.assertEqual(pick(fake_extension(), {PURE_VARIABLE: "0"}).implementation.name, "c")

    def test_not_built(self) -> None:
        """A missing extension gives the pure classes, not counted as a refusal."""
        choice = pick(ImportError("No module named '_hotpath'"))
        self.assertIs(choice.implementation, PURE)
        self.assertIn("not built", choice.reason)
        self.assertFalse(choice.refused)

    def test_each_constant_is_compared(self) -> None:
        """An extension whose value of any one wire constant differs is refused, naming it."""
        for name, value in wire_constants().items():
            wrong = value + b"!" if isinstance(value, bytes) else int(value) + 1  # type: ignore[call-overload]
            module = fake_extension(**{name: wrong})
            choice = pick(module)
            self.assertIs(choice.implementation, PURE, name)
            self.assertTrue(choice.refused, name)
            self.assertIn(f"its {name} is {wrong!r}", choice.reason)
            self.assertEqual(module.bound, [], name)

    def test_missing_constant(self) -> None:
        """An extension that exports no MAX_TYPE (an older build) is refused."""
        choice = pick(fake_extension(MAX_TYPE=None))
        self.assertIs(choice.implementation, PURE)
        self.assertIn("exports no MAX_TYPE", choice.reason)

    def test_missing_build_hash(self) -> None:
        """An extension without a build hash is refused."""
        for value in (None, ""):
            choice = pick(fake_extension(BUILD_HASH=value))
            self.assertIs(choice.implementation, PURE)
            self.assertIn("no BUILD_HASH", choice.reason)

    def test_stale_build(self) -> None:
        """An extension built from another _hotpath.c than the one beside it is refused."""
        choice = pick(fake_extension(), source="cd" * 32)
        self.assertIs(choice.implementation, PURE)
        self.assertIn("built from another _hotpath.c", choice.reason)

    def test_no_source_beside_it(self) -> None:
        """Without the source (an installed package), the constants alone decide."""
        self.assertEqual(pick(fake_extension(), source=None).implementation.name, "c")

    def test_pyaegis_refused(self) -> None:
        """An extension that cannot use the installed pyaegis is refused, with libaegis' reason."""
        def refuse() -> Tuple[int, int]:
            raise libaegis.LibaegisError("pyaegis 0.4.0 is outside the tested range")
        module = fake_extension()
        choice = pick(module, addresses=refuse)
        self.assertIs(choice.implementation, PURE)
        self.assertTrue(choice.refused)
        self.assertIn("pyaegis 0.4.0 is outside the tested range", choice.reason)
        self.assertEqual(module.bound, [])

    def test_required_raises(self) -> None:
        """With TIGERTUNNEL_REQUIRE_COMPILED=1, a refused or missing extension raises instead."""
        for module, source in ((fake_extension(TAG_SIZE=32), HASH),
                               (fake_extension(), "cd" * 32),
                               (ImportError("not built"), HASH)):
            with self.assertRaises(CompiledPathError) as caught:
                pick(module, {REQUIRE_VARIABLE: "1"}, source=source)
            self.assertIn(REQUIRE_VARIABLE, str(caught.exception))

    def test_required_and_matching(self) -> None:
        """With TIGERTUNNEL_REQUIRE_COMPILED=1, a matching extension is simply chosen."""
        self.assertEqual(pick(fake_extension(), {REQUIRE_VARIABLE: "1"}).implementation.name, "c")

    def test_forced_pure_wins_over_required(self) -> None:
        """TIGERTUNNEL_PURE=1 picks the pure classes even with TIGERTUNNEL_REQUIRE_COMPILED=1."""
        choice = pick(ImportError("not built"), {PURE_VARIABLE: "1", REQUIRE_VARIABLE: "1"})
        self.assertIs(choice.implementation, PURE)

    def test_real_extension_matches(self) -> None:
        """The extension built in this checkout exports the Python modules' constants and its source's hash."""
        try:
            from tigertunnel.wire import _hotpath
        except ImportError as e:
            raise self.skipTest(f"the extension is not built ({e})")
        implementation.check_extension(_hotpath, implementation.source_hash())
        self.assertEqual(_hotpath.BUILD_HASH, implementation.source_hash())


class ImportTests(SynchronousTestCase):
    """Importing the chooser: one warning when it refuses the extension, an error when required."""

    def run_child(self, code: str, **env: str) -> "subprocess.CompletedProcess[str]":
        """Run ``code`` in a fresh interpreter with the extension's TAG_SIZE patched to 32."""
        prelude = ("import tigertunnel.wire._hotpath as h\n"
                   "h.TAG_SIZE = 32\n")
        environ = {k: v for k, v in os.environ.items()
                   if k not in (PURE_VARIABLE, REQUIRE_VARIABLE)}
        environ.update(env)
        return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, env=environ,
                              capture_output=True, text=True, timeout=120)

    def setUp(self) -> None:
        try:
            from tigertunnel.wire import _hotpath  # noqa: F401
        except ImportError as e:
            raise self.skipTest(f"the extension is not built ({e})")

    def test_mismatch_falls_back_with_one_line(self) -> None:
        """A patched constant makes the import use pure Python and log one warning naming it."""
        done = self.run_child(
            "from twisted.logger import globalLogBeginner, textFileLogObserver\n"
            "import sys\n"
            "globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])\n"
            "from tigertunnel.wire import implementation as i\n"
            "print('ACTIVE', i.ACTIVE.name)\n")
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = [line for line in done.stdout.splitlines() if "data path" in line]
        self.assertEqual(len(lines), 1, done.stdout)
        self.assertIn("its TAG_SIZE is 32, the Python modules' is 16", lines[0])
        self.assertIn("ACTIVE python", done.stdout)

    def test_mismatch_raises_when_required(self) -> None:
        """With TIGERTUNNEL_REQUIRE_COMPILED=1, a patched constant makes the import fail."""
        done = self.run_child("from tigertunnel.wire import implementation\n",
                              **{REQUIRE_VARIABLE: "1"})
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("CompiledPathError", done.stderr)
        self.assertIn("its TAG_SIZE is 32", done.stderr)
