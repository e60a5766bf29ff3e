"""Recorded TigerBeetle traffic shipped with tigertunnel.

``tigertunnel/tools/data/*.jsonl.gz`` are gzip copies of real TigerBeetle 0.17.8
traces (a single replica, and a 3-replica cluster with every
replica-to-replica link): the demo, the benchmark and the tests push these
frames through the tunnel.
"""

import base64
import gzip
import json
import os
from dataclasses import dataclass
from typing import List

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SINGLE = "tb-0.17.8-single"
CLUSTER3 = "tb-0.17.8-cluster3"


@dataclass(frozen=True)
class TraceFrame:
    """One TB frame of a trace.

    :ivar link: ``client>r0``, ``r0>r1`` ...; :ivar conn: connection id;
    :ivar dir: ``up`` (from the connecting side) or ``down``;
    :ivar t: seconds since the recording relay started.
    """

    link: str
    conn: int
    dir: str
    command: str
    data: bytes
    t: float = 0.0


def load_trace(name: str) -> List[TraceFrame]:
    """Return every frame of trace ``name`` in recorded order."""
    frames = []
    with gzip.open(os.path.join(DATA, name + ".jsonl.gz"), "rt") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type") != "frame":
                continue
            frames.append(TraceFrame(rec["link"], rec["conn"], rec["dir"],
                                     rec["command_name"],
                                     base64.b64decode(rec["frame_b64"]),
                                     rec["t"]))
    return frames
