"""Where the tests find ``promtool`` (Prometheus' checker), when it is there.

``TIGERTUNNEL_PROMTOOL`` names the binary; otherwise ``promtool`` on the
PATH. Debian ships it in the ``prometheus`` package: ``apt-get download
prometheus && dpkg -x prometheus_*.deb pkg`` gives ``pkg/usr/bin/promtool``
without installing the server (``.ci/run`` does this before the tests).
Tests that need it skip, with this reason, when it is absent.
"""

import os
import shutil
import subprocess
from typing import List, Optional, Tuple

#: The environment variable naming the promtool binary.
PROMTOOL_ENV = "TIGERTUNNEL_PROMTOOL"
#: Why promtool tests skip when it cannot be found.
MISSING = (f"promtool not found (set {PROMTOOL_ENV}, or put it on the PATH: "
           f"apt-get download prometheus; dpkg -x prometheus_*.deb DIR)")


def find() -> Optional[str]:
    """The promtool binary to use, or ``None``."""
    named = os.environ.get(PROMTOOL_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("promtool")


def run(promtool: str, args: List[str], stdin: bytes = b"") -> Tuple[int, str]:
    """Run ``promtool ARGS`` (60 s at most): (exit status, stdout and stderr)."""
    done = subprocess.run([promtool, *args], input=stdin, capture_output=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")
