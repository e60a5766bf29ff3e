"""Keep key material out of core files and away from same-user debuggers.

A tunnel process holds PSKs, KEM secret keys and session keys in memory. A
core dump writes them to disk (often into a world-readable crash
directory), and any process of the same user may attach a debugger or read
``/proc/PID/mem``. :func:`harden_process` closes both:

* ``prctl(PR_SET_DUMPABLE, 0)`` (Linux): no core file, no ``ptrace``
  attach and no ``/proc/PID/mem``, ``environ`` or ``fd/`` access by other
  processes of the same user (root with ``CAP_SYS_PTRACE`` still can);
  ``/proc/PID/stat`` and ``status`` stay readable;
* ``RLIMIT_CORE`` = 0, soft and hard (every POSIX system): no core file
  even where the first step is not available.

Both are per process and ``execve`` resets the dumpable flag, so each
worker process applies them itself, before it loads its keys. Side effect
worth knowing: profilers that attach to a running process (``py-spy
dump --pid``, ``perf`` on another user's process, ``gdb -p``) need root
afterwards.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any, Optional, Tuple

__all__ = ["Hardening", "applied", "harden_once", "harden_process", "is_dumpable"]

#: linux/prctl.h
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class Hardening:
    """What :func:`harden_process` achieved.

    :ivar not_dumpable: the process is no longer dumpable (Linux only).
    :ivar no_core_files: ``RLIMIT_CORE`` is 0.
    :ivar problems: one line per step that failed, for the log.
    """

    not_dumpable: bool
    no_core_files: bool
    problems: Tuple[str, ...] = ()


def _prctl() -> Optional[Any]:
    """libc's ``prctl`` (a ctypes function), or ``None`` off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.restype = ctypes.c_int
    return prctl


def is_dumpable() -> Optional[bool]:
    """Whether this process is dumpable (``None`` where that cannot be asked)."""
    prctl = _prctl()
    if prctl is None:
        return None
    value = int(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    if value < 0:
        return None
    return value != 0


def harden_process() -> Hardening:
    """Make this process non-dumpable and stop it writing core files.

    Never raises: a step that fails is reported in
    :attr:`Hardening.problems` (the caller logs it and decides).
    """
    problems = []
    not_dumpable = False
    prctl = _prctl()
    if prctl is None:
        problems.append(f"prctl(PR_SET_DUMPABLE) is not available on {sys.platform}")
    elif prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        problems.append(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(code)}")
    else:
        not_dumpable = is_dumpable() is False
    no_core = False
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        no_core = resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
    except (OSError, ValueError) as e:
        problems.append(f"setrlimit(RLIMIT_CORE, 0) failed: {e}")
    return Hardening(not_dumpable, no_core, tuple(problems))


_applied: Optional[Hardening] = None


def harden_once() -> Hardening:
    """:func:`harden_process`, once per process (the entry points call it
    before any key file is read); returns what it achieved."""
    global _applied
    if _applied is None:
        _applied = harden_process()
    return _applied


def applied() -> Optional[Hardening]:
    """What :func:`harden_once` achieved in this process, ``None`` if it was
    not called (a tunnel end built inside a test runner)."""
    return _applied
