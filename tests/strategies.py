"""Hypothesis strategies shared by the test modules.

Mux frames are built here from PROTOCOL.md (sections 7.1, 7.2), independently
of the code under test, so tests can compare the parsers against these
hand-made encodings. TB frames come from the one TB-frame builder,
:func:`tigertunnel.tools.tbframes.make_tb_frame` (re-exported here).
"""

import struct
from typing import List, Optional

from hypothesis import strategies as st

from tigertunnel.tools.tbframes import make_tb_frame

MAGIC = b"XUMZ"
MAX_FRAME = 1 << 20

__all__ = ["make_tb_frame", "tb_frames", "chunked", "mux_header", "mux_units",
           "noisy_tb_streams", "noisy_mux_streams"]


@st.composite
def tb_frames(draw: st.DrawFn, max_body: int = 1500,
              cluster: Optional[int] = None) -> bytes:
    """A valid TB frame: zero paddings, arbitrary other header bytes and body."""
    body = draw(st.binary(max_size=max_body))
    fill = draw(st.binary(min_size=256, max_size=256))
    if cluster is None:
        cluster = draw(st.integers(0, (1 << 128) - 1))
    return make_tb_frame(body, fill, cluster)


@st.composite
def chunked(draw: st.DrawFn, data: bytes, max_cuts: int = 40) -> List[bytes]:
    """``data`` cut at arbitrary points (possibly empty chunks)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=max_cuts)))
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def mux_header(stream_id: int, frame_type: int, reserved: bytes = bytes(3)) -> bytes:
    """The 12-byte mux header, written from PROTOCOL.md 7.1."""
    return MAGIC + struct.pack("<I", stream_id) + bytes([frame_type]) + reserved


@st.composite
def mux_units(draw: st.DrawFn, encrypted: bool, max_body: int = 600) -> bytes:
    """One valid mux unit (header + payload) as a sender could put it on the wire.

    Encrypted payloads are random bytes with a valid clear size at offset 16;
    plaintext data payloads are TB frames with the size at offset 96.
    """
    stream_id = draw(st.integers(0, (1 << 32) - 1))
    frame_type = draw(st.sampled_from([0, 1, 2]))
    reserved = draw(st.binary(min_size=3, max_size=3))
    header = mux_header(stream_id, frame_type, reserved)
    if frame_type == 1 or (frame_type == 2 and not encrypted):
        return header
    if frame_type == 2:
        return header + draw(st.binary(min_size=256, max_size=256))
    size = 256 + draw(st.integers(0, max_body))
    payload = bytearray(draw(st.binary(min_size=size, max_size=size)))
    offset = 16 if encrypted else 96
    payload[offset:offset + 4] = struct.pack("<I", size)
    return header + bytes(payload)


def bad_size(draw: st.DrawFn) -> int:
    """A u32 outside 256 .. 1 MiB."""
    return draw(st.one_of(st.integers(0, 255),
                          st.integers(MAX_FRAME + 1, (1 << 32) - 1)))


@st.composite
def noisy_tb_streams(draw: st.DrawFn) -> bytes:
    """Valid TB frames mixed with garbage and frames whose size is out of range."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["frame", "garbage", "bad_size"]))
        if kind == "frame":
            parts.append(draw(tb_frames(max_body=400)))
        elif kind == "garbage":
            parts.append(draw(st.binary(max_size=300)))
        else:
            frame = bytearray(draw(tb_frames(max_body=50)))
            frame[96:100] = struct.pack("<I", bad_size(draw))
            parts.append(bytes(frame[:draw(st.integers(0, len(frame)))]))
    return b"".join(parts)


@st.composite
def noisy_mux_streams(draw: st.DrawFn, encrypted: bool) -> bytes:
    """Valid mux units mixed with garbage, bad types and bad sizes."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["unit", "unit", "garbage", "bad_type",
                                     "bad_size", "bad_magic"]))
        if kind == "unit":
            parts.append(draw(mux_units(encrypted, max_body=300)))
        elif kind == "garbage":
            parts.append(draw(st.binary(max_size=40)))
        elif kind == "bad_type":
            unit = bytearray(draw(mux_units(encrypted, max_body=20)))
            unit[8] = draw(st.integers(3, 255))
            parts.append(bytes(unit))
        elif kind == "bad_magic":
            unit = bytearray(draw(mux_units(encrypted, max_body=20)))
            i = draw(st.integers(0, 3))
            unit[i] ^= draw(st.integers(1, 255))
            parts.append(bytes(unit))
        else:
            unit = bytearray(mux_header(draw(st.integers(0, 9)), 0))
            payload = bytearray(draw(st.binary(min_size=256, max_size=300)))
            offset = 16 if encrypted else 96
            payload[offset:offset + 4] = struct.pack("<I", bad_size(draw))
            parts.append(bytes(unit + payload))
    return b"".join(parts)
