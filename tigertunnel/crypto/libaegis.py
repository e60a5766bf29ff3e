"""The libaegis functions the compiled data path calls, from the installed pyaegis.

The compiled data path (:mod:`tigertunnel.wire._hotpath`) does not link
against libaegis: it calls ``aegis128x2_encrypt_detached`` and
``aegis128x2_decrypt_detached`` through the addresses of the copy pyaegis
loaded, which pyaegis exposes only through its cffi module
``pyaegis._aegis_ffi``, not a public API. So :func:`aegis_addresses` hands
them out only when

* the installed pyaegis is in :data:`TESTED_PYAEGIS` (the range
  ``setup.cfg`` pins and the suite runs with), and
* its cffi module has both functions, with the C signature the compiled
  data path was written for (:data:`SIGNATURE`).

Anything else raises :class:`LibaegisError`, whose message says what was
found; the data path then uses its pure-Python classes
(:mod:`tigertunnel.wire.implementation`), which use only pyaegis' public
API.
"""

import importlib.metadata
from types import ModuleType
from typing import Callable, Optional, Tuple

__all__ = ["TESTED_PYAEGIS", "FUNCTIONS", "SIGNATURE", "LibaegisError",
           "parse_version", "aegis_addresses"]

#: The pyaegis releases tested with the compiled data path: at least the
#: first, below the second (``setup.cfg`` pins the same range).
TESTED_PYAEGIS: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((0, 3, 1), (0, 4))

#: The libaegis functions the compiled data path calls.
FUNCTIONS = ("aegis128x2_encrypt_detached", "aegis128x2_decrypt_detached")

#: Their C type as cffi spells it (libaegis' ``aegis128x2.h``: output,
#: tag, tag length, input, input length, AD, AD length, nonce, key).
SIGNATURE = ("int(*)(uint8_t *, uint8_t *, size_t, uint8_t *, size_t, "
             "uint8_t *, size_t, uint8_t *, uint8_t *)")


class LibaegisError(Exception):
    """The installed pyaegis cannot give the compiled data path its libaegis."""


def parse_version(text: str) -> Tuple[int, ...]:
    """The leading numeric release of a version string (``"0.3.1"`` -> ``(0, 3, 1)``).

    :raises LibaegisError: ``text`` does not start with a number.
    """
    parts = []
    for part in text.split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(part):
            break
    if not parts:
        raise LibaegisError(f"pyaegis version {text!r} is not a release number")
    return tuple(parts)


def _installed_version() -> str:
    return importlib.metadata.version("pyaegis")


def _load_ffi() -> ModuleType:
    from pyaegis import _aegis_ffi
    module: ModuleType = _aegis_ffi
    return module


def aegis_addresses(version: Optional[Callable[[], str]] = None,
                    load_ffi: Optional[Callable[[], ModuleType]] = None) -> Tuple[int, int]:
    """The addresses of libaegis' encrypt and decrypt functions, as pyaegis loaded them.

    :param version: returns the installed pyaegis version (tests pass
        another).
    :param load_ffi: returns pyaegis' cffi module (tests pass another).
    :raises LibaegisError: pyaegis is outside :data:`TESTED_PYAEGIS`, or its
        cffi module lacks a function or has it with another signature.
    """
    try:
        found = (version or _installed_version)()
    except importlib.metadata.PackageNotFoundError:
        raise LibaegisError("pyaegis is not installed (no distribution metadata)") from None
    low, high = TESTED_PYAEGIS
    if not low <= parse_version(found) < high:
        raise LibaegisError(
            f"pyaegis {found} is outside the tested range "
            f">= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}")
    try:
        module = (load_ffi or _load_ffi)()
        ffi, lib = module.ffi, module.lib
    except (ImportError, AttributeError) as e:
        raise LibaegisError(f"pyaegis {found} has no usable cffi module ({e})") from None
    addresses = []
    for name in FUNCTIONS:
        try:
            function = getattr(lib, name)
            ctype = ffi.getctype(ffi.typeof(function))
        except (AttributeError, TypeError) as e:
            raise LibaegisError(f"pyaegis {found} does not expose {name} ({e})") from None
        if ctype != SIGNATURE:
            raise LibaegisError(f"pyaegis {found} has {name} as {ctype}, not {SIGNATURE}")
        addresses.append(int(ffi.cast("uintptr_t", function)))
    return addresses[0], addresses[1]
