"""The compiled extension is built hardened (``setup.py``), where the toolchain can.

The built module is read with ``readelf``: full RELRO is a ``GNU_RELRO``
segment plus ``BIND_NOW`` (the GOT is read-only once loaded), and the stack
protector shows as an import of ``__stack_chk_fail`` (the functions with
local arrays check their canary). The extension's ``BUILD_FEATURES`` says
what the compiler applied, from its predefined macros: ``fortify-2`` is
glibc's ``__USE_FORTIFY_LEVEL``, set only when ``_FORTIFY_SOURCE`` is
defined and the code is optimised (the current C has no call the compiler
cannot check at compile time, so no ``__*_chk`` import shows it).

These tests skip, saying why, where the extension is not in use, where
``readelf`` is missing, on a platform whose binaries are not ELF, and on
the sanitizer build (``tox -e fuzz``). ``setup.py`` itself is tested too:
it drops a flag the compiler refuses, so such a toolchain still builds the
extension.
"""

import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
from types import ModuleType
from typing import List, Tuple

from twisted.trial.unittest import SynchronousTestCase

import tigertunnel
from tigertunnel.wire import implementation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tigertunnel.__file__)))


def readelf(*args: str) -> str:
    """What ``readelf -W ARGS <the extension>`` prints."""
    path = getattr(implementation.EXTENSION, "__file__", None)
    assert path is not None
    return subprocess.run(["readelf", "-W", *args, path],
                          capture_output=True, text=True, timeout=60, check=True).stdout


class BuiltModuleTests(SynchronousTestCase):
    """The extension in use carries the hardening setup.py asks for."""

    def setUp(self) -> None:
        module = implementation.EXTENSION
        path = getattr(module, "__file__", None)
        if path is None:
            raise self.skipTest(f"the compiled data path is not in use: {implementation.REASON}")
        if shutil.which("readelf") is None:
            raise self.skipTest("readelf is not installed (binutils)")
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise self.skipTest(f"{path} is not an ELF file")
        self.features = getattr(module, "BUILD_FEATURES", ())
        if "address-sanitizer" in self.features:
            raise self.skipTest("the sanitizer build (TIGERTUNNEL_SANITIZE) is not hardened")

    def test_full_relro(self) -> None:
        """The module has a GNU_RELRO segment and is bound now (full RELRO)."""
        self.assertIn("GNU_RELRO", readelf("-l"))
        dynamic = readelf("-d")
        flags = [line for line in dynamic.splitlines() if "(FLAGS" in line]
        self.assertTrue(any("BIND_NOW" in line or " NOW" in line for line in flags),
                        dynamic)

    def test_stack_protector(self) -> None:
        """The module imports __stack_chk_fail and was compiled with -fstack-protector-strong."""
        imported = [line.split()[7] for line in readelf("--dyn-syms").splitlines()
                    if " UND " in line and len(line.split()) > 7]
        self.assertTrue(any(name.startswith("__stack_chk_fail") for name in imported),
                        imported)
        self.assertIn("stack-protector-strong", self.features)

    def test_fortify(self) -> None:
        """The module was compiled with _FORTIFY_SOURCE=2 in effect (glibc)."""
        if platform.libc_ver()[0] != "glibc":
            raise self.skipTest("_FORTIFY_SOURCE is a glibc feature")
        self.assertTrue({"fortify-2", "fortify-3"} & set(self.features), self.features)


def load_setup() -> ModuleType:
    """The checkout's ``setup.py`` as a module (it calls ``setup()`` only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("tigertunnel_setup",
                                                  os.path.join(ROOT, "setup.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SetupFlagsTests(SynchronousTestCase):
    """setup.py asks for each hardening flag only where the toolchain accepts it."""

    def setUp(self) -> None:
        if not os.path.exists(os.path.join(ROOT, "setup.py")):
            raise self.skipTest("not run from a checkout (no setup.py)")
        self.setup_module = load_setup()

    def test_refused_group_is_dropped(self) -> None:
        """A flag group the toolchain refuses is left out; the others stay, in order."""
        asked: List[Tuple[List[str], List[str]]] = []

        def accepted(cflags: List[str], lflags: List[str]) -> bool:
            asked.append((cflags, lflags))
            return "-fstack-clash-protection" not in cflags

        cflags, lflags = self.setup_module.build_flags(False, accepted)
        self.assertEqual(asked, self.setup_module.HARDENING)
        self.assertNotIn("-fstack-clash-protection", cflags)
        self.assertEqual(cflags[:3], ["-fstack-protector-strong", "-U_FORTIFY_SOURCE",
                                      "-D_FORTIFY_SOURCE=2"])
        self.assertIn("-Wl,-z,now", lflags)

    def test_sanitizer_build(self) -> None:
        """TIGERTUNNEL_SANITIZE's build takes ASan and UBSan and no hardening flag."""
        cflags, lflags = self.setup_module.build_flags(True, lambda c, l: True)
        self.assertIn("-fsanitize=address,undefined", cflags)
        self.assertIn("-fsanitize=address,undefined", lflags)
        self.assertIn("-DTIGERTUNNEL_SANITIZE=1", cflags)
        self.assertNotIn("-D_FORTIFY_SOURCE=2", cflags)

    def test_probe_with_the_real_compiler(self) -> None:
        """The probe accepts a flag the compiler has and refuses one it does not."""
        cc = (sysconfig.get_config_var("CC") or "").split()
        if not cc or shutil.which(cc[0]) is None:
            raise self.skipTest("no C compiler")
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler
        compiler = new_compiler()
        customize_compiler(compiler)
        accepts = self.setup_module.accepts
        self.assertTrue(accepts(compiler, ["-fstack-protector-strong"], []))
        self.assertFalse(accepts(compiler, ["-fno-such-flag-tigertunnel"], []))
        self.assertFalse(accepts(compiler, [], ["-Wl,-z,no-such-keyword-tigertunnel"]))
