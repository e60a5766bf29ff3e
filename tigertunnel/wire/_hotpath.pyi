# Types of the compiled data path (tigertunnel/wire/_hotpath.c). Each class
# has the API of its pure-Python twin; tigertunnel.wire.implementation
# picks one set or the other. An encoder takes only this module's sealer,
# a receiver only its opener (a TypeError otherwise).
from typing import Callable, List, Optional, Tuple

from tigertunnel.crypto.aead import Opener, Sealer

#: What the compiler applied to the module: "stack-protector-strong",
#: "fortify-2", "cf-protection", "address-sanitizer", "sanitizer-selftest".
BUILD_FEATURES: Tuple[str, ...]
#: The SHA-256 (hex) of the _hotpath.c the module was compiled from.
BUILD_HASH: str

# The wire constants it was compiled with (compared at import).
HEADER_SIZE: int
MIN_FRAME_SIZE: int
MAX_FRAME_SIZE: int
SIZE_OFFSET: int
SIZE_END: int
MUX_HEADER_SIZE: int
TAG_SIZE: int
KEY_SIZE: int
NONCE_SIZE: int
CLEAR_SIZE_OFFSET: int
CIPHERTEXT_OFFSET: int
CLOSE_PAYLOAD_SIZE: int
CONTROL_PAYLOAD_SIZE: int
TYPE_DATA: int
TYPE_OPEN: int
TYPE_CLOSE: int
REFERENCE_MAX_TYPE: int
MAX_TYPE: int
MAGIC: bytes

def bind_aegis(encrypt_address: int, decrypt_address: int) -> None: ...

class FrameParser:
    def __init__(self, max_size: int = ...) -> None: ...
    def feed(self, data: bytes) -> List[bytes]: ...
    def buffered(self) -> int: ...

class FrameSealer:
    counter: int
    def __init__(self, key: bytes, base_nonce: bytes, counter: int = ...) -> None: ...
    def seal_buffer(self, mux_header: bytes, frame: bytes, /) -> bytearray: ...
    def seal(self, mux_header: bytes, frame: bytes, /) -> List[bytes]: ...

class FrameOpener:
    counter: int
    def __init__(self, key: bytes, base_nonce: bytes, cluster_id: int = ...,
                 counter: int = ...) -> None: ...
    def open_buffer(self, mux_header: bytes, payload: "bytes | bytearray", /) -> bytearray: ...

class FrameEncoder:
    last_frames: int
    def __init__(self, stream_id: int, sealer: Optional[Sealer], check: bool,
                 cluster_id: Optional[int] = ...,
                 watch: Optional[Callable[[bytes], object]] = ...) -> None: ...
    def encode(self, data: bytes) -> bytes: ...
    def buffered(self) -> int: ...

class MuxReceiver:
    def __init__(self, opener: Optional[Opener], extended: bool = ...) -> None: ...
    def feed(self, data: bytes) -> List[Tuple[int, int, "bytes | bytearray"]]: ...
    def buffered(self) -> int: ...
