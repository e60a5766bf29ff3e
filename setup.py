"""Build script: everything is in setup.cfg except the optional C extension.

``tigertunnel.wire._hotpath`` is the compiled per-frame data path. It is
optional: where it cannot be built (no C compiler, no Python headers) the
package installs without it and runs on its pure-Python modules.

The extension is built hardened: stack protector, ``_FORTIFY_SOURCE=2``,
stack-clash and control-flow protection, and full RELRO (``-z relro -z
now``). Each flag is tried on a small program first and used only where
the compiler and linker accept it, so an older or different toolchain
still builds the extension, with what it supports.

``TIGERTUNNEL_SANITIZE=1`` in the environment builds it instead with
AddressSanitizer and UndefinedBehaviorSanitizer, for the differential fuzz
(``tox -e fuzz``, ``tests/fuzz/``): such a build only loads into a Python
started with the ASan runtime preloaded.
"""

import hashlib
import os
import shutil
import tempfile
from typing import Any, Callable, List, Tuple

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

#: The environment variable that asks for the sanitizer build.
SANITIZE_VARIABLE = "TIGERTUNNEL_SANITIZE"

WARNINGS = ["-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter",
            "-Wno-missing-field-initializers", "-Wno-cast-function-type"]

# (compile flags, link flags): each group is used whole or not at all.
HARDENING: List[Tuple[List[str], List[str]]] = [
    (["-fstack-protector-strong"], []),
    # Needs optimisation (Python's CFLAGS have -O2 or -O3); undefined first
    # so a toolchain that already defines it does not warn of a redefinition.
    (["-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=2"], []),
    (["-fstack-clash-protection"], []),
    (["-fcf-protection"], []),
    ([], ["-Wl,-z,relro", "-Wl,-z,now"]),
    ([], ["-Wl,-z,noexecstack"]),
]

SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
              "-fno-omit-frame-pointer"]

# A program that exercises what the flags act on: a local array (stack
# protector), a memcpy of unknown length (fortify) and a libc header (where
# glibc warns about _FORTIFY_SOURCE without optimisation).
PROBE = r"""
#include <string.h>
int tigertunnel_probe(const char *src, unsigned n)
{
    char buf[64];
    if (n > sizeof buf)
        n = sizeof buf;
    memcpy(buf, src, n);
    return buf[0];
}
"""


def _wanted(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def accepts(compiler: Any, cflags: List[str], lflags: List[str]) -> bool:
    """Whether ``compiler`` (a distutils compiler) builds the probe warning-free with these flags."""
    tmp = tempfile.mkdtemp(prefix="tigertunnel-probe-")
    # What the toolchain says goes to a file, not the build's output: a
    # complaint about a flag it lacks is expected, and a warning (GNU ld
    # only warns of an unknown -z keyword) counts as a refusal.
    saved = os.dup(2)
    said = os.open(os.path.join(tmp, "stderr"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.dup2(said, 2)
    try:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(PROBE)
        objects = compiler.compile([source], output_dir=tmp,
                                   extra_postargs=cflags + ["-Werror"])
        compiler.link_shared_object(objects, os.path.join(tmp, "probe.so"),
                                    extra_postargs=lflags + ["-Wl,--fatal-warnings"])
        with open(os.path.join(tmp, "stderr"), errors="replace") as f:
            complaint = f.read().lower()
        return "warning" not in complaint and "ignored" not in complaint
    except Exception:  # CompileError, LinkError: the toolchain lacks the flag
        return False
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(said)
        shutil.rmtree(tmp, ignore_errors=True)


def build_flags(sanitize: bool,
                accepted: Callable[[List[str], List[str]], bool]) -> Tuple[List[str], List[str]]:
    """The extra (compile, link) flags: the sanitizers, or each hardening group ``accepted``."""
    if sanitize:
        return SANITIZERS + ["-O1", "-g", "-DTIGERTUNNEL_SANITIZE=1"], list(SANITIZERS)
    compile_flags: List[str] = []
    link_flags: List[str] = []
    for cflags, lflags in HARDENING:
        if accepted(cflags, lflags):
            compile_flags += cflags
            link_flags += lflags
    return compile_flags, link_flags


class HardenedBuildExt(build_ext):
    """``build_ext`` that adds every hardening flag the toolchain accepts."""

    def build_extensions(self) -> None:
        compiler = self.compiler
        compile_flags, link_flags = build_flags(
            _wanted(SANITIZE_VARIABLE), lambda c, l: accepts(compiler, c, l))
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + compile_flags
            ext.extra_link_args = list(ext.extra_link_args or []) + link_flags
        super().build_extensions()


#: The extension's C source.
SOURCE = "tigertunnel/wire/_hotpath.c"


def source_hash(path: str = SOURCE) -> str:
    """The SHA-256 (hex) of ``path``: compiled into the extension as its
    ``BUILD_HASH``, which the import compares with the source beside it."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


if __name__ == "__main__":  # python setup.py, pip and build run it as __main__
    setup(
        cmdclass={"build_ext": HardenedBuildExt},
        ext_modules=[
            Extension(
                "tigertunnel.wire._hotpath",
                sources=[SOURCE],
                define_macros=[("TIGERTUNNEL_SOURCE_SHA256", f'"{source_hash()}"')],
                extra_compile_args=WARNINGS,
                optional=True,
            ),
        ],
    )
