"""The version-2 frames reproduce ``tests/vectors/v2_extensions.json`` byte for byte."""

from typing import Any, Dict, List

from twisted.trial.unittest import SynchronousTestCase

from tests import make_v2_vectors
from tests.helpers import feed, last_ping_value, load_vectors, open_frame, send_counter, unhex
from tigertunnel.crypto.aead import FrameOpener, FrameSealer
from tigertunnel.crypto.kdf import SessionKeys
from tigertunnel.wire.codec import (
    CLIENT,
    SERVER,
    PoolCodec,
    Ping,
    Pong,
    StreamClosed,
    StreamOpened,
)
from tigertunnel.wire.muxframes import (
    FrameType,
    build_close_plaintext,
    build_control_plaintext,
    encode_header,
    parse_control,
)

VECTORS = load_vectors("v2_extensions")
KEYS = SessionKeys(**{k: unhex(v) for k, v in VECTORS["keys"].items()})
KINDS = {"stream_close": FrameType.CLOSE, "sealed_open": FrameType.SEALED_OPEN,
         "ping": FrameType.PING, "pong": FrameType.PONG}


def plaintext_of(unit: Dict[str, Any]) -> bytes:
    """The pseudo header our modules build for a vector unit."""
    kind = KINDS[unit["kind"]]
    if kind is FrameType.CLOSE:
        return build_close_plaintext(unit["stream_id"])
    return build_control_plaintext(kind, unit["stream_id"], int(unit["value"]))


class FileTests(SynchronousTestCase):
    """The committed file is what the committed generator writes."""

    def test_generator_output(self) -> None:
        """make_v2_vectors.build() gives exactly the committed vectors."""
        self.assertEqual(make_v2_vectors.build(), VECTORS)

    def test_keys_are_the_reference_session_keys(self) -> None:
        """The vectors use the session keys of the Zig PSK session vector."""
        self.assertEqual(VECTORS["keys"],
                         load_vectors("session_psk")["derived_keys_client_side"])


class LayoutTests(SynchronousTestCase):
    """Headers and pseudo headers of every unit."""

    def units(self) -> List[Dict[str, Any]]:
        """Every unit of the file."""
        return list(VECTORS["transcript"]["units"]) + list(VECTORS["standalone"])

    def test_headers_and_plaintexts(self) -> None:
        """encode_header and the pseudo-header builders give the recorded bytes."""
        units = self.units()
        self.assertEqual(len(units), 14)
        for unit in units:
            kind = KINDS[unit["kind"]]
            self.assertEqual(int(kind), unit["frame_type"])
            self.assertEqual(encode_header(unit["stream_id"], kind), unhex(unit["mux_header"]))
            self.assertEqual(plaintext_of(unit), unhex(unit["plaintext"]))

    def test_seal_at_fixed_counters(self) -> None:
        """FrameSealer at each recorded counter gives the recorded wire bytes."""
        for unit in self.units():
            direction = unit["direction"]
            sealer = FrameSealer(getattr(KEYS, f"{direction}_key"),
                                 getattr(KEYS, f"{direction}_nonce"), int(unit["counter"]))
            wire = b"".join(sealer.seal(unhex(unit["mux_header"]), plaintext_of(unit)))
            self.assertEqual(wire, unhex(unit["wire"]))

    def test_open_at_fixed_counters(self) -> None:
        """FrameOpener at each recorded counter opens the wire bytes and parse_control finds the value."""
        for unit in self.units():
            direction = unit["direction"]
            opener = FrameOpener(getattr(KEYS, f"{direction}_key"),
                                 getattr(KEYS, f"{direction}_nonce"), 0, int(unit["counter"]))
            wire = unhex(unit["wire"])
            plain = open_frame(opener, wire[:12], wire[12:])
            self.assertEqual(plain, unhex(unit["plaintext"]))
            kind = KINDS[unit["kind"]]
            if kind is not FrameType.CLOSE:
                self.assertEqual(parse_control(plain, kind, unit["stream_id"]),
                                 int(unit["value"]))


class TranscriptTests(SynchronousTestCase):
    """Two codecs replay the recorded pool connection."""

    def test_transcript(self) -> None:
        """Each unit is what the sending codec encodes next, and the receiver's event matches it."""
        client = PoolCodec(CLIENT, KEYS)
        server = PoolCodec(SERVER, KEYS, peer_extended=True)
        for unit in VECTORS["transcript"]["units"]:
            sender, receiver = (client, server) if unit["direction"] == "c2s" else (server, client)
            self.assertEqual(send_counter(sender), int(unit["counter"]))
            kind, stream, value = unit["kind"], unit["stream_id"], int(unit["value"])
            expected: object
            if kind == "ping":
                chunks = sender.encode_ping()
                self.assertEqual(last_ping_value(sender), value)
                expected = Ping(value)
            elif kind == "pong":
                chunks = sender.encode_pong(value)
                expected = Pong(value)
            elif kind == "sealed_open":
                chunks = sender.encode_open(stream)
                expected = StreamOpened(stream, sealed=True)
            else:
                chunks = sender.encode_close(stream)
                expected = StreamClosed(stream)
            wire = b"".join(chunks)
            self.assertEqual(wire, unhex(unit["wire"]), f"unit {unit}")
            self.assertEqual(feed(receiver, wire), [expected])
        self.assertTrue(client.peer_confirmed)
        self.assertTrue(server.peer_confirmed)
