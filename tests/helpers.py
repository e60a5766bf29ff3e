"""Shared test fixtures: reference vectors, the recorded TigerBeetle traces, and
the two implementations of the data path."""

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Type, Union

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.tools.traces import TraceFrame, load_trace  # noqa: F401 (re-export)
from tigertunnel.crypto.aead import Opener
from tigertunnel.interfaces import PoolConnection
from tigertunnel.wire import codec
from tigertunnel.wire.codec import Event, PoolCodec
from tigertunnel.wire.muxframes import FrameType, encode_header
from tigertunnel.wire.implementation import ACTIVE, COMPILED, PURE, REASON, Implementation

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


#: Why the compiled variants of the tests are skipped, or ``None``.
COMPILED_SKIP: Optional[str] = None if COMPILED is not None else (
    f"compiled data path not in use: {REASON}")

if TYPE_CHECKING:
    ImplementationMixin = SynchronousTestCase
else:
    ImplementationMixin = object


def on_both(mixin: type) -> Tuple[type, type]:
    """Return two test cases made of ``mixin``'s tests: pure Python, then compiled.

    ``mixin`` subclasses :data:`ImplementationMixin` and reaches the classes
    under test through ``self.impl`` (an :class:`Implementation`). Bind the
    results to the module-level names ``Pure<mixin>`` and ``Compiled<mixin>``
    (trial's workers find test cases by module attribute); the compiled one
    is skipped (with the reason) where the extension is not in use.
    """
    made = []
    for prefix, impl, skip in (("Pure", PURE, None),
                               ("Compiled", COMPILED or PURE, COMPILED_SKIP)):
        name = prefix + mixin.__name__
        doc = f"{(mixin.__doc__ or '').strip()} ({impl.name if not skip else 'compiled'} data path)"
        made.append(type(name, (mixin, SynchronousTestCase), {
            "impl": impl, "skip": skip, "__doc__": doc,
            "__module__": mixin.__module__, "__qualname__": name}))
    return made[0], made[1]


def on_other_implementation(case: Type[SynchronousTestCase]) -> type:
    """Return ``case`` run with the codec's data-path classes of the other implementation.

    ``case`` tests :class:`~tigertunnel.wire.codec.PoolCodec`, which uses
    the implementation selected at import; the returned test case patches
    in the other one (pure Python if the compiled one is selected, and the
    reverse), so that the two together cover both. It is skipped where the
    compiled one is not in use.
    """
    other = PURE if ACTIVE is not PURE else COMPILED
    # Bind the result to this name in the test module: trial's workers (-j)
    # find test cases by module attribute.
    name = "Other" + case.__name__

    def setUp(self: SynchronousTestCase) -> None:
        case.setUp(self)
        if other is not None:
            self.patch(codec, "IMPLEMENTATION", other)

    doc = f"{(case.__doc__ or '').strip()} ({other.name if other else 'compiled'} data path)"
    return type(name, (case,), {
        "setUp": setUp, "skip": None if other is not None else COMPILED_SKIP,
        "__doc__": doc, "__module__": case.__module__, "__qualname__": name})


__all__ = ["load_vectors", "unhex", "load_trace", "TraceFrame", "COMPILED_SKIP",
           "ImplementationMixin", "on_both", "on_other_implementation", "Implementation",
           "StreamData", "feed", "encode_data", "send_counter", "last_ping_value",
           "open_frame", "send_frame"]


# What the tests use of the data path beyond what the program does: built
# here from the package's public API (or, where marked, a codec's state).

@dataclass(frozen=True)
class StreamData:
    """One complete, authenticated TB frame for stream ``stream_id`` (a data item of :func:`feed`)."""

    stream_id: int
    frame: "bytes | bytearray"


def feed(codec: PoolCodec, data: bytes) -> "List[Union[Event, StreamData]]":
    """Decode received bytes into events, in wire order, data items as :class:`StreamData`.

    What a pool connection does with :meth:`PoolCodec.receive` and
    :meth:`PoolCodec.event`: all of a read is decoded before anything comes
    out, so a bad frame anywhere in ``data`` raises and nothing of it does.
    """
    return [StreamData(stream_id, payload) if frame_type == FrameType.DATA
            else codec.event(stream_id, frame_type, payload)
            for stream_id, frame_type, payload in codec.receive(data)]


def encode_data(codec: PoolCodec, stream_id: int, frame: bytes) -> "List[bytes | bytearray]":
    """The wire bytes carrying TB frame ``frame`` on ``stream_id``, sealed by the codec's sender.

    :raises FrameError: the frame has non-zero padding (encrypted mode);
        no counter value is consumed.
    """
    header = encode_header(stream_id, FrameType.DATA)
    sealer = codec._sealer
    if sealer is not None:
        return [sealer.seal_buffer(header, frame)]
    return [header, frame]


def send_counter(codec: PoolCodec) -> int:
    """The counter value the next sealed frame ``codec`` sends uses (0 in plaintext mode; reads its sender)."""
    sealer = codec._sealer
    return sealer.counter if sealer is not None else 0


def last_ping_value(codec: PoolCodec) -> Optional[int]:
    """The value of the last ping ``codec`` encoded, ``None`` before the first (reads its state)."""
    return codec._ping_value - 1 if codec._ping_value else None


def open_frame(opener: Opener, mux_header: bytes, payload: "bytes | bytearray") -> bytes:
    """Open one encrypted frame into ``bytes``, leaving ``payload`` untouched."""
    return bytes(opener.open_buffer(mux_header, bytes(payload)))


def send_frame(connection: PoolConnection, stream_id: int, frame: bytes) -> None:
    """Send one TB frame of ``stream_id`` on ``connection`` as a session does.

    :raises FrameError: the frame cannot be sent (padding, encrypted mode).
    """
    encoder = connection.frame_encoder(stream_id, False, None, None)
    connection.send_wire(encoder.encode(frame))
