"""The TB frame fields the encrypted frame layout is built on (docs/protocol.rst §6.1, 6.2).

The AEAD of a pool connection (:mod:`tigertunnel.crypto.aead`) moves and
checks a few fields of the 256-byte TB header, so their offsets live here,
below both the AEAD and the wire layer: :mod:`tigertunnel.wire.frames`
(which owns the TB frame format and parses it) imports them from this
module, and so does the compiled data path's import check
(:mod:`tigertunnel.wire.implementation`).
"""

__all__ = ["HEADER_SIZE", "MIN_FRAME_SIZE", "MAX_FRAME_SIZE", "SIZE_OFFSET",
           "SIZE_END", "CLUSTER_OFFSET", "CHECKSUM_PADDING",
           "CHECKSUM_BODY_PADDING", "NONCE_RESERVED", "MUX_HEADER_SIZE", "MAX_U64"]

# Wire facts, source of truth: docs/protocol.rst §6.1 (TB header layout).
HEADER_SIZE = 256
MIN_FRAME_SIZE = 256
MAX_FRAME_SIZE = 1 << 20
SIZE_OFFSET = 96
#: Bytes of a frame that must be present before its size can be read.
SIZE_END = SIZE_OFFSET + 4
CLUSTER_OFFSET = 80
CHECKSUM_PADDING = slice(16, 32)
CHECKSUM_BODY_PADDING = slice(48, 64)
NONCE_RESERVED = slice(64, 80)

#: The largest u64 (key ids, timestamps, ping values and counters on the
#: wire): below the wire layer and the key ring, which both check it.
MAX_U64 = (1 << 64) - 1

# docs/protocol.rst §7.1: the mux header, the AEAD's associated data.
MUX_HEADER_SIZE = 12
