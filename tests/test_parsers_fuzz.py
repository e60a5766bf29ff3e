"""Fuzzing every parser with hypothesis: only our documented errors, bounded buffers.

The per-module tests (``test_frames``, ``test_muxframes``, ``test_codec``,
``test_keyformat``, ``test_handshake``, ``test_aead``) already feed arbitrary
bytes to the parsers; this module covers what they leave out:

* key files through the loaders (PSK, KEM secret, KEM public) and
  ``.pub``-shaped text;
* hellos that pass the hash check but carry arbitrary versions, key ids,
  timestamps and KEM ciphertexts, and the size at which each handshake side
  must have decided (so it never buffers more than one hello);
* the mux codec of both roles in both modes, on noise and on genuine sealed
  streams with one mutation;
* TB frames: ``check_frame`` on any bytes, the AEAD opener and sealer on any
  input (counter untouched on failure), and the buffer bounds of the frame
  and mux parsers.

Profiles (``tests/__init__.py``): ``ci`` by default, ``TIGERTUNNEL_HYPOTHESIS=long``
for many more examples.
"""

import os
import struct
from typing import Any, Callable, List, Optional

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import StreamData, encode_data, feed, open_frame
from tests.strategies import chunked, noisy_mux_streams, noisy_tb_streams, tb_frames
from tigertunnel.wire import handshake as hs
from tigertunnel.crypto import kem
from tigertunnel.crypto.aead import FrameOpener, FrameSealer
from tigertunnel.crypto.kdf import SessionKeys
from tigertunnel.crypto.kem import PUBLIC_KEY_SIZE as KEM_PUBLIC_KEY_SIZE
from tigertunnel.keys.files import load_kem_public_file, load_kem_secret_file, load_psk_file
from tigertunnel.keys.format import MAX_KEYS, format_key_line
from tigertunnel.errors import (
    AuthenticationError,
    FrameError,
    HandshakeError,
    KeyFileError,
    MuxError,
    TunnelError,
)
from tigertunnel.wire.frames import MAX_FRAME_SIZE, FrameParser, check_frame
from tigertunnel.wire.codec import CLIENT, SERVER, PoolCodec, StreamClosed, StreamOpened
from tigertunnel.wire.muxframes import MUX_HEADER_SIZE, MuxDecoder

KEYS = SessionKeys(c2s_key=bytes(range(16)), c2s_nonce=bytes(range(16, 32)),
                   s2c_key=bytes(range(32, 48)), s2c_nonce=bytes(range(48, 64)))
PSK = bytes(range(100, 132))
KEY_ID = 1732712345000000000
KEM_KEY_ID = 77
KEM_SEED = bytes(range(32))
KEM_PUBLIC = kem.public_key_from_seed(KEM_SEED)
NOW = 1_800_000_000
U64 = (1 << 64) - 1

#: Every reason a KeyFileError may carry (tigertunnel.errors.KeyFileError).
KEY_FILE_REASONS = {"InvalidKeyFormat", "InvalidKeySize", "DuplicateKeyId", "NoKeysFound",
                    "KeyStoreFull", "Unreadable", "InsecurePermissions"}


def only_our_errors(case: SynchronousTestCase, call: Callable[[], Any],
                    allowed: "tuple[type[TunnelError], ...]" = (TunnelError,)) -> Optional[Exception]:
    """Run ``call``; return the error it raised (one of ``allowed``) or ``None``.

    Any other exception propagates and fails the test.
    """
    try:
        call()
    except allowed as e:
        return e
    return None


# -- key files -----------------------------------------------------------------


def key_line(draw: st.DrawFn, size: int) -> str:
    """One line of a key file: valid, damaged or decorative."""
    kind = draw(st.sampled_from(["key", "key", "comment", "blank", "short", "bad_id",
                                 "garbage", "no_colon"]))
    key_id = draw(st.integers(0, U64))
    key = draw(st.binary(min_size=size, max_size=size))
    if kind == "key":
        return format_key_line(key_id, key).rstrip("\n")
    if kind == "comment":
        return "# " + draw(st.text(max_size=30)).replace("\n", " ")
    if kind == "blank":
        return draw(st.sampled_from(["", " ", "\t", "\r"]))
    if kind == "short":
        return f"{key_id}:{key.hex()[:draw(st.integers(0, 2 * size - 1))]}"
    if kind == "bad_id":
        return f"{draw(st.sampled_from(['-1', 'x', '', '1_', '18446744073709551616']))}:{key.hex()}"
    if kind == "no_colon":
        return key.hex()
    return draw(st.text(max_size=40)).replace("\n", " ")


@st.composite
def key_file_texts(draw: st.DrawFn, size: int) -> bytes:
    """Key-file-shaped text: up to 20 lines of keys of ``size`` bytes, comments and damage."""
    lines = [key_line(draw, size) for _ in range(draw(st.integers(0, 20)))]
    return "\n".join(lines).encode("utf-8", "surrogatepass")


class KeyFileLoaderTests(SynchronousTestCase):
    """The key-file loaders give keys or a KeyFileError with a documented reason, for any content."""

    def write(self, content: bytes) -> str:
        """Write ``content`` to a 0600 file and return its path."""
        if not hasattr(self, "_dir"):
            self._dir = self.mktemp()
            os.makedirs(self._dir)
        path = os.path.join(self._dir, "key")
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o600)
        return path

    def check(self, load: Callable[[str], Any], content: bytes) -> Any:
        """Load ``content``; return the result, or ``None`` after a documented KeyFileError."""
        try:
            return load(self.write(content))
        except KeyFileError as e:
            self.assertIn(e.reason, KEY_FILE_REASONS)
            return None

    @given(st.one_of(st.binary(max_size=400), key_file_texts(32)))
    def test_psk_and_kem_secret_files(self, content: bytes) -> None:
        """Any PSK or KEM secret file content loads 1..16 keys of 32 bytes or raises a documented KeyFileError."""
        for load in (load_psk_file, load_kem_secret_file):
            store = self.check(load, content)
            if store is not None:
                self.assertTrue(1 <= len(store) <= MAX_KEYS)
                self.assertTrue(all(len(k) == 32 for k in store.values()))

    @given(st.one_of(st.binary(max_size=400), key_file_texts(KEM_PUBLIC_KEY_SIZE)))
    def test_kem_public_file(self, content: bytes) -> None:
        """Any .pub content loads one 1216-byte key or raises a documented KeyFileError."""
        found = self.check(load_kem_public_file, content)
        if found is not None:
            key_id, key = found
            self.assertTrue(0 <= key_id <= U64)
            self.assertEqual(len(key), KEM_PUBLIC_KEY_SIZE)


# -- hellos --------------------------------------------------------------------


def make_server(**kw: Any) -> hs.ServerHandshake:
    """A server machine knowing PSK ``KEY_ID`` and KEM key ``KEM_KEY_ID``, clock at NOW."""
    return hs.ServerHandshake({KEY_ID: PSK}, {KEM_KEY_ID: KEM_SEED}, now=lambda: NOW, **kw)


def check_outcome(case: SynchronousTestCase, result: Any) -> None:
    """A server outcome is Accepted, or Rejected with an empty reply or one known status byte."""
    case.assertIsInstance(result, (hs.Accepted, hs.Rejected))
    if isinstance(result, hs.Rejected):
        if result.status is None:
            case.assertEqual(result.reply, b"")
        else:
            case.assertEqual(result.reply, bytes((result.status,)))
            case.assertIn(result.status, list(hs.Status)[1:])
    else:
        case.assertEqual(len(result.reply), hs.SERVER_HELLO_SIZE)


class HelloFuzzTests(SynchronousTestCase):
    """Hellos past the hash check, and the sizes by which each side decides."""

    @given(st.integers(0, 255), st.sampled_from([KEY_ID, 0, U64]), st.integers(0, U64),
           st.binary(min_size=16, max_size=16), st.binary(max_size=30),
           st.sampled_from([None, (1, 2)]), st.booleans())
    def test_valid_hash_connect(self, version: int, key_id: int, timestamp: int,
                                client_random: bytes, extra: bytes,
                                versions: Optional["tuple[int, ...]"], require_kem: bool) -> None:
        """A connect hello with a valid hash and any version, key id or timestamp gets an outcome, never an exception."""
        hello = hs.build_connect_hello(version, key_id, PSK, client_random, timestamp)
        server = make_server(versions=versions, require_kem=require_kem,
                             replay_cache=hs.ReplayCache(now=lambda: NOW))
        result = server.feed(hello + extra)
        check_outcome(self, result)
        if isinstance(result, hs.Accepted):
            self.assertEqual(result.established.leftover, extra)
            self.assertLessEqual(abs(timestamp - NOW), hs.TIMESTAMP_TOLERANCE)
            self.assertEqual(key_id, KEY_ID)
            if versions is not None:
                self.assertIn(version, versions)

    @given(st.sampled_from([KEM_KEY_ID, 0, U64]), st.binary(min_size=1120, max_size=1120),
           st.binary(min_size=16, max_size=16))
    def test_valid_hash_kemconnect_any_ciphertext(self, kem_key_id: int, ciphertext: bytes,
                                                  client_random: bytes) -> None:
        """A kemconnect hello with a valid hash and an arbitrary X-Wing ciphertext is accepted or refused, never an exception."""
        hello = hs.build_kemconnect_hello(2, KEY_ID, PSK, kem_key_id, client_random, NOW,
                                          ciphertext)
        result = make_server().feed(hello)
        check_outcome(self, result)
        if isinstance(result, hs.Rejected):
            self.assertIn(result.status, (hs.Status.SERVER_ERROR, hs.Status.UNKNOWN_KEM_KEY))

    @given(st.binary(min_size=2, max_size=1400), st.lists(st.integers(0, 1400), max_size=8),
           st.sampled_from([None, (1, 2)]))
    def test_server_decides_within_one_hello(self, data: bytes, cuts: List[int],
                                             versions: Optional["tuple[int, ...]"]) -> None:
        """Fed arbitrary bytes in any chunks, the server has decided by the end of the longest hello (1194 bytes)."""
        server = make_server(versions=versions)
        fed = 0
        result = None
        for chunk in chunked_at(data, cuts):
            fed += len(chunk)
            result = server.feed(chunk)
            if result is not None:
                break
        if result is None:
            self.assertLess(fed, hs.KEMCONNECT_HELLO_SIZE)
        else:
            check_outcome(self, result)
            self.assertRaises(HandshakeError, server.feed, b"x")

    @given(st.binary(max_size=120), st.lists(st.integers(0, 120), max_size=8), st.booleans())
    def test_client_decides_within_server_hello(self, data: bytes, cuts: List[int],
                                                kem_mode: bool) -> None:
        """Fed arbitrary ServerHello bytes, a client (PSK or KEM mode) has decided by byte 49, with at most a HandshakeError."""
        client = hs.ClientHandshake(KEY_ID, PSK, now=lambda: NOW,
                                    kem_public=(KEM_KEY_ID, KEM_PUBLIC) if kem_mode else None)
        client.start()
        fed = 0
        for chunk in chunked_at(data, cuts):
            fed += len(chunk)
            error = only_our_errors(self, lambda: client.feed(chunk), (HandshakeError,))
            if error is not None:
                return
        self.assertLess(fed, hs.SERVER_HELLO_SIZE)


def chunked_at(data: bytes, cuts: List[int]) -> List[bytes]:
    """``data`` cut at the given offsets (clamped, sorted)."""
    bounds = [0] + sorted(min(c, len(data)) for c in cuts) + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# -- mux frames ----------------------------------------------------------------


def check_events(case: SynchronousTestCase, codec: PoolCodec, chunks: List[bytes]) -> List[Any]:
    """Feed chunks; events are of our three kinds; a failure is ours and leaves the codec dead."""
    events: List[Any] = []
    for chunk in chunks:
        error = only_our_errors(case, lambda: events.extend(feed(codec, chunk)))
        if error is not None:
            case.assertIsInstance(error, (MuxError, AuthenticationError, FrameError))
            case.assertRaises(MuxError, feed, codec, b"")
            break
    for event in events:
        case.assertIsInstance(event, (StreamOpened, StreamData, StreamClosed))
        if isinstance(event, StreamOpened):
            case.assertEqual(codec.role, SERVER, "a client accepted a stream_open")
    return events


@st.composite
def sealed_streams(draw: st.DrawFn, role: str, encrypted: bool) -> "tuple[bytes, int]":
    """Genuine wire bytes from the peer of ``role`` (data, opens, closes), and their unit count."""
    sender = PoolCodec(SERVER if role == CLIENT else CLIENT, KEYS if encrypted else None)
    parts: List[bytes] = []
    units = draw(st.integers(1, 5))
    for _ in range(units):
        stream_id = draw(st.integers(0, (1 << 32) - 1))
        kind = draw(st.sampled_from(["data", "data", "close", "open"]))
        if kind == "open" and sender.role == CLIENT:
            parts += sender.encode_open(stream_id)
        elif kind == "close" and sender.can_send_close:
            parts += sender.encode_close(stream_id)
        else:
            parts += encode_data(sender, stream_id, draw(tb_frames(max_body=300, cluster=0)))
    return b"".join(bytes(p) for p in parts), units


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with at most one mutation: a flipped bit, a cut, an insertion or a duplicated range."""
    kind = draw(st.sampled_from(["none", "flip", "cut", "insert", "duplicate"]))
    if kind == "none" or not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        out = bytearray(data)
        out[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "cut":
        return data[:at] + data[at + draw(st.integers(1, 300)):]
    if kind == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=40)) + data[at:]
    end = min(len(data), at + draw(st.integers(1, 600)))
    return data[:end] + data[at:end] + data[end:]


class MuxCodecFuzzTests(SynchronousTestCase):
    """The pool-connection codec of both roles, in both modes, on noise and on mutated genuine streams."""

    @given(st.sampled_from([CLIENT, SERVER]), st.booleans(), st.data())
    def test_noise(self, role: str, encrypted: bool, data: st.DataObject) -> None:
        """Noise shaped for either mode gives our events or one of our errors, for a client or a server codec."""
        noise = data.draw(st.one_of(noisy_mux_streams(encrypted=True),
                                    noisy_mux_streams(encrypted=False), st.binary(max_size=300)))
        codec = PoolCodec(role, KEYS if encrypted else None)
        check_events(self, codec, data.draw(chunked(noise)))

    @given(st.sampled_from([CLIENT, SERVER]), st.booleans(), st.data())
    def test_mutated_genuine_stream(self, role: str, encrypted: bool, data: st.DataObject) -> None:
        """A genuine stream with one flipped bit, cut, insertion or duplicated range gives our events or our errors, and an untouched stream decodes whole."""
        stream, units = data.draw(sealed_streams(role, encrypted))
        wire = data.draw(mutated(stream))
        events = check_events(self, PoolCodec(role, KEYS if encrypted else None),
                              data.draw(chunked(wire)))
        if wire == stream:
            self.assertEqual(len(events), units)

    @given(st.booleans(), st.data())
    def test_decoder_buffer_bounded(self, encrypted: bool, data: st.DataObject) -> None:
        """The mux decoder never holds more than one incomplete unit (12 bytes + 1 MiB - 1)."""
        noise = data.draw(st.one_of(noisy_mux_streams(encrypted), st.binary(max_size=300)))
        decoder = MuxDecoder(encrypted)
        for chunk in data.draw(chunked(noise)):
            try:
                decoder.feed(chunk)
            except MuxError:
                self.assertEqual(decoder.buffered(), 0)
                return
            self.assertLess(decoder.buffered(), MUX_HEADER_SIZE + MAX_FRAME_SIZE)

    def test_decoder_huge_declared_size(self) -> None:
        """A data unit declaring 4 GiB is refused as soon as its size arrives, holding nothing."""
        for encrypted, offset in ((True, 16), (False, 96)):
            decoder = MuxDecoder(encrypted)
            unit = bytearray(b"XUMZ" + bytes(8) + bytes(offset + 4))
            struct.pack_into("<I", unit, MUX_HEADER_SIZE + offset, 0xFFFFFFFF)
            self.assertRaises(MuxError, decoder.feed, bytes(unit))
            self.assertEqual(decoder.buffered(), 0)


# -- TB frames -----------------------------------------------------------------


class FrameFuzzTests(SynchronousTestCase):
    """TB frame checks, the AEAD layer and the frame parser's bounds on any input."""

    @given(st.binary(max_size=600), st.one_of(st.none(), st.integers(0, (1 << 128) - 1)))
    def test_check_frame_any_bytes(self, frame: bytes, cluster: Optional[int]) -> None:
        """check_frame on any bytes passes or raises FrameError (ClusterMismatchError included)."""
        only_our_errors(self, lambda: check_frame(frame, cluster), (FrameError,))

    @given(st.binary(min_size=0, max_size=20), st.one_of(
        st.binary(max_size=700),
        tb_frames(max_body=400).map(lambda f: f[:16] + struct.pack("<I", len(f)) + f[20:])),
        st.booleans())
    def test_opener_any_input(self, header: bytes, payload: bytes, in_place: bool) -> None:
        """The AEAD opener refuses any forged input with FrameError or AuthenticationError and keeps its counter."""
        opener = FrameOpener(KEYS.c2s_key, KEYS.c2s_nonce, counter=5)
        error = only_our_errors(self, lambda: (opener.open_buffer(header, bytearray(payload))
                                               if in_place else open_frame(opener, header, payload)),
                                (FrameError, AuthenticationError))
        self.assertIsNotNone(error, "a forged frame authenticated")
        self.assertEqual(opener.counter, 5)

    @given(st.binary(min_size=0, max_size=14), st.one_of(st.binary(max_size=700),
                                                         tb_frames(max_body=300)))
    def test_sealer_any_input(self, header: bytes, frame: bytes) -> None:
        """The AEAD sealer seals a valid frame or raises FrameError, consuming no counter on failure."""
        sealer = FrameSealer(KEYS.c2s_key, KEYS.c2s_nonce)
        error = only_our_errors(self, lambda: sealer.seal(header, frame), (FrameError,))
        self.assertEqual(sealer.counter, 0 if error is not None else 1)

    @given(noisy_tb_streams(), st.data())
    def test_parser_buffer_bounded(self, stream: bytes, data: st.DataObject) -> None:
        """The TB frame parser never holds a whole frame: its buffer stays below 1 MiB."""
        parser = FrameParser()
        for chunk in data.draw(chunked(stream)):
            if only_our_errors(self, lambda: parser.feed(chunk), (FrameError,)) is not None:
                return
            self.assertLess(parser.buffered(), MAX_FRAME_SIZE)
