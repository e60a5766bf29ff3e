"""Random inputs for the differential fuzz, drawn from a seeded ``random.Random``.

Everything here is built from PROTOCOL.md's layouts with the pure-Python
sealer (sections 6.1-6.3, 7.1, 7.2) and then damaged on purpose: TB frames
with bad paddings, ``nonce_reserved``, clusters and sizes, cut short or
oversize; mux frames with bad magic, types and clear sizes, tampered tags
and noise; reads cut at random points. A case is a plain value: the same
case fed to both twins must give the same observations.
"""

import random
from typing import List, Optional, Tuple

from tigertunnel.tools.tbframes import make_tb_frame
from tigertunnel.wire.implementation import PURE
from tigertunnel.wire.muxframes import (
    FrameType,
    build_close_plaintext,
    build_control_plaintext,
    encode_header,
)

KEY = bytes(range(16))
NONCE = bytes(range(100, 116))
MIB = 1 << 20
U64 = 1 << 64
MAGIC = b"XUMZ"
#: Counters a sender or receiver may start from: the start, anywhere, the end.
COUNTERS = (0, 1, 2 ** 32, U64 - 3, U64 - 1)
CONTROL_TYPES = (FrameType.SEALED_OPEN, FrameType.PING, FrameType.PONG)


def body_size(r: random.Random) -> int:
    """Mostly small bodies, some up to 70 KiB, a few up to the 1 MiB limit."""
    x = r.random()
    if x < 0.55:
        return r.randint(0, 64)
    if x < 0.9:
        return r.randint(0, 2000)
    if x < 0.99:
        return r.randint(2000, 70000)
    return r.choice([MIB - 256, r.randint(70000, MIB - 256)])


def stream_id(r: random.Random) -> int:
    """A small stream id mostly (so streams meet), sometimes any u32."""
    return r.randint(0, 5) if r.random() < 0.9 else r.randint(0, 2 ** 32 - 1)


def tb_frame(r: random.Random, cluster: int = 0) -> bytes:
    """A TB frame that passes the tunnel's checks for ``cluster``."""
    fill = bytearray(r.randbytes(256))
    fill[64:80] = bytes(16)  # nonce_reserved
    return make_tb_frame(r.randbytes(body_size(r)), bytes(fill), cluster)


def damaged(r: random.Random, frame: bytes) -> bytes:
    """``frame`` with one thing wrong: a field the checks read, its size, or its length."""
    out = bytearray(frame)
    kind = r.randrange(7)
    if kind == 0:  # checksum_padding or checksum_body_padding
        out[r.choice([16, 31, 48, 63])] = r.randint(1, 255)
    elif kind == 1:  # nonce_reserved
        out[r.randint(64, 79)] = r.randint(1, 255)
    elif kind == 2:  # cluster
        out[r.randint(80, 95)] ^= r.randint(1, 255)
    elif kind == 3:  # a size below 256 or above 1 MiB
        size = r.choice([0, 1, 255, MIB + 1, 2 ** 32 - 1, r.randint(0, 2 ** 32 - 1)])
        out[96:100] = size.to_bytes(4, "little")
    elif kind == 4:  # a valid size that is not the frame's length
        size = max(256, min(MIB, len(frame) + r.randint(-300, 300)))
        out[96:100] = size.to_bytes(4, "little")
    elif kind == 5:  # cut short
        del out[r.randint(0, len(out)):]
    else:  # any byte
        out[r.randrange(len(out))] ^= r.randint(1, 255)
    return bytes(out)


def tb_stream(r: random.Random, cluster: int = 0, bad: float = 0.3) -> bytes:
    """TB frames back to back, some damaged (``bad`` of them), maybe noise."""
    parts = []
    for _ in range(r.randint(0, 6)):
        x = r.random()
        frame = tb_frame(r, cluster if r.random() < 0.9 else r.choice([0, 7]))
        if x < bad:
            parts.append(damaged(r, frame))
        elif x < bad + 0.05:
            parts.append(r.randbytes(r.randint(0, 300)))
        else:
            parts.append(frame)
    return b"".join(parts)


def cut(r: random.Random, data: bytes) -> List[bytes]:
    """``data`` split at random points: whole, a few cuts, many, or byte by byte at first."""
    mode = r.randrange(4)
    if mode == 0 or not data:
        points: List[int] = []
    elif mode == 1:
        points = [r.randint(0, len(data)) for _ in range(r.randint(1, 4))]
    elif mode == 2:
        points = [r.randint(0, len(data)) for _ in range(r.randint(5, 60))]
    else:  # one byte at a time through the headers, then the rest
        points = list(range(1, min(len(data), r.randint(1, 300))))
    bounds = [0] + sorted(points) + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def cut_seeded(seed: int, data: bytes) -> List[bytes]:
    """:func:`cut` from its own seed (for bytes only known when the case runs)."""
    return cut(random.Random(seed), data)


def mux_header(r: random.Random, sid: int, frame_type: int) -> bytes:
    """A mux header, now and then with non-zero reserved bytes."""
    header = bytearray(encode_header(sid, FrameType(frame_type)))
    if r.random() < 0.03:
        header[9 + r.randrange(3)] = r.randint(1, 255)
    return bytes(header)


def bad_mux_unit(r: random.Random, encrypted: bool) -> bytes:
    """A mux unit no receiver may accept: bad magic, bad type, bad size, or forged."""
    kind = r.randrange(4)
    if kind == 0:
        magic = bytearray(MAGIC)
        magic[r.randrange(4)] ^= r.randint(1, 255)
        return bytes(magic) + r.randbytes(r.randint(0, 20))
    if kind == 1:
        return MAGIC + r.randbytes(4) + bytes([r.randint(6, 255)]) + bytes(3)
    if kind == 2:  # a data frame whose size is out of range
        size = r.choice([0, 255, MIB + 1, r.randint(0, 2 ** 32 - 1)])
        at = 16 if encrypted else 96
        payload = bytearray(r.randbytes(at)) + size.to_bytes(4, "little")
        return encode_header(r.randint(0, 5), FrameType.DATA) + bytes(payload)
    # a forged data frame: right size field, wrong tag
    size = r.randint(256, 2000)
    payload = bytearray(r.randbytes(size))
    at = 16 if encrypted else 96
    payload[at:at + 4] = size.to_bytes(4, "little")
    return encode_header(r.randint(0, 5), FrameType.DATA) + bytes(payload)


def control_plaintext(r: random.Random, frame_type: FrameType, sid: int) -> bytes:
    """A control frame's plaintext, well formed mostly, sometimes not."""
    value = r.choice([0, 1, U64 - 1, r.randint(0, U64 - 1)])
    plain = bytearray(build_control_plaintext(frame_type, sid, value))
    if r.random() < 0.15:
        plain[r.choice([0, 16, 48, 100, 116, 120, 136, 255])] ^= r.randint(1, 255)
    return bytes(plain)


def mux_wire(r: random.Random, encrypted: bool, start: int) -> bytes:
    """Wire bytes of one pool-connection direction, sealed from ``start``, maybe damaged."""
    sealer = PURE.FrameSealer(KEY, NONCE, start) if encrypted else None
    wire = bytearray()
    for _ in range(r.randint(0, 8)):
        kind = r.choices(["open", "data", "close", "control", "bad"], [2, 6, 2, 2, 1])[0]
        sid = stream_id(r)
        if kind == "open":
            wire += mux_header(r, sid, FrameType.OPEN)
        elif kind == "bad":
            wire += bad_mux_unit(r, encrypted)
        elif sealer is None:
            if kind == "data":
                wire += mux_header(r, sid, FrameType.DATA) + tb_frame(r)
            elif kind == "close":
                wire += mux_header(r, sid, FrameType.CLOSE)
        elif sealer.counter < U64:
            if kind == "data":
                plain = tb_frame(r) if r.random() < 0.95 else damaged(r, tb_frame(r))
                header = mux_header(r, sid, FrameType.DATA)
            elif kind == "close":
                plain, header = build_close_plaintext(sid), mux_header(r, sid, FrameType.CLOSE)
            else:
                frame_type = r.choice(CONTROL_TYPES)
                plain = control_plaintext(r, frame_type, sid)
                header = mux_header(r, sid, frame_type)
            try:
                wire += sealer.seal_buffer(header, plain)
            except Exception:  # a damaged frame the sealer refuses: send it as it is
                wire += header + plain
    if wire and r.random() < 0.2:
        wire[r.randrange(len(wire))] ^= r.randint(1, 255)
    if r.random() < 0.15:
        wire += r.randbytes(r.randint(0, 300))
    return bytes(wire)


def counter(r: random.Random) -> int:
    """A counter to start a sealer or opener from."""
    return r.choice(COUNTERS) if r.random() < 0.8 else r.randint(0, U64 - 1)


def cluster_id(r: random.Random) -> Optional[int]:
    """A configured cluster id (``None``: no ``-c``)."""
    return r.choice([None, 0, 7, (1 << 128) - 1])


def header_of(r: random.Random) -> Tuple[int, bytes]:
    """A frame type and a mux header for it, sometimes of the wrong length."""
    frame_type = r.choice([0, 0, 0, 2, 3, 4, 5])
    header = encode_header(stream_id(r), FrameType(frame_type))
    if r.random() < 0.05:
        header = header[:r.randint(0, 11)] if r.random() < 0.5 else header + b"\0"
    return frame_type, header
