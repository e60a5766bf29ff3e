"""In-memory end to end: TB client -> tunnel client -> tunnel server -> replica.

Everything runs on iosim pumps and a MemoryReactorClock (tests/memnet.py):
real protocols, real handshakes and encryption, no sockets, no wall clock.
"""

import hashlib
from typing import Dict, List

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import send_frame
from tests.memnet import (
    KEM_KEY_ID,
    KEM_SEED,
    BackendFactory,
    TBPeer,
    Tunnel,
    psk_store,
)
from tigertunnel.crypto.kem import public_key_from_seed
from tigertunnel.keys.format import parse_key_text
from tigertunnel.keys.ring import KeyRing
from tigertunnel.net.frame_protocol import SESSION_BUFFER_LIMIT
from tigertunnel.tools.tbframes import sized_tb_frame
from tigertunnel.tools.traces import CLUSTER3, SINGLE, load_trace
from tigertunnel.wire.frames import HEADER_SIZE


def digests(frames: List[bytes]) -> List[str]:
    """Short digests, so that a mismatch does not print megabytes."""
    return [hashlib.sha256(f).hexdigest()[:16] for f in frames]


def tb_frame(body_len: int, tag: int = 0, cluster: int = 0, command: int = 5) -> bytes:
    """A TB frame with a ``body_len``-byte body, recognisable by ``tag``."""
    return sized_tb_frame(HEADER_SIZE + body_len, tag, command, cluster)


class EchoTests(SynchronousTestCase):
    """Frames go through the tunnel and back unchanged."""

    def test_sizes_round_trip(self) -> None:
        """Frames of 0 B, 1 B, 1000 B and 1 MiB - 256 B bodies come back byte-identical."""
        t = Tunnel()
        t.start()
        client, _ = t.tb_client()
        frames = [tb_frame(n, i) for i, n in enumerate([0, 1, 1000, (1 << 20) - 256])]
        client.send(*frames)
        t.net.flush()
        self.assertEqual(digests(client.received), digests(frames))
        self.assertEqual(digests(t.backend.peers[0].received), digests(frames))

    def test_kem_mode(self) -> None:
        """With --kempublic/--kemsecret the handshake is kemconnect and frames still pass."""
        kem_secret = parse_key_text(f"{KEM_KEY_ID}:{KEM_SEED.hex()}\n".encode(), "kem.key", 32)
        t = Tunnel(client_cfg={"kem_public": (KEM_KEY_ID, public_key_from_seed(KEM_SEED))},
                   server_cfg={"kem_secret": kem_secret})
        t.start()
        self.assertEqual(len(t.client.pool_connections), 2)
        client, _ = t.tb_client()
        frames = [tb_frame(100, i) for i in range(3)]
        client.send(*frames)
        t.net.flush()
        self.assertEqual(client.received, frames)

    def test_plaintext_mode(self) -> None:
        """In explicit plaintext mode frames (even with a cluster id) pass unchanged."""
        t = Tunnel(plaintext=True)
        t.start()
        client, _ = t.tb_client()
        frames = [tb_frame(10, 1, cluster=99), tb_frame(0, 2, cluster=99)]
        client.send(*frames)
        t.net.flush()
        self.assertEqual(client.received, frames)

    def test_many_streams_interleaved(self) -> None:
        """Thirty sessions over two pool connections keep their frames apart and in order."""
        t = Tunnel(pool_size=2)
        t.start()
        clients = [t.tb_client()[0] for _ in range(30)]
        sent: Dict[int, List[bytes]] = {i: [] for i in range(30)}
        for round_ in range(4):
            for i, c in enumerate(clients):
                f = tb_frame((i * 37 + round_ * 101) % 3000, tag=i * 1000 + round_)
                sent[i].append(f)
                c.send(f)
        t.net.flush()
        for i, c in enumerate(clients):
            self.assertEqual(c.received, sent[i])
        backends = {tuple(p.received) for p in t.backend.peers}
        self.assertEqual(backends, {tuple(v) for v in sent.values()})
        per_link = sorted(len(link.streams) for link in t.client.pool_connections)
        self.assertEqual(per_link, [15, 15])


class FullDuplexTests(SynchronousTestCase):
    """No request/response pairing: any number of frames either way."""

    def test_zero_one_three_and_unsolicited(self) -> None:
        """A backend answering 0, 1 or 3 frames and sending unsolicited ones gets all delivered in order."""
        def behaviour(peer: TBPeer, frame: bytes) -> None:
            n = frame[0] % 3
            replies = {0: [], 1: [frame], 2: [frame, tb_frame(5, 200), tb_frame(6, 201)]}[n]
            if replies:
                peer.send(*replies)

        t = Tunnel(BackendFactory(behaviour))
        t.start()
        client, _ = t.tb_client()
        backend = t.backend.peers[0]
        backend.send(tb_frame(3, 250))  # unsolicited, before any request
        t.net.flush()
        frames = [tb_frame(20, tag) for tag in range(9)]
        client.send(*frames)
        t.net.flush()
        expected = [tb_frame(3, 250)]
        for f in frames:
            n = f[0] % 3
            expected += {0: [], 1: [f], 2: [f, tb_frame(5, 200), tb_frame(6, 201)]}[n]
        self.assertEqual(len(backend.received), 9)
        self.assertEqual(digests(client.received), digests(expected))

    def test_slow_session_does_not_block_others(self) -> None:
        """A backend that never answers one session does not delay another on the same pool connection."""
        def behaviour(peer: TBPeer, frame: bytes) -> None:
            if frame[0] != 1:
                peer.send(frame)

        t = Tunnel(BackendFactory(behaviour), pool_size=1)
        t.start()
        silent, _ = t.tb_client()
        lively, _ = t.tb_client()
        silent.send(tb_frame(10, 1))
        t.net.flush()
        frames = [tb_frame(10, 2), tb_frame(100, 2)]
        lively.send(*frames)
        t.net.flush()
        self.assertEqual(lively.received, frames)
        self.assertEqual(silent.received, [])


class TraceReplayTests(SynchronousTestCase):
    """Real TigerBeetle 0.17.8 traffic replayed link by link."""

    def replay(self, name: str) -> int:
        frames = load_trace(name)
        conns: Dict[int, list] = {}
        for f in frames:
            conns.setdefault(f.conn, []).append(f)
        checked = 0
        for conn_frames in conns.values():
            up = [f.data for f in conn_frames if f.dir == "up"]
            down = [f.data for f in conn_frames if f.dir == "down"]
            script = list(conn_frames)

            def pump(client: TBPeer, replica: TBPeer) -> None:
                # Each side sends its next frames once it has received every
                # frame the other side sent before them in the recording.
                progress = True
                while progress and script:
                    progress = False
                    head = script[0]
                    got_up, got_down = len(replica.received), len(client.received)
                    done_up = sum(1 for f in conn_frames[:len(conn_frames) - len(script)] if f.dir == "up")
                    done_down = (len(conn_frames) - len(script)) - done_up
                    if got_up >= done_up and got_down >= done_down:
                        (client if head.dir == "up" else replica).send(head.data)
                        script.pop(0)
                        progress = True

            t = Tunnel(BackendFactory())
            t.start()
            client, _ = t.tb_client()
            replica = t.backend.peers[-1]
            for _ in range(len(conn_frames) + 2):
                pump(client, replica)
                t.net.flush()
            self.assertEqual(digests(replica.received), digests(up))
            self.assertEqual(digests(client.received), digests(down))
            checked += len(up) + len(down)
        return checked

    def test_single_replica_trace(self) -> None:
        """Every frame of the single-replica trace crosses the tunnel byte-identical and in order."""
        self.assertEqual(self.replay(SINGLE), 16)

    def test_cluster3_trace(self) -> None:
        """Every frame of the 3-replica trace, replica links included, crosses byte-identical."""
        self.assertEqual(self.replay(CLUSTER3), 650)


class ClosePathTests(SynchronousTestCase):
    """Sessions never hang or leak."""

    def test_tb_client_close_closes_backend(self) -> None:
        """A TB client that disconnects makes the server close its backend connection."""
        t = Tunnel()
        t.start()
        client, _ = t.tb_client()
        client.send(tb_frame(1))
        t.net.flush()
        client.transport.loseConnection()
        t.net.flush()
        self.assertTrue(t.backend.peers[0].lost)
        self.assertEqual(sum(len(link.streams) for link in t.client.pool_connections), 0)
        self.assertEqual(len(t.server.sessions), 0)

    def test_backend_close_closes_tb_client(self) -> None:
        """A backend that disconnects makes the tunnel client close the TB client (version-2 extension)."""
        t = Tunnel()
        t.start()
        client, _ = t.tb_client()
        client.send(tb_frame(1))
        t.net.flush()
        t.backend.peers[0].transport.loseConnection()
        t.net.flush()
        self.assertTrue(client.lost)
        self.assertEqual(len(t.client.sessions), 0)

    def test_backend_refused_closes_tb_client(self) -> None:
        """A backend that refuses the connection makes the TB client's connection close."""
        t = Tunnel()
        t.net.refusing.add(t.backend_addr)
        t.start()
        client, _ = t.tb_client()
        client.send(tb_frame(1))
        t.net.flush()
        self.assertTrue(client.lost)
        self.assertEqual(len(t.server.sessions), 0)

    def test_pool_connection_loss_closes_sessions_and_reconnects(self) -> None:
        """Losing a pool connection closes its sessions on both ends; the pool reconnects with backoff."""
        t = Tunnel(pool_size=1)
        t.start()
        client, _ = t.tb_client()
        client.send(tb_frame(1))
        t.net.flush()
        link = t.client.pool_connections[0]
        link.transport.loseConnection()
        t.net.flush()
        self.assertTrue(client.lost)
        self.assertTrue(t.backend.peers[0].lost)
        self.assertEqual(t.client.pool_connections, [])
        t.net.advance(0.2)
        self.assertEqual(len(t.client.pool_connections), 1)
        again, _ = t.tb_client()
        again.send(tb_frame(2, 9))
        t.net.flush()
        self.assertEqual(again.received, [tb_frame(2, 9)])

    def test_no_healthy_link_closes_tb_client_at_once(self) -> None:
        """With the server unreachable the client listener accepts and closes TB connections at once."""
        t = Tunnel()
        t.net.refusing.add(t.server_addr)
        t.start()
        client, _ = t.tb_client()
        self.assertTrue(client.lost)

    def test_max_sessions(self) -> None:
        """With -m 2 a third TB connection is closed at once and the first two keep working."""
        t = Tunnel(client_cfg={"max_sessions": 2})
        t.start()
        a, _ = t.tb_client()
        b, _ = t.tb_client()
        c, _ = t.tb_client()
        self.assertTrue(c.lost)
        a.send(tb_frame(1, 1))
        b.send(tb_frame(1, 2))
        t.net.flush()
        self.assertEqual(len(a.received) + len(b.received), 2)

    def test_tb_peer_not_reading_loses_only_its_session(self) -> None:
        """A TB client that lets more than the session limit pile up is closed; others continue."""
        t = Tunnel(pool_size=1)
        t.start()
        stuck, _ = t.tb_client()
        other, _ = t.tb_client()
        session = next(iter(t.client.pool_connections[0].streams))
        session.peer_slow(True)  # what the transport reports when the peer stops reading
        big = tb_frame((1 << 20) - 256, 3)
        for _ in range(SESSION_BUFFER_LIMIT // len(big) + 2):
            t.backend.peers[0].send(big)
        t.net.flush()
        self.assertTrue(stuck.lost)
        other.send(tb_frame(10, 4))
        t.net.flush()
        self.assertEqual(len(other.received), 1)


class FailClosedTests(SynchronousTestCase):
    """Bad input closes what it must and nothing else."""

    def test_tampered_frame_closes_pool_connection(self) -> None:
        """A frame that fails authentication closes its pool connection and sessions; nothing after it is delivered."""
        t = Tunnel(pool_size=1)
        t.start()
        client, _ = t.tb_client()
        server_link = next(iter(t.server.pool_connections))
        client.send(tb_frame(10, 1))
        t.net.flush()
        self.assertEqual(len(t.backend.peers[0].received), 1)
        # The next bytes the server reads: a data frame for stream 1 with a bad tag.
        from tigertunnel.wire.muxframes import FrameType, encode_header
        forged = encode_header(1, FrameType.DATA) + bytes(16) + (256).to_bytes(4, "little") + bytes(236)
        server_link.dataReceived(forged)
        t.net.flush()
        self.assertTrue(client.lost)
        self.assertTrue(t.backend.peers[0].lost)
        self.assertEqual(len(t.backend.peers[0].received), 1)
        self.flushLoggedErrors()

    def test_padding_closes_only_the_session(self) -> None:
        """A TB frame with non-zero checksum_padding closes its session, not the pool connection."""
        t = Tunnel(pool_size=1)
        t.start()
        bad, _ = t.tb_client()
        good, _ = t.tb_client()
        frame = bytearray(tb_frame(10, 1))
        frame[20] = 1
        bad.send(bytes(frame))
        t.net.flush()
        self.assertTrue(bad.lost)
        good.send(tb_frame(10, 2))
        t.net.flush()
        self.assertEqual(len(good.received), 1)
        self.assertEqual(len(t.client.pool_connections), 1)

    def test_cluster_mismatch_closes_session(self) -> None:
        """With -c 12345 a frame of cluster 12345 passes and a frame of cluster 7 closes the session."""
        t = Tunnel(client_cfg={"cluster_id": 12345}, server_cfg={"cluster_id": 12345})
        t.start()
        client, _ = t.tb_client()
        ok = tb_frame(10, 1, cluster=12345)
        client.send(ok)
        t.net.flush()
        self.assertEqual(client.received, [ok])
        client.send(tb_frame(10, 2, cluster=7))
        t.net.flush()
        self.assertTrue(client.lost)

    def test_nonzero_cluster_without_c(self) -> None:
        """Without -c a frame with a non-zero cluster closes the session (forwarding would corrupt it)."""
        t = Tunnel()
        t.start()
        client, _ = t.tb_client()
        client.send(tb_frame(10, 1, cluster=5))
        t.net.flush()
        self.assertTrue(client.lost)
        self.assertEqual(t.backend.peers[0].received, [])

    def test_cluster_id_mismatch_between_ends(self) -> None:
        """Different -c on the two ends fails the handshake, so no pool connection comes up."""
        t = Tunnel(client_cfg={"cluster_id": 1}, server_cfg={"cluster_id": 2})
        t.start()
        self.assertEqual(t.client.pool_connections, [])
        self.assertGreater(t.client.handshake_failures, 0)

    def test_wrong_key_retries_with_backoff(self) -> None:
        """A client with an unknown key never gets a pool connection and retries with growing delays."""
        other = psk_store(b"5:" + b"b2" * 32 + b"\n")
        t = Tunnel(client_cfg={})
        t.client.keyring = KeyRing(other)
        t.start()
        self.assertEqual(t.client.pool_connections, [])
        attempts = len(t.net.connect_attempts)
        t.net.advance(0.05)
        self.assertEqual(len(t.net.connect_attempts), attempts)
        t.net.advance(1.0)
        self.assertGreater(len(t.net.connect_attempts), attempts)

    def test_handshake_timeout(self) -> None:
        """A pool connection that never sends a ClientHello is closed after the handshake timeout."""
        t = Tunnel()
        t.start()
        silent = TBPeer()
        t.net.dial(t.server_addr, silent)
        t.net.flush()
        t.net.advance(9.0)
        self.assertFalse(silent.lost)
        t.net.advance(1.5)
        self.assertTrue(silent.lost)

    def test_reference_client_never_gets_stream_close(self) -> None:
        """A version-1 (reference) client is never sent stream_close, even when its backend closes."""
        t = Tunnel(backend=BackendFactory())
        t.start()
        link, received = t.reference_client_link()
        self.assertTrue(link.established)
        session = t.client.new_session()
        stream_id = link.open_stream(session)
        send_frame(link, stream_id, tb_frame(10, 1))  # proves the bare stream_open
        t.net.flush()
        t.backend.peers[0].transport.loseConnection()
        t.net.flush()
        self.assertEqual(b"".join(received), b"")
        self.assertIn(session.stream_id, link.streams)

    def test_nonce_reserved_closes_only_the_session(self) -> None:
        """A TB frame with non-zero nonce_reserved (which the encrypted format cannot carry) closes its session only."""
        t = Tunnel(pool_size=1)
        t.start()
        bad, _ = t.tb_client()
        good, _ = t.tb_client()
        frame = bytearray(tb_frame(10, 1))
        frame[70] = 9
        bad.send(bytes(frame))
        t.net.flush()
        self.assertTrue(bad.lost)
        self.assertEqual(t.backend.peers[0].received, [])
        good.send(tb_frame(10, 2))
        t.net.flush()
        self.assertEqual(len(good.received), 1)

    def test_duplicate_stream_open_closes_pool_connection(self) -> None:
        """A stream_open for a stream that is open (tampering: it is not authenticated) closes the pool connection."""
        from tigertunnel.wire.muxframes import FrameType, encode_header
        t = Tunnel(pool_size=1)
        t.start()
        client, _ = t.tb_client()
        client.send(tb_frame(10, 1))
        t.net.flush()
        server_link = next(iter(t.server.pool_connections))
        server_link.dataReceived(encode_header(1, FrameType.OPEN))
        t.net.flush()
        self.assertTrue(client.lost)
        self.assertTrue(t.backend.peers[0].lost)
        self.assertEqual(len(t.backend.peers), 1)
        self.flushLoggedErrors()

    def test_graceful_close_unregisters_producer(self) -> None:
        """Graceful closes unregister the write watcher first (Twisted would not finish a loseConnection whose buffer drained while its producer was paused) and arm an abort."""
        t = Tunnel(pool_size=1)
        t.start()
        client, _ = t.tb_client()
        link = t.client.pool_connections[0]
        session = next(iter(link.streams))
        self.assertIsNotNone(session.transport.producer)
        session.close()
        self.assertIsNone(session.transport.producer)
        self.assertTrue(session.transport.disconnecting)
        link.close_gracefully()
        self.assertIsNone(link.transport.producer)
        self.assertTrue(link.transport.disconnecting)
        self.assertTrue(link._close_timer.active())
        t.net.flush()
        self.assertFalse(link._close_timer.active())
