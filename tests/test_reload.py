"""Tests for :mod:`tigertunnel.ops.reload` (live key reload, SIGHUP), on the in-memory network."""

import os
import signal
from dataclasses import FrozenInstanceError
from typing import Any, Callable, List, Optional, Tuple

from twisted.logger import globalLogPublisher
from twisted.internet.testing import EventLoggingObserver
from twisted.trial.unittest import SynchronousTestCase

from tests.memnet import KEM_KEY_ID, KEM_SEED, TBPeer, Tunnel
from tests.strategies import make_tb_frame
from tigertunnel.crypto.kdf import public_key_fingerprint
from tigertunnel.crypto.kem import public_key_from_seed
from tigertunnel.keys.files import load_psk_file
from tigertunnel.keys.format import format_key_line
from tigertunnel.net.states import PoolState
from tigertunnel.stats import HandshakeFailure, Refusal
from tigertunnel.ops.reload import (
    CHECK_INTERVAL,
    DRAIN_TIMEOUT,
    RETIRE_GRACE,
    KeyReloader,
    ReloadError,
    ReloadService,
    load_keys,
)

OLD, NEW = 1000, 2000
KEYS = {OLD: bytes([0xA1]) * 32, NEW: bytes([0xB2]) * 32}
OTHER_SEED = bytes(range(100, 132))


def frame(tag: int) -> bytes:
    """A small TB frame recognisable by its tag."""
    return make_tb_frame(bytes([tag]) * 40, bytes([tag]) * 64)


class KeyDir:
    """Key files in a fresh directory, rewritten the way an operator would."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.dir = case.mktemp()
        os.makedirs(self.dir)

    def write(self, name: str, text: str, mode: int = 0o600) -> str:
        """Replace file ``name`` with ``text`` and return its path."""
        path = os.path.join(self.dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.chmod(path + ".tmp", mode)
        os.replace(path + ".tmp", path)
        return path

    def psk(self, name: str, *ids: int) -> str:
        """Write a PSK file holding ``ids`` in this order."""
        return self.write(name, "".join(format_key_line(i, KEYS[i]) for i in ids))


class ReloadCase(SynchronousTestCase):
    """A tunnel whose two ends read their PSK from files (both start with OLD)."""

    kem = False

    def setUp(self) -> None:
        self.keys = KeyDir(self)
        self.sessions: dict = {}
        server_path = self.keys.psk("server.key", OLD)
        client_path = self.keys.psk("client.key", OLD)
        server_cfg: dict = {"key_path": server_path}
        client_cfg: dict = {"key_path": client_path}
        if self.kem:
            server_cfg["kem_path"] = self.keys.write(
                "kem.key", format_key_line(KEM_KEY_ID, KEM_SEED))
            server_cfg["kem_secret"] = load_keys_from(server_cfg["kem_path"])
            client_cfg["kem_path"] = self.keys.write(
                "kem.pub", format_key_line(KEM_KEY_ID, public_key_from_seed(KEM_SEED)), 0o644)
            client_cfg["kem_public"] = (KEM_KEY_ID, public_key_from_seed(KEM_SEED))
        self.t = Tunnel(psk=load_psk_file(server_path), server_cfg=server_cfg,
                        client_cfg=client_cfg, pool_size=2)
        self.client = KeyReloader([self.t.client], self.t.clock, now=lambda: 1234.5)
        self.server = KeyReloader([self.t.server], self.t.clock)
        self.t.start()
        self.addCleanup(self.client.stop)
        self.addCleanup(self.server.stop)

    def client_key_ids(self) -> List[Optional[int]]:
        """Key ids of the client's established pool connections."""
        return sorted(link.key_id for link in self.t.client.pool_connections)

    def rotate(self) -> None:
        """The README's first two steps: both keys on the server, NEW first on the client."""
        self.keys.psk("server.key", OLD, NEW)
        self.assertTrue(self.server.reload())
        self.keys.psk("client.key", NEW, OLD)
        self.assertTrue(self.client.reload())

    def echo_session(self) -> TBPeer:
        """Open a TB session and check one frame round trip."""
        peer, pump = self.t.tb_client()
        self.sessions[peer] = pump.server
        peer.send(frame(1))
        self.t.net.flush()
        self.assertEqual(peer.received, [frame(1)])
        return peer

    def link_of(self, peer: TBPeer) -> Any:
        """The client pool connection carrying ``peer``'s session."""
        return self.sessions[peer].pool_connection


def load_keys_from(path: str) -> Any:
    """The KEM secret key store of a file."""
    from tigertunnel.keys.files import load_kem_secret_file
    return load_kem_secret_file(path)


class ClientRotationTests(ReloadCase):
    """A client reload moves every pool connection to the new first key."""

    def test_idle_pool_connections_reconnect_with_new_key(self) -> None:
        """Idle pool connections keyed with the old key are replaced by ones using the new key."""
        self.assertEqual(self.client_key_ids(), [OLD, OLD])
        self.rotate()
        self.t.net.advance(CHECK_INTERVAL + 0.5)
        self.assertEqual(self.client_key_ids(), [NEW, NEW])
        self.assertEqual(self.t.client.draining, set())
        self.assertEqual(self.t.client.stats.pool_reconnects, 2)
        self.echo_session()

    def test_session_survives_and_new_sessions_avoid_draining(self) -> None:
        """A busy old-key pool connection keeps its session; new sessions go to new-key ones."""
        peer = self.echo_session()
        busy = self.link_of(peer)
        self.rotate()
        self.t.net.advance(CHECK_INTERVAL + 0.5)
        self.assertIn(busy, self.t.client.pool_connections)
        self.assertEqual(self.t.client.draining, {busy})
        peer.send(frame(2))
        self.t.net.flush()
        self.assertEqual(peer.received, [frame(1), frame(2)])
        for _ in range(3):
            other = self.echo_session()
            self.assertEqual(self.link_of(other).key_id, NEW)

    def test_draining_closes_when_idle(self) -> None:
        """Once its last session ends, a draining pool connection closes and comes back with the new key."""
        peer = self.echo_session()
        busy = self.link_of(peer)
        self.rotate()
        self.t.net.advance(CHECK_INTERVAL + 0.5)
        peer.transport.loseConnection()
        self.t.net.advance(CHECK_INTERVAL + 0.5)
        self.assertNotIn(busy, self.t.client.pool_connections)
        self.assertEqual(self.client_key_ids(), [NEW, NEW])

    def test_draining_deadline(self) -> None:
        """A draining pool connection still busy after the drain timeout is closed, with its session."""
        peer = self.echo_session()
        self.rotate()
        self.t.net.advance(DRAIN_TIMEOUT - 2)
        self.assertFalse(peer.lost)
        self.t.net.advance(3)
        self.assertTrue(peer.lost)
        self.assertEqual(self.client_key_ids(), [NEW, NEW])

    def test_all_draining_still_places_sessions(self) -> None:
        """When every pool connection is draining, new sessions still get one."""
        peers = [self.echo_session(), self.echo_session()]
        self.assertEqual({self.link_of(p) for p in peers}, set(self.t.client.pool_connections))
        self.rotate()
        self.assertEqual(self.t.client.draining, set(self.t.client.pool_connections))
        peer, pump = self.t.tb_client()
        self.assertIn(pump.server.pool_connection, self.t.client.draining)
        self.assertEqual(self.t.client.stats.sessions_refused[Refusal.NO_POOL], 0)

    def test_revert_undrains(self) -> None:
        """Reloading the old order again takes a busy pool connection out of draining."""
        self.echo_session()
        self.rotate()
        self.assertEqual(len(self.t.client.draining), 2)  # one busy, one closing
        self.keys.psk("client.key", OLD, NEW)
        self.assertTrue(self.client.reload())
        self.t.net.flush()  # the idle one was already closing
        self.assertEqual(self.t.client.draining, set())
        self.assertEqual(self.client_key_ids(), [OLD])

    def test_in_flight_handshake_swept_later(self) -> None:
        """A handshake started with the old key before the reload is retired by the late sweep."""
        t = self.t
        for link in list(t.client.pool_connections):
            link.transport.loseConnection()
        t.net.flush()
        t.clock.advance(0.2)  # the slots reconnect; their hellos are not delivered yet
        self.assertEqual(t.client.pool_connections, [])
        self.rotate()
        t.net.flush()
        self.assertEqual(self.client_key_ids(), [OLD, OLD])
        t.net.advance(t.client.handshake_timeout + 2 * CHECK_INTERVAL + 0.5)
        self.assertEqual(self.client_key_ids(), [NEW, NEW])

    def test_key_not_accepted_keeps_pool(self) -> None:
        """If the servers refuse the new key, one pool connection probes it and the others stay, past the deadline."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        peer = self.echo_session()
        self.keys.psk("client.key", NEW)  # the server was not told (wrong order)
        self.assertTrue(self.client.reload())
        self.t.net.advance(DRAIN_TIMEOUT + 5)
        self.assertEqual(self.client_key_ids(), [OLD])
        self.assertFalse(peer.lost)
        peer.send(frame(3))
        self.t.net.flush()
        self.assertEqual(peer.received[-1], frame(3))
        self.assertGreater(self.t.server.stats.handshake_failures[HandshakeFailure.UNKNOWN_KEY], 0)
        warned = [e for e in events if e.get("log_level") is not None
                  and e["log_level"].name == "warn" and "current" in e]
        self.assertEqual([e["current"] for e in warned], [NEW])
        # Once the server accepts it, the probe succeeds and the old one goes.
        self.keys.psk("server.key", NEW, OLD)
        self.assertTrue(self.server.reload())
        self.t.net.advance(12)
        self.assertTrue(peer.lost)
        self.assertEqual(self.client_key_ids(), [NEW, NEW])

    def test_reload_swaps_the_keyring_not_the_settings(self) -> None:
        """A reload gives the multiplexer a new frozen KeyRing; the settings
        (the same object) keep the keys read at start-up."""
        config, before = self.t.client.config, self.t.client.keyring
        self.rotate()
        self.assertIs(self.t.client.config, config)
        self.assertEqual(config.psk.first()[0], OLD)
        self.assertIsNot(self.t.client.keyring, before)
        self.assertEqual(self.t.client.keyring.psk.first()[0], NEW)
        self.assertEqual(before.psk.first()[0], OLD)
        with self.assertRaises(FrozenInstanceError):
            self.t.client.keyring.psk = None  # type: ignore[misc]

    def test_reload_state_recorded(self) -> None:
        """A reload records its time and result, and the new client hello uses the new key id."""
        self.rotate()
        self.assertEqual(self.client.status(), {"time": 1234.5, "ok": True, "error": None,
                                                "results": {"ok": 1, "error": 0}})
        self.assertEqual(self.t.client.keyring.psk.first()[0], NEW)


class ServerRetireTests(ReloadCase):
    """A server reload closes pool connections whose key was removed."""

    def test_added_key_changes_nothing(self) -> None:
        """Adding a key on the server leaves every pool connection up."""
        links = list(self.t.server.pool_connections)
        self.keys.psk("server.key", OLD, NEW)
        self.assertTrue(self.server.reload())
        self.t.net.advance(RETIRE_GRACE + 1)
        self.assertEqual(self.t.server.pool_connections, links)

    def test_removed_key_idle_and_busy(self) -> None:
        """Idle pool connections with a removed key close at once, busy ones after the grace period."""
        peer = self.echo_session()
        self.keys.psk("server.key", NEW)
        self.assertTrue(self.server.reload())
        self.t.net.flush()
        self.assertEqual(len(self.t.server.pool_connections), 1)
        self.assertEqual(len(self.t.server.draining), 1)
        self.t.net.advance(RETIRE_GRACE - 2)
        self.assertFalse(peer.lost)
        self.t.net.advance(3)
        self.assertTrue(peer.lost)
        self.assertEqual(self.t.server.pool_connections, [])
        # The client still uses OLD: the server now refuses it.
        self.assertGreater(self.t.server.stats.handshake_failures[HandshakeFailure.UNKNOWN_KEY], 0)

    def test_full_rotation_keeps_sessions(self) -> None:
        """The README procedure (add, switch clients, remove) never closes a session after the drain."""
        self.rotate()
        self.t.net.advance(CHECK_INTERVAL + 0.5)
        peer = self.echo_session()
        self.keys.psk("server.key", NEW)
        self.assertTrue(self.server.reload())
        self.t.net.advance(RETIRE_GRACE + 1)
        self.assertFalse(peer.lost)
        self.assertEqual(sorted(l.key_id for l in self.t.server.pool_connections), [NEW, NEW])


class ReplacedBytesTests(ReloadCase):
    """A key whose bytes change under the same key id (replaced in place, not rotated)."""

    REPLACED = bytes([0xC3]) * 32

    def replace_old(self, name: str) -> None:
        """Write ``name`` holding OLD's id with other bytes."""
        self.keys.write(name, format_key_line(OLD, self.REPLACED))

    def test_server_retires_old_bytes(self) -> None:
        """A server reload retires pool connections made with the old bytes, though the key id is unchanged."""
        links = list(self.t.server.pool_connections)
        self.assertEqual(len(links), 2)
        self.replace_old("server.key")
        self.assertTrue(self.server.reload())
        self.t.net.flush()
        self.assertTrue(all(link not in self.t.server.pool_connections for link in links))
        # The client still has the old bytes: the server now refuses its hellos.
        self.t.net.advance(2)
        self.assertEqual(self.t.server.pool_connections, [])
        self.assertGreater(sum(self.t.server.stats.handshake_failures.values()), 0)

    def test_both_ends_replaced(self) -> None:
        """With the bytes replaced at both ends, the client's pool connections come back on the new bytes and carry sessions."""
        old_links = list(self.t.client.pool_connections)
        self.replace_old("server.key")
        self.assertTrue(self.server.reload())
        self.replace_old("client.key")
        self.assertTrue(self.client.reload())
        self.t.net.advance(CHECK_INTERVAL + 10)
        self.assertEqual(self.client_key_ids(), [OLD, OLD])
        self.assertFalse(set(old_links) & set(self.t.client.pool_connections))
        self.echo_session()

    def test_same_bytes_keep_connections(self) -> None:
        """Rewriting the file with the same key keeps every pool connection."""
        links = list(self.t.server.pool_connections)
        self.keys.psk("server.key", OLD)
        self.assertTrue(self.server.reload())
        self.t.net.advance(RETIRE_GRACE + 1)
        self.assertEqual(self.t.server.pool_connections, links)


class BrokenFileTests(ReloadCase):
    """A bad key file keeps the old keys and says why."""

    def check_refused(self, reloader: KeyReloader, mux: Any, expected: str) -> None:
        """The reload failed with ``expected`` in its reason and changed nothing."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        before = mux.keyring
        links = list(self.t.client.pool_connections)
        self.assertFalse(reloader.reload())
        self.assertIs(mux.keyring, before)
        self.assertEqual(self.t.client.pool_connections, links)
        self.assertFalse(reloader.status()["ok"])
        self.assertIn(expected, reloader.status()["error"])
        logged = [e for e in events if e.get("log_namespace") == "tigertunnel.ops.reload"]
        self.assertEqual(len(logged), 1)
        self.assertIn(expected, logged[0]["reason"])
        self.assertEqual(reloader.results, {"ok": 0, "error": 1})

    def test_file_without_key_line_refused(self) -> None:
        """A key file without a key line is refused, naming file, line and reason."""
        path = self.keys.write("client.key", "# rotated\nnot a key\n")
        self.check_refused(self.client, self.t.client, f"{path}:2: InvalidKeyFormat")

    def test_missing_file(self) -> None:
        """A deleted key file is refused as unreadable."""
        os.remove(self.t.server.config.key_path)
        self.check_refused(self.server, self.t.server, "Unreadable")

    def test_loose_permissions(self) -> None:
        """A key file readable by others is refused."""
        self.keys.write("client.key", format_key_line(NEW, KEYS[NEW]), 0o644)
        self.check_refused(self.client, self.t.client, "InsecurePermissions")


class KemReloadTests(ReloadCase):
    """KEM key files are reloaded and validated too."""

    kem = True

    def test_new_kem_pair(self) -> None:
        """A new KEM pair on both ends (server keeps both) moves every pool connection to it."""
        new_pub = public_key_from_seed(OTHER_SEED)
        self.keys.write("kem.key", format_key_line(KEM_KEY_ID, KEM_SEED) +
                        format_key_line(99, OTHER_SEED))
        self.assertTrue(self.server.reload())
        self.keys.write("kem.pub", format_key_line(99, new_pub), 0o644)
        self.assertTrue(self.client.reload())
        self.assertEqual(len(self.t.client.draining), 2)
        self.t.net.advance(CHECK_INTERVAL + 0.5)
        self.assertEqual(self.t.client.draining, set())
        self.assertEqual(len(self.t.client.pool_connections), 2)
        self.assertEqual({(c.key_use.kem_id, c.key_use.kem_fingerprint)
                          for c in self.t.client.pool_connections},
                         {(99, public_key_fingerprint(new_pub))})
        self.echo_session()

    def test_server_retires_removed_kem_key(self) -> None:
        """Removing a KEM secret key on the server retires the pool connections made with it."""
        self.assertEqual({c.key_use.kem_id for c in self.t.server.pool_connections},
                         {KEM_KEY_ID})
        self.keys.write("kem.key", format_key_line(99, OTHER_SEED))
        self.assertTrue(self.server.reload())
        self.t.net.flush()
        self.assertEqual(self.t.server.pool_connections, [])

    def test_server_retires_replaced_kem_bytes(self) -> None:
        """KEM secret key bytes replaced under the same KEM key id retire the pool connections made with the old bytes."""
        links = list(self.t.server.pool_connections)
        self.assertEqual({c.key_use.kem_id for c in links}, {KEM_KEY_ID})
        self.assertTrue(all(c.key_use.kem_fingerprint for c in links))
        self.keys.write("kem.key", format_key_line(KEM_KEY_ID, OTHER_SEED))
        self.assertTrue(self.server.reload())
        self.t.net.flush()
        self.assertTrue(all(link not in self.t.server.pool_connections for link in links))

    def test_same_kem_bytes_keep_connections(self) -> None:
        """Rewriting the KEM secret key file with the same key keeps every pool connection."""
        links = list(self.t.server.pool_connections)
        self.keys.write("kem.key", format_key_line(KEM_KEY_ID, KEM_SEED))
        self.assertTrue(self.server.reload())
        self.t.net.advance(RETIRE_GRACE + 1)
        self.assertEqual(self.t.server.pool_connections, links)

    def test_invalid_public_key_refused(self) -> None:
        """A KEM public key that is not a valid ML-KEM key is refused; the old one stays."""
        bad = bytes([0xFF]) * len(public_key_from_seed(KEM_SEED))
        self.keys.write("kem.pub", format_key_line(5, bad), 0o644)
        with self.assertRaises(ReloadError) as caught:
            load_keys(self.t.client.config)
        self.assertIn("unusable KEM public key", str(caught.exception))
        self.assertFalse(self.client.reload())
        self.assertEqual(self.t.client.keyring.kem_public[0], KEM_KEY_ID)


class PlaintextTests(SynchronousTestCase):
    """Plaintext mode has no key files."""

    def test_nothing_to_reload(self) -> None:
        """A reload in plaintext mode succeeds and changes nothing."""
        t = Tunnel(plaintext=True)
        t.start()
        reloader = KeyReloader([t.client], t.clock)
        self.assertTrue(reloader.reload())
        self.assertIsNone(t.client.keyring.psk)
        reloader.stop()


class FakeReactor:
    """Collects ``callFromThread`` calls, to run them when the test says."""

    def __init__(self) -> None:
        self.calls: List[Tuple[Callable[..., Any], tuple]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        """Queue ``f(*args)``."""
        self.calls.append((f, args))

    def run(self) -> None:
        """Run the queued calls (what the reactor thread would do)."""
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class Recorder:
    """A reload listener recording what it is told."""

    def __init__(self) -> None:
        self.events: List[str] = []

    def reloading(self) -> None:
        """Record the start of a reload."""
        self.events.append("reloading")

    def reloaded(self, ok: bool) -> None:
        """Record the end of a reload and its result."""
        self.events.append(f"reloaded {ok}")


class ReloadServiceTests(ReloadCase):
    """SIGHUP triggers a reload in the reactor thread."""

    def test_real_sighup_reloads(self) -> None:
        """A real SIGHUP reloads (via callFromThread); stopping restores the previous handler."""
        previous = signal.getsignal(signal.SIGHUP)
        reactor, recorder = FakeReactor(), Recorder()
        service = ReloadService(self.client, reactor, [recorder])
        service.startService()
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        self.keys.psk("client.key", NEW)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(self.t.client.keyring.psk.first()[0], OLD)
        reactor.run()
        self.assertEqual(self.t.client.keyring.psk.first()[0], NEW)
        self.assertEqual(recorder.events, ["reloading", "reloaded True"])
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    def test_failed_reload_reported(self) -> None:
        """Listeners hear that a reload failed."""
        recorder = Recorder()
        service = ReloadService(self.client, FakeReactor(), [recorder])
        service.running = 1  # started without installing a handler
        self.keys.write("client.key", "broken\n")
        self.assertFalse(service.reload())
        self.assertEqual(recorder.events, ["reloading", "reloaded False"])

    def test_not_running_ignores(self) -> None:
        """A SIGHUP that arrives after the service stopped does nothing."""
        service = ReloadService(self.client, FakeReactor())
        self.keys.psk("client.key", NEW)
        self.assertFalse(service.reload())
        self.assertEqual(self.t.client.keyring.psk.first()[0], OLD)


class DrainingStateTests(ReloadCase):
    """Retired is a state of the pool connection (DRAINING), moved by the multiplexer."""

    def test_retired_connection_is_draining(self) -> None:
        """A busy pool connection keyed with a retired key moves to DRAINING, shows as
        draining in the snapshot, and to CLOSING once its session ends."""
        peer = self.echo_session()
        busy = self.link_of(peer)
        self.rotate()
        self.assertIs(busy.state, PoolState.DRAINING)
        snap = self.t.client.snapshot()
        self.assertEqual({c.name: c.state for c in snap.pool_connections}[busy.name],
                         "draining")
        self.assertEqual(snap.draining, 2)  # the idle one is closing: listed until gone
        peer.transport.loseConnection()
        self.t.net.flush()
        self.t.net.advance(CHECK_INTERVAL + 0.5)
        self.assertIn(busy.state, (PoolState.CLOSING, PoolState.CLOSED))

    def test_key_current_again_renews(self) -> None:
        """A reload that makes a draining connection's key current again moves it back to
        ESTABLISHED: it is kept past the drain timeout and takes sessions again."""
        peer = self.echo_session()
        busy = self.link_of(peer)
        self.rotate()
        self.assertIs(busy.state, PoolState.DRAINING)
        self.keys.psk("client.key", OLD, NEW)
        self.assertTrue(self.client.reload())
        self.assertIs(busy.state, PoolState.ESTABLISHED)
        self.assertNotIn(busy, self.t.client.draining)
        self.t.net.advance(DRAIN_TIMEOUT + 5)
        self.assertIn(busy, self.t.client.pool_connections)
        self.assertIs(busy.state, PoolState.ESTABLISHED)
