"""Shared test fixtures: reference vectors and the recorded TigerBeetle traces."""

import json
import os
from typing import Any

from tigertunnel.tools.traces import TraceFrame, load_trace  # noqa: F401 (re-export)

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "vectors")


def load_vectors(name: str) -> Any:
    """Return the parsed JSON of ``tests/vectors/<name>.json``.

    These files are byte-identical copies of ``shared/vectors`` (made by
    running the Zig reference implementation).
    """
    with open(os.path.join(VECTORS, name + ".json")) as f:
        return json.load(f)


def unhex(s: str) -> bytes:
    """Decode a lowercase hex string from a vector file."""
    return bytes.fromhex(s)
