"""Bytes that are not a valid, fresh ClientHello never open anything on a real tunnel server.

Wrong or unknown keys, truncated hellos, random bytes, other protocols,
unknown operations or versions, replayed and stale hellos: each connection
is closed within its deadline with at most a failure status, no backend
connection is made, and the server keeps serving its live session and new
ones.
"""

import os
import random
import time
from typing import Optional, Sequence

from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.tbpeers import make_frame, the_reactor
from tests.integration.tunnels import (
    DEADLINE,
    HANDSHAKE_TIMEOUT,
    InProcessTunnel,
    LogCapture,
    closed_within,
    ms,
    raw_connect,
    record,
)
from tigertunnel.wire import handshake as hs


class HandshakeGateTests(TestCase):
    """Bad, truncated, foreign, replayed or stale hellos never open anything."""

    timeout = 60

    async def start(self) -> InProcessTunnel:
        """A tunnel (no proxy) with one live session, to check the server keeps serving."""
        self.log = LogCapture(self)
        self.tunnel = await InProcessTunnel(self).start()
        self.live, self.live_backend = await self.tunnel.session()
        return self.tunnel

    def hello(self, version: int = hs.EXTENDED_VERSION, key_id: Optional[int] = None,
              psk: Optional[bytes] = None, timestamp: Optional[int] = None,
              operation: int = hs.OP_CONNECT) -> bytes:
        """A connect ClientHello with any field chosen (valid by default)."""
        default_id, default_psk = self.tunnel.psk.first()
        hello = hs.build_connect_hello(
            version, default_id if key_id is None else key_id,
            default_psk if psk is None else psk, os.urandom(16),
            int(time.time()) if timestamp is None else timestamp)
        if operation != hs.OP_CONNECT:
            hello = hello[:1] + bytes([operation]) + hello[2:]
        return hello

    async def refused(self, what: str, data: bytes,
                      reply: Sequence[bytes], deadline: float = 1.0) -> float:
        """Send ``data`` (followed by two stream_open units) to the server and check the refusal.

        The connection must close within ``deadline`` seconds with one of
        the ``reply`` byte strings received, no backend connection may be
        made, and both the live session and a new one must still work.
        """
        t = self.tunnel
        before = len(t.backend.connections)
        peer = await raw_connect(t.server_port)
        started = time.monotonic()
        opens = b"".join(b"XUMZ" + i.to_bytes(4, "little") + bytes(4) for i in (7, 8))
        peer.transport.write(data + opens)
        closed_at = await closed_within(peer, deadline + 1, what)
        elapsed = closed_at - started
        self.assertIn(bytes(peer.received), list(reply), what)
        self.assertLessEqual(elapsed, deadline, what)
        self.assertEqual(len(t.backend.connections), before,
                         f"{what}: a backend connection was made")
        frame = make_frame(b"still here", 99)
        self.live.send(frame)
        await self.live.wait_frames(len(self.live.digests) + 1, DEADLINE)
        rtt = await t.round_trip(100)
        self.assertEqual(len(t.server_mux.pool_connections), 1, "the real pool connection was dropped")
        record("handshake gate", f"{what}: closed after {ms(elapsed)}, reply "
               f"{bytes(peer.received).hex() or 'none'}, backend connections "
               f"{len(t.backend.connections) - before - 1} (excluding the check "
               f"session), next session RTT {ms(rtt)}")
        return elapsed

    async def test_wrong_psk(self) -> None:
        """A hello made with the wrong PSK gets status 4 and is closed at once; no backend connection."""
        await self.start()
        await self.refused("wrong PSK", self.hello(psk=os.urandom(32)), [b"\x04"])

    async def test_unknown_key_id(self) -> None:
        """A hello naming an unknown key id gets status 4 (like a bad hash) and is closed at once."""
        await self.start()
        await self.refused("unknown key id", self.hello(key_id=424242), [b"\x04"])

    async def test_truncated_hello_then_silence(self) -> None:
        """Half a hello and then silence is closed at the handshake deadline, with no reply."""
        await self.start()
        hello = self.hello()
        t = self.tunnel
        before = len(t.backend.connections)
        peer = await raw_connect(t.server_port)
        started = time.monotonic()
        peer.transport.write(hello[:30])
        closed_at = await closed_within(peer, HANDSHAKE_TIMEOUT + 3, "truncated hello")
        elapsed = closed_at - started
        self.assertEqual(bytes(peer.received), b"")
        self.assertGreaterEqual(elapsed, HANDSHAKE_TIMEOUT - 0.05)
        self.assertLessEqual(elapsed, HANDSHAKE_TIMEOUT + 0.5)
        self.assertEqual(len(t.backend.connections), before)
        self.assertEqual(len(self.log.matching("handshake timed out")), 1)
        await t.round_trip(100)
        record("handshake gate", f"truncated hello (30 of 66 bytes) then silence: closed after "
               f"{ms(elapsed)} (handshake deadline {HANDSHAKE_TIMEOUT} s), no reply")

    async def test_random_bytes(self) -> None:
        """Random bytes (several seeds) are closed at once with at most a failure status."""
        await self.start()
        for seed, operation in ((0, None), (1, None), (2, 0), (3, 1)):
            data = bytearray(random.Random(seed).randbytes(4096))
            if operation is not None:  # shaped like a version-2 connect / kemconnect hello
                data[0:2] = bytes((hs.EXTENDED_VERSION, operation))
            await self.refused(f"4 KiB random bytes (seed {seed}, operation byte "
                               f"{data[1]})", bytes(data), [b"", b"\x04"])

    async def test_http_request(self) -> None:
        """An HTTP request is closed at once without a reply."""
        await self.start()
        await self.refused("HTTP request", b"GET / HTTP/1.1\r\nHost: tunnel\r\n"
                           b"User-Agent: curl/8.0\r\nAccept: */*\r\n\r\n", [b""])

    async def test_tls_client_hello(self) -> None:
        """A TLS ClientHello is closed at once without a reply."""
        await self.start()
        body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
                + b"\x00\x04\x13\x01\x13\x02\x01\x00" + b"\x00\x10\x00\x00\x00\x0c"
                + b"\x00\x00\x09localhost")
        handshake = b"\x01" + len(body).to_bytes(3, "big") + body
        record_ = b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake
        await self.refused("TLS ClientHello", record_, [b""])

    async def test_unknown_operation(self) -> None:
        """A hello with operation byte 2 (unknown) is closed at once without a reply."""
        await self.start()
        await self.refused("unknown operation 2", self.hello(operation=2), [b""])

    async def test_unknown_version(self) -> None:
        """A hello with version byte 3 (unknown), even with a valid hash, is refused and closed at once."""
        await self.start()
        await self.refused("unknown version 3 (valid hash)", self.hello(version=3),
                           [b"\x04", b""])

    async def test_replayed_hello(self) -> None:
        """A byte-identical hello presented again is refused with status 4 and 'replayed' in the log."""
        t = await self.start()
        hello = self.hello()
        first = await raw_connect(t.server_port)
        first.transport.write(hello)
        await procs.wait_until(lambda: len(first.received) >= hs.SERVER_HELLO_SIZE,
                               DEADLINE, "the first ServerHello")
        self.assertEqual(first.received[0], 0)
        first.transport.loseConnection()
        await first.lost.addTimeout(DEADLINE, the_reactor())
        await self.refused("replayed hello", hello, [b"\x04"])
        self.assertEqual(len(self.log.matching("replayed ClientHello")), 1)

    async def test_timestamp_window_real_socket(self) -> None:
        """On real sockets hellos 3600 s off are accepted and 3601 s off refused with status 5, the skew logged."""
        t = await self.start()
        # Start at the beginning of a second so that the server's whole-second
        # clock reads the same second as ours.
        await procs.wait_until(lambda: time.time() % 1 < 0.3, 2, "a fresh second")
        now = int(time.time())
        peers = {}
        for skew in (3600, -3600, 3601, -3601):
            peer = await raw_connect(t.server_port)
            peer.transport.write(self.hello(timestamp=now + skew))
            peers[skew] = peer
        for skew in (3600, -3600):
            await procs.wait_until(lambda: len(peers[skew].received) >= 49, DEADLINE,
                                   f"ServerHello for skew {skew}")
            self.assertEqual(peers[skew].received[0], 0, f"skew {skew} refused")
            peers[skew].transport.loseConnection()
        for skew in (3601, -3601):
            await closed_within(peers[skew], DEADLINE, f"skew {skew}")
            self.assertEqual(bytes(peers[skew].received), b"\x05")
            self.assertEqual(len(self.log.matching(f"(clock skew {skew} s)")), 1,
                             self.log.matching("clock skew"))
        record("handshake gate",
               "real socket: timestamps now±3600 s accepted, now±3601 s refused "
               "with status 5; log: " + " | ".join(self.log.matching("clock skew")))
