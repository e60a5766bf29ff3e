"""The targets of the differential fuzz: one case in, what a twin did out.

Each target has a ``make`` that draws a case from a ``random.Random`` and a
``run`` that plays the case on one :class:`~tigertunnel.wire.implementation.Implementation`
and returns its observations: every result (bytes normalised), every
error (class name and message), counters, buffered counts and events, in
order. The compiled and the pure-Python twin must give equal lists.

Targets: ``parser`` (FrameParser on noisy TB streams), ``encoder``
(FrameEncoder: checks, sealing, the TB watch, counters near 2**64),
``sealing`` (FrameSealer and FrameOpener with tampered tags, sizes and
associated data), ``receiver`` (MuxReceiver on sealed or plaintext wire
bytes, control frames, damage, noise) and ``codec`` (a client and a server
PoolCodec exchanging stream opens, data, closes, pings and pongs in random
interleavings, with tampering and injected frames).
"""

import dataclasses
import random
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from tests.fuzz import inputs
from tests.fuzz.inputs import KEY, MIB, NONCE, U64
from tests.helpers import encode_data, open_frame, send_counter
from tigertunnel.crypto.kdf import SessionKeys
from tigertunnel.wire import codec as codec_module
from tigertunnel.wire.codec import CLIENT, SERVER, PoolCodec
from tigertunnel.wire.implementation import Implementation
from tigertunnel.wire.muxframes import FrameType, encode_header

Observation = Tuple[Any, ...]
Case = Any


def normal(value: Any) -> Any:
    """``value`` with bytes-likes as bytes, sequences as lists, events as tuples."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return [normal(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,) + tuple(
            normal(getattr(value, f.name)) for f in dataclasses.fields(value))
    return value


def observe(f: Callable[..., Any], *args: Any) -> Observation:
    """``("ok", result)`` or ``("error", class name, message)`` of calling ``f``."""
    try:
        result = f(*args)
    except Exception as e:  # any error, so a SystemError from C shows as a difference
        return ("error", type(e).__name__, str(e))
    return ("ok", normal(result))


class WatchFailed(Exception):
    """The TB watch of a fuzzed encoder refused a header (on purpose)."""


# -- FrameParser ---------------------------------------------------------------

def make_parser(r: random.Random) -> Case:
    max_size = r.choice([256, 257, 4096, 70000, MIB, r.randint(256, MIB)])
    if r.random() < 0.02:
        max_size = r.choice([255, MIB + 1, -1])
    chunks = inputs.cut(r, inputs.tb_stream(r))
    if r.random() < 0.3:
        chunks += [b"", inputs.tb_frame(r)[:r.randint(0, 400)]]
    return max_size, chunks


def run_parser(impl: Implementation, case: Case) -> List[Observation]:
    max_size, chunks = case
    made = observe(impl.FrameParser, max_size)
    if made[0] != "ok":
        return [made]
    parser = impl.FrameParser(max_size)
    return [(observe(parser.feed, chunk), parser.buffered()) for chunk in chunks]


# -- FrameEncoder --------------------------------------------------------------

def make_encoder(r: random.Random) -> Case:
    cluster = inputs.cluster_id(r)
    stream = inputs.tb_stream(r, cluster or 0, bad=r.choice([0.0, 0.1, 0.4]))
    chunks = inputs.cut(r, stream) + ([inputs.tb_frame(r, cluster or 0)] if r.random() < 0.5 else [])
    fail_at = r.randint(0, 6) if r.random() < 0.1 else None
    sid = inputs.stream_id(r) if r.random() < 0.98 else r.choice([-1, 2 ** 32])
    return (r.random() < 0.8, r.random() < 0.7, cluster, inputs.counter(r), sid, fail_at, chunks)


def run_encoder(impl: Implementation, case: Case) -> List[Observation]:
    sealed, check, cluster, counter, sid, fail_at, chunks = case
    sealer = impl.FrameSealer(KEY, NONCE, counter) if sealed else None
    seen: List[bytes] = []

    def watch(header: bytes) -> None:
        seen.append(header)
        if fail_at is not None and len(seen) > fail_at:
            raise WatchFailed(f"watch refused header {len(seen)}")

    made = observe(impl.FrameEncoder, sid, sealer, check, cluster, watch)
    if made[0] != "ok":
        return [made]
    encoder = impl.FrameEncoder(sid, sealer, check, cluster, watch)
    out: List[Observation] = []
    for chunk in chunks:
        out.append((observe(encoder.encode, chunk), encoder.buffered(), encoder.last_frames,
                    sealer.counter if sealer is not None else None))
    out.append(("watched", seen))
    return out


# -- FrameSealer and FrameOpener -------------------------------------------------

def make_sealing(r: random.Random) -> Case:
    frame_type, header = inputs.header_of(r)
    if frame_type in (3, 4, 5):
        plain = inputs.control_plaintext(r, FrameType(frame_type), 0)
    else:
        plain = inputs.tb_frame(r)
    if r.random() < 0.25:
        plain = inputs.damaged(r, plain)
    tamper = r.choice([None, None, "tag", "size", "ciphertext", "header", "cut", "grow"])
    where = r.randrange(1 << 30)
    flip = r.randint(1, 255)
    cluster = r.choice([0, 7, r.randint(0, (1 << 128) - 1)])
    skew = 0 if r.random() < 0.85 else r.choice([1, -1])
    return header, plain, inputs.counter(r), cluster, tamper, where, flip, skew


def tampered(header: bytes, payload: bytes, tamper: Optional[str], where: int,
             flip: int) -> Tuple[bytes, bytes]:
    """``header`` and ``payload`` with one place damaged as ``tamper`` says."""
    p = bytearray(payload)
    h = bytearray(header)
    if tamper == "tag" and len(p) >= 16:
        p[where % 16] ^= flip
    elif tamper == "size" and len(p) >= 20:
        p[16 + where % 4] ^= flip
    elif tamper == "ciphertext" and len(p) > 20:
        p[20 + where % (len(p) - 20)] ^= flip
    elif tamper == "header" and h:
        h[where % len(h)] ^= flip
    elif tamper == "cut":
        del p[where % (len(p) + 1):]
    elif tamper == "grow":
        p += bytes([flip]) * (1 + where % 40)
    return bytes(h), bytes(p)


def run_sealing(impl: Implementation, case: Case) -> List[Observation]:
    header, plain, counter, cluster, tamper, where, flip, skew = case
    sealer = impl.FrameSealer(KEY, NONCE, counter)
    sealed = observe(sealer.seal_buffer, header, plain)
    out: List[Observation] = [sealed, (sealer.counter,), (observe(sealer.seal, header, plain),
                                                            sealer.counter)]
    wire = sealed[1] if sealed[0] == "ok" else header + plain
    h, payload = tampered(wire[:len(header)], wire[len(header):], tamper, where, flip)
    start = min(max(counter + skew, 0), U64 - 1)
    for method in ("open_frame", "open_buffer"):
        for kind in (bytes, bytearray):
            opener = impl.FrameOpener(KEY, NONCE, cluster, start)
            given = kind(payload)
            call = (partial(open_frame, opener) if method == "open_frame"
                    else opener.open_buffer)
            out.append((method, kind.__name__, observe(call, h, given),
                        bytes(given), opener.counter))
    return out


# -- MuxReceiver -----------------------------------------------------------------

def make_receiver(r: random.Random) -> Case:
    encrypted = r.random() < 0.85
    start = inputs.counter(r)
    wire = inputs.mux_wire(r, encrypted, start)
    chunks = inputs.cut(r, wire)
    if r.random() < 0.3:
        chunks += [b"", encode_header(1, FrameType.OPEN)]
    opener_start = start if r.random() < 0.9 else min(start + 1, U64 - 1)
    return (encrypted, r.random() < 0.7, r.choice([0, 3, (1 << 128) - 1]), opener_start,
            chunks)


def run_receiver(impl: Implementation, case: Case) -> List[Observation]:
    encrypted, extended, cluster, start, chunks = case
    opener = impl.FrameOpener(KEY, NONCE, cluster, start) if encrypted else None
    receiver = impl.MuxReceiver(opener, extended)
    return [(observe(receiver.feed, chunk), receiver.buffered(),
             opener.counter if opener is not None else None) for chunk in chunks]


# -- PoolCodec, both ends ----------------------------------------------------------

KEYS = SessionKeys(KEY, NONCE, bytes(range(50, 66)), bytes(range(200, 216)))
SIDES = ("c2s", "s2c")


# Tampering and injected frames kill the pool connection: about one case in three.
CODEC_ACTIONS = ["open", "send", "reply", "server_send", "close", "ping", "pong", "tamper",
                 "inject", "deliver"]
CODEC_WEIGHTS = [10, 15, 5, 5, 5, 5, 5, 1, 1, 15]


def make_codec(r: random.Random) -> Case:
    client_v2 = r.random() < 0.8
    server_v2 = client_v2 if r.random() < 0.9 else not client_v2
    cluster = r.choice([0, 7])
    actions: List[Tuple[Any, ...]] = []
    if r.random() < 0.7:
        actions += [("ping", SERVER), ("deliver", "s2c", r.randrange(1 << 30))]
    for _ in range(r.randint(1, 25)):
        kind = r.choices(CODEC_ACTIONS, CODEC_WEIGHTS)[0]
        end = r.choice([CLIENT, SERVER])
        side = r.choice(SIDES)
        if kind in ("send", "server_send"):
            stream = inputs.tb_stream(r, cluster, bad=r.choice([0.0, 0.0, 0.2]))
            actions.append((kind, inputs.stream_id(r), r.random() < 0.7, stream,
                            r.randrange(1 << 30)))
        elif kind == "open":
            actions.append((kind, inputs.stream_id(r)))
        elif kind == "reply":
            actions.append((kind, inputs.stream_id(r), inputs.tb_frame(r, cluster)))
        elif kind == "close":
            actions.append((kind, end, inputs.stream_id(r)))
        elif kind == "ping":
            actions.append((kind, end))
        elif kind == "pong":
            actions.append((kind, end, r.choice([0, 1, U64 - 1, U64, -1])))
        elif kind == "tamper":
            actions.append((kind, side, r.randrange(1 << 30), r.randint(1, 255)))
        elif kind == "inject":
            unit = (encode_header(inputs.stream_id(r), FrameType.OPEN) if r.random() < 0.5
                    else inputs.bad_mux_unit(r, True))
            actions.append((kind, side, unit))
        else:
            actions.append((kind, side, r.randrange(1 << 30)))
    actions += [("deliver", "c2s", r.randrange(1 << 30)), ("deliver", "s2c", r.randrange(1 << 30))]
    return client_v2, server_v2, cluster, r.random() < 0.85, actions


class Ends(NamedTuple):
    """A client and a server codec of one pool connection and what is in flight."""

    client: PoolCodec
    server: PoolCodec
    pending: Dict[str, bytearray]
    encoders: Dict[Tuple[str, int], Any]


def run_codec(impl: Implementation, case: Case) -> List[Observation]:
    client_v2, server_v2, cluster, encrypted, actions = case
    keys = KEYS if encrypted else None
    saved = codec_module.IMPLEMENTATION
    codec_module.IMPLEMENTATION = impl
    try:
        ends = Ends(PoolCodec(CLIENT, keys, cluster, client_v2),
                    PoolCodec(SERVER, keys, cluster, server_v2),
                    {side: bytearray() for side in SIDES}, {})
    finally:
        codec_module.IMPLEMENTATION = saved
    out: List[Observation] = []
    for action in actions:
        out.append((action[0],) + tuple(codec_step(ends, action, cluster)))
        out.append((send_counter(ends.client), ends.client.receive_counter,
                    send_counter(ends.server), ends.server.receive_counter,
                    ends.client.peer_confirmed, ends.server.peer_confirmed))
    return out


def codec_step(ends: Ends, action: Tuple[Any, ...], cluster: int) -> List[Any]:
    """Play one action of a codec case; return what it gave."""
    kind = action[0]
    codecs = {CLIENT: ends.client, SERVER: ends.server}
    outgoing = {CLIENT: "c2s", SERVER: "s2c"}

    def emit(end: str, f: Callable[..., Any], *args: Any) -> Observation:
        got = observe(lambda: b"".join(bytes(p) for p in f(*args)))
        if got[0] == "ok":
            ends.pending[outgoing[end]] += got[1]
        return got

    if kind == "open":
        return [emit(CLIENT, ends.client.encode_open, action[1])]
    if kind == "reply":
        return [emit(SERVER, partial(encode_data, ends.server), action[1], action[2])]
    if kind == "close":
        return [emit(action[1], codecs[action[1]].encode_close, action[2])]
    if kind == "ping":
        return [emit(action[1], codecs[action[1]].encode_ping)]
    if kind == "pong":
        return [emit(action[1], codecs[action[1]].encode_pong, action[2])]
    if kind in ("send", "server_send"):
        end = CLIENT if kind == "send" else SERVER
        _, sid, check, stream, seed = action
        encoder = ends.encoders.get((end, sid))
        if encoder is None:
            encoder = ends.encoders[(end, sid)] = codecs[end].frame_encoder(
                sid, check, cluster if check else None)
        steps = []
        for chunk in inputs.cut_seeded(seed, stream):
            got = observe(encoder.encode, chunk)
            if got[0] == "ok":
                ends.pending[outgoing[end]] += got[1]
            steps.append((got, encoder.buffered(), encoder.last_frames))
        return steps
    pending = ends.pending[action[1]]
    if kind == "tamper":
        if pending:
            pending[action[2] % len(pending)] ^= action[3]
        return [bytes(pending)]
    if kind == "inject":
        pending += action[2]
        return []
    receiver = ends.server if action[1] == "c2s" else ends.client
    data = bytes(pending)
    del pending[:]
    steps = []
    for chunk in inputs.cut_seeded(action[2], data):
        got = observe(receiver.receive, chunk)
        steps.append(got)
        if got[0] == "ok":
            for sid, frame_type, payload in got[1]:
                if frame_type != 0:
                    steps.append(observe(receiver.event, sid, frame_type, payload))
    return steps


#: name -> (make, run), in the order the fuzz takes them round-robin.
TARGETS: Dict[str, Tuple[Callable[[random.Random], Case],
                         Callable[[Implementation, Case], List[Observation]]]] = {
    "parser": (make_parser, run_parser),
    "encoder": (make_encoder, run_encoder),
    "sealing": (make_sealing, run_sealing),
    "receiver": (make_receiver, run_receiver),
    "codec": (make_codec, run_codec),
}
