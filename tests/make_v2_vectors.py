"""Write ``tests/vectors/v2_extensions.json``: test vectors of the version-2 frames.

Run from the repository root: ``python tests/make_v2_vectors.py``. The
output is deterministic (fixed keys, fixed counters, no randomness), so
running it twice gives the same file, and ``tests/test_v2_vectors.py``
checks that the implementation reproduces every byte.

This script deliberately imports nothing from ``tigertunnel``: it builds the
frames from the written format (PROTOCOL.md sections 6.2, 6.3 and 7.1, and
README.rst "Protocol extension (version 2)") with ``struct`` and
``pyaegis`` alone, so the vectors are an independent check of the code.

The keys are the session keys of ``session_psk.json`` (a handshake made by
the Zig implementation), so the vectors continue a real pool connection.
"""

import json
import os
import struct
import sys
from typing import Any, Dict, List

import pyaegis

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "vectors", "v2_extensions.json")

MAGIC = b"XUMZ"
TYPES = {"stream_close": 2, "sealed_open": 3, "ping": 4, "pong": 5}
AEAD = pyaegis.Aegis128X2(tag_size=16)


def mux_header(stream_id: int, frame_type: int) -> bytes:
    """PROTOCOL.md 7.1: magic, u32 LE stream id, type, three zero bytes."""
    return MAGIC + struct.pack("<I", stream_id) + bytes([frame_type, 0, 0, 0])


def pseudo_header(kind: str, stream_id: int, value: int) -> bytes:
    """The 256-byte pseudo TB header of a stream_close or a version-2 control frame."""
    h = bytearray(256)
    struct.pack_into("<I", h, 96, 256)
    struct.pack_into("<I", h, 116, stream_id)
    h[120] = TYPES[kind]
    if kind != "stream_close":
        struct.pack_into("<Q", h, 128, value)
    return bytes(h)


def nonce(base: bytes, counter: int) -> bytes:
    """PROTOCOL.md 6.3: bytes 0..7 of the base nonce XOR LE64(counter)."""
    low = int.from_bytes(base[:8], "little") ^ counter
    return low.to_bytes(8, "little") + base[8:]


def seal(key: bytes, base: bytes, counter: int, header: bytes, frame: bytes) -> bytes:
    """PROTOCOL.md 6.2: tag || clear size || AEGIS-128X2(P), AD = the mux header."""
    p = frame[0:64] + frame[100:256] + frame[240:256] + frame[256:]
    ciphertext, tag = AEAD.encrypt_detached(key, nonce(base, counter), p, header)
    return header + tag + frame[96:100] + ciphertext


def unit(keys: Dict[str, bytes], direction: str, counter: int, kind: str,
         stream_id: int, value: int = 0) -> Dict[str, Any]:
    """One sealed frame as a vector entry."""
    header = mux_header(stream_id, TYPES[kind])
    plain = pseudo_header(kind, stream_id, value)
    key, base = keys[f"{direction}_key"], keys[f"{direction}_nonce"]
    return {
        "direction": direction, "counter": str(counter), "kind": kind,
        "frame_type": TYPES[kind], "stream_id": stream_id, "value": str(value),
        "mux_header": header.hex(), "plaintext": plain.hex(),
        "wire": seal(key, base, counter, header, plain).hex(),
    }


def build() -> Dict[str, Any]:
    """Return the whole vector document."""
    with open(os.path.join(HERE, "vectors", "session_psk.json")) as f:
        session = json.load(f)
    keys = {k: bytes.fromhex(v) for k, v in session["derived_keys_client_side"].items()}
    transcript: List[Dict[str, Any]] = [
        # The server's first frame, sent with its ServerHello to a version-2 client.
        unit(keys, "s2c", 0, "ping", 0, 0),
        # The client answers; from here both ends use version-2 frames.
        unit(keys, "c2s", 0, "pong", 0, 0),
        unit(keys, "c2s", 1, "sealed_open", 1),
        unit(keys, "c2s", 2, "ping", 0, 0),
        unit(keys, "s2c", 1, "pong", 0, 0),
        unit(keys, "s2c", 2, "ping", 0, 1),
        unit(keys, "c2s", 3, "pong", 0, 1),
        unit(keys, "s2c", 3, "stream_close", 1),
        unit(keys, "c2s", 4, "stream_close", 1),
        unit(keys, "c2s", 5, "sealed_open", 2),
    ]
    standalone = [
        unit(keys, "c2s", 41, "sealed_open", 0xFFFFFFFF),
        unit(keys, "c2s", 1 << 32, "ping", 0, 1 << 63),
        unit(keys, "s2c", (1 << 64) - 1, "pong", 0, (1 << 64) - 1),
        unit(keys, "s2c", 0x0102030405060708, "ping", 0, 0x1122334455667788),
    ]
    return {
        "description": (
            "Version-2 frames of tigertunnel (README.rst, 'Protocol extension'): sealed "
            "stream_open (type 3), ping (4), pong (5), and the server's stream_close. "
            "Written by tests/make_v2_vectors.py from the format alone (struct + pyaegis)."),
        "keys": {k: v.hex() for k, v in keys.items()},
        "keys_from": "session_psk.json derived_keys_client_side",
        "transcript": {
            "description": (
                "One pool connection between two version-2 ends, in wire order per "
                "direction; counters start at 0 after the handshake."),
            "units": transcript,
        },
        "standalone": standalone,
    }


def main() -> int:
    """Write the vector file and say where."""
    text = json.dumps(build(), indent=2) + "\n"
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
