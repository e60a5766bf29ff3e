"""The optional compiled data path, :mod:`tigertunnel.wire._hotpath`, if it can be used.

The extension is built at install time when a C compiler is there; without
one the package installs and runs on its pure-Python modules alone. Setting
``TIGERTUNNEL_PURE=1`` in the environment forces the pure-Python modules
even when the extension is installed.

:data:`hotpath` is the extension module, or ``None``; :data:`reason` says
why it is ``None``. The modules that have a compiled twin
(:mod:`tigertunnel.wire.frames`, :mod:`tigertunnel.crypto.aead`,
:mod:`tigertunnel.wire.datapath`) pick their classes from it at import.
"""

import os
from types import ModuleType
from typing import Optional, Tuple

__all__ = ["hotpath", "reason", "PURE_VARIABLE"]

#: The environment variable that forces the pure-Python modules.
PURE_VARIABLE = "TIGERTUNNEL_PURE"


def _load() -> Tuple[Optional[ModuleType], str]:
    if os.environ.get(PURE_VARIABLE, "") not in ("", "0"):
        return None, f"{PURE_VARIABLE} is set"
    try:
        from tigertunnel.wire import _hotpath
    except ImportError as e:
        return None, f"the extension is not built ({e})"
    return _hotpath, ""


#: The extension module, or ``None``; and why not, or ``""``.
hotpath, reason = _load()
