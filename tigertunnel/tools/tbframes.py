"""Building TB frames (docs/protocol.rst §6.1) for the benchmark, fakes and tests.

The tunnel only parses TB frames; the benchmark's load generator, the
integration tests' fake replicas and the property tests need to *make* them.
They all use :func:`make_tb_frame` (any body and header bytes) or
:func:`sized_tb_frame` (a frame of a given size, its bytes derived from a
seed). The size field is always the frame's true length and both padding
fields are zero, so a frame is valid whenever its size is in 256 .. 1 MiB;
tests that need an oversized frame get one by passing a longer body.
"""

from typing import Optional

from tigertunnel.wire.frames import (
    CHECKSUM_BODY_PADDING,
    CHECKSUM_PADDING,
    CLUSTER_OFFSET,
    HEADER_SIZE,
    SIZE_OFFSET,
)

#: Offset of the ``command`` byte (docs/protocol.rst §6.1).
COMMAND_OFFSET = 114
#: TigerBeetle's ``request`` command.
REQUEST = 5

_ZERO16 = bytes(16)


def make_tb_frame(body: bytes = b"", header_fill: bytes = b"", cluster: int = 0, *,
                  tag: Optional[int] = None, command: Optional[int] = None) -> bytes:
    """Return a TB frame carrying ``body``.

    :param header_fill: the header bytes (cut or zero-padded to 256); the
        size, cluster and padding fields are then set over them.
    :param cluster: the ``cluster`` field (u128).
    :param tag: when given, written over the ``checksum`` field (bytes 0-15,
        little-endian) so that a frame can be recognised.
    :param command: when given, the ``command`` byte.
    """
    header = bytearray(header_fill[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0"))
    if tag is not None:
        header[0:16] = tag.to_bytes(16, "little")
    header[CHECKSUM_PADDING] = _ZERO16
    header[CHECKSUM_BODY_PADDING] = _ZERO16
    header[CLUSTER_OFFSET:CLUSTER_OFFSET + 16] = cluster.to_bytes(16, "little")
    header[SIZE_OFFSET:SIZE_OFFSET + 4] = (HEADER_SIZE + len(body)).to_bytes(4, "little")
    if command is not None:
        header[COMMAND_OFFSET] = command
    return bytes(header) + body


def pattern_bytes(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that depend on ``seed`` (a repeated 256-byte pattern)."""
    start = seed % 256
    pattern = bytes((start + i) & 0xFF for i in range(256))
    return (pattern * (size // 256 + 1))[:size]


def sized_tb_frame(size: int, seed: int = 0, command: int = REQUEST,
                   cluster: int = 0) -> bytes:
    """Return a TB frame of exactly ``size`` bytes.

    :param size: the whole frame, header included (at least 256).
    :param seed: the frame's tag (its ``checksum`` field) and the start of
        its body pattern: frames with different seeds differ.
    :raises ValueError: ``size`` is smaller than a header.
    """
    if size < HEADER_SIZE:
        raise ValueError(f"a TB frame has at least {HEADER_SIZE} bytes, not {size}")
    return make_tb_frame(pattern_bytes(size - HEADER_SIZE, seed), cluster=cluster,
                         tag=seed, command=command)
