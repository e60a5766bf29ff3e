"""Tests for tigertunnel.wire.handshake: messages, checks and the two state machines."""

from typing import Any, Callable, List

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import load_vectors, unhex
from tigertunnel.wire import handshake as hs
from tigertunnel.crypto import kdf, kem
from tigertunnel.crypto.kdf import SessionKeys, derive_session_keys
from tigertunnel.errors import HandshakeError
from tigertunnel.keys.ring import KeyUse
from tigertunnel.wire.replaywindow import Verdict

HELLO = load_vectors("hello")
SESSIONS = [load_vectors("session_psk"), load_vectors("session_kem")]

PSK = bytes(range(32))
OTHER_PSK = bytes(range(1, 33))
KEY_ID = 0x0123456789ABCDEF
KEM_KEY_ID = 477462853749726568
KEM_SEED = bytes(range(32))
KEM_PUBLIC = kem.public_key_from_seed(KEM_SEED)
CR = bytes(range(0xA0, 0xB0))
SR = bytes(range(0xB0, 0xC0))
NOW = 1732712345
ENCAPS_SEED = bytes(range(0x40, 0x80))


def draws(*values: bytes) -> Callable[[int], bytes]:
    """Return a random source handing out ``values`` in order (sizes checked)."""
    queue = list(values)

    def random(n: int) -> bytes:
        value = queue.pop(0)
        assert len(value) == n, (n, value)
        return value
    return random


def fixed_encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
    return kem.encapsulate(public_key, ENCAPS_SEED)


def make_client(kem_mode: bool = False, cluster_id: int = 0,
                now: float = NOW, **kw: Any) -> hs.ClientHandshake:
    return hs.ClientHandshake(
        KEY_ID, PSK, cluster_id,
        kem_public=(KEM_KEY_ID, KEM_PUBLIC) if kem_mode else None,
        random=draws(CR), now=lambda: now, encapsulate=fixed_encapsulate, **kw)


def make_server(kem_keys: Any = None, cluster_id: int = 0, now: float = NOW,
                **kw: Any) -> hs.ServerHandshake:
    return hs.ServerHandshake({KEY_ID: PSK, 7: OTHER_PSK}, kem_keys, cluster_id,
                              random=draws(SR), now=lambda: now, **kw)


def connect_hello(version: int = 1, key_id: int = KEY_ID, psk: bytes = PSK,
                  timestamp: int = NOW) -> bytes:
    return hs.build_connect_hello(version, key_id, psk, CR, timestamp)


def kem_hello(kem_key_id: int = KEM_KEY_ID, ciphertext: bytes | None = None) -> bytes:
    if ciphertext is None:
        ciphertext = fixed_encapsulate(KEM_PUBLIC)[0]
    return hs.build_kemconnect_hello(1, KEY_ID, PSK, kem_key_id, CR, NOW, ciphertext)


class FixedVerdictCache:
    """A replay cache that always gives one verdict."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict

    def check_and_add(self, digest: bytes, timestamp: int) -> Verdict:
        return self.verdict


def feed_chunks(machine: Any, data: bytes, cuts: List[int]) -> tuple[List[Any], int]:
    """Feed ``data`` cut at ``cuts`` until a result that is not None.

    :return: every result, and the offset where the last chunk fed ended.
    """
    results = []
    bounds = [0] + sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]
    end = 0
    for start, end in zip(bounds, bounds[1:]):
        result = machine.feed(data[start:end])
        results.append(result)
        if result is not None:
            break
    return results, end


class MessageVectorTests(SynchronousTestCase):
    """The message builders reproduce hello.json."""

    def test_constants(self) -> None:
        """Wire constants match PROTOCOL.md sections 1 and 3."""
        self.assertEqual((hs.PROTOCOL_VERSION, hs.OP_CONNECT, hs.OP_KEMCONNECT), (1, 0, 1))
        self.assertEqual((hs.CONNECT_HELLO_SIZE, hs.KEMCONNECT_HELLO_SIZE,
                          hs.SERVER_HELLO_SIZE, hs.TIMESTAMP_TOLERANCE), (66, 1194, 49, 3600))
        self.assertEqual([s.value for s in hs.Status], [0, 1, 2, 3, 4, 5])

    def test_connect_message(self) -> None:
        """The 66-byte connect ClientHello equals the reference bytes."""
        v = HELLO["connect_message"]
        message = hs.build_connect_hello(1, int(v["key_id"]), unhex(v["psk"]),
                                         unhex(v["client_random"]), int(v["timestamp"]))
        self.assertEqual(message, unhex(v["message"]))
        self.assertEqual(len(message), v["length"])

    def test_kemconnect_message(self) -> None:
        """The 1194-byte kemconnect ClientHello, its ciphertext and secret match."""
        v = HELLO["kemconnect_message"]
        public = kem.public_key_from_seed(unhex(v["kem_seed"]))
        self.assertEqual(public, unhex(v["kem_public_key"]))
        ciphertext, secret = kem.encapsulate(public, unhex(v["encaps_seed"]))
        self.assertEqual(secret, unhex(v["kem_shared_secret"]))
        message = hs.build_kemconnect_hello(
            1, int(v["key_id"]), unhex(v["psk"]), int(v["kem_key_id"]),
            unhex(v["client_random"]), int(v["timestamp"]), ciphertext)
        self.assertEqual(message, unhex(v["message"]))
        self.assertEqual(len(message), v["length"])

    def test_server_hello_messages(self) -> None:
        """Every server_hello_messages entry is reproduced (ok replies and status bytes)."""
        self.assertEqual(len(HELLO["server_hello_messages"]), 7)
        for v in HELLO["server_hello_messages"]:
            status = hs.Status(v["status_code"])
            self.assertEqual(status.name.lower(), v["status"])
            if status is hs.Status.OK:
                message = hs.build_server_hello(unhex(v["psk"]), unhex(v["client_random"]),
                                                unhex(v["server_random"]),
                                                int(v["cluster_id"]))
                self.assertEqual(len(message), hs.SERVER_HELLO_SIZE)
            else:
                message = bytes((status,))
            self.assertEqual(message, unhex(v["message"]))

    def test_server_rejections_match_vectors(self) -> None:
        """The reply bytes of real server rejections equal the vector status bytes."""
        by_name = {v["status"]: unhex(v["message"]) for v in HELLO["server_hello_messages"]}
        bad_ct = fixed_encapsulate(KEM_PUBLIC)[0][:1088] + bytes(32)
        cases = [
            ("unknown_key", make_server(), connect_hello(key_id=99)),
            ("server_error", make_server({KEM_KEY_ID: KEM_SEED}), kem_hello(ciphertext=bad_ct)),
            ("unknown_kem_key", make_server({1: KEM_SEED}), kem_hello()),
            ("client_auth_failed", make_server(), connect_hello(psk=OTHER_PSK)),
            ("timestamp_invalid", make_server(), connect_hello(timestamp=NOW - 3601)),
        ]
        for name, server, hello in cases:
            result = server.feed(hello)
            self.assertIsInstance(result, hs.Rejected)
            self.assertEqual(result.reply, by_name[name])
            self.assertEqual(result.status.name.lower(), name)


class SessionVectorTests(SynchronousTestCase):
    """The handshakes of session_psk.json and session_kem.json are rebuilt exactly."""

    def segment(self, session: dict, direction: str, kind: str) -> bytes:
        found = [s for s in session[direction + "_segments"] if s["kind"] == kind]
        self.assertEqual(len(found), 1)
        return unhex(found[0]["bytes"])

    def machines(self, s: dict) -> tuple[hs.ClientHandshake, hs.ServerHandshake]:
        kem_mode = s["mode"] == "kemconnect"
        encaps_seed = unhex(s["encaps_seed"]) if kem_mode else b""
        client = hs.ClientHandshake(
            int(s["key_id"]), unhex(s["psk"]), int(s["cluster_id"]),
            kem_public=(int(s["kem_key_id"]), unhex(s["kem_public_key"])) if kem_mode else None,
            version=hs.PROTOCOL_VERSION, random=draws(unhex(s["client_random"])),
            now=lambda: int(s["timestamp"]) + 0.75,
            encapsulate=lambda pk: kem.encapsulate(pk, encaps_seed))
        server = hs.ServerHandshake(
            {int(s["key_id"]): unhex(s["psk"])},
            {int(s["kem_key_id"]): unhex(s["kem_seed"])} if kem_mode else None,
            int(s["cluster_id"]), random=draws(unhex(s["server_random"])),
            now=lambda: int(s["timestamp"]))
        return client, server

    def test_hello_bytes(self) -> None:
        """Builders fed the session inputs give the captured ClientHello and ServerHello."""
        for s in SESSIONS:
            psk, cr, sr = unhex(s["psk"]), unhex(s["client_random"]), unhex(s["server_random"])
            if s["mode"] == "connect":
                hello = hs.build_connect_hello(1, int(s["key_id"]), psk, cr, int(s["timestamp"]))
            else:
                self.assertEqual(kem.public_key_from_seed(unhex(s["kem_seed"])),
                                 unhex(s["kem_public_key"]))
                ct, _ = kem.encapsulate(unhex(s["kem_public_key"]), unhex(s["encaps_seed"]))
                hello = hs.build_kemconnect_hello(1, int(s["key_id"]), psk,
                                                  int(s["kem_key_id"]), cr,
                                                  int(s["timestamp"]), ct)
            self.assertEqual(hello, self.segment(s, "client_to_server", "client_hello"))
            self.assertEqual(hs.build_server_hello(psk, cr, sr, int(s["cluster_id"])),
                             self.segment(s, "server_to_client", "server_hello"))

    def test_derived_keys(self) -> None:
        """derive_session_keys gives each session's derived_keys_client_side."""
        for s in SESSIONS:
            secret = None
            if s["mode"] == "kemconnect":
                _, secret = kem.encapsulate(unhex(s["kem_public_key"]), unhex(s["encaps_seed"]))
            keys = derive_session_keys(unhex(s["psk"]), unhex(s["client_random"]),
                                       unhex(s["server_random"]), secret)
            d = s["derived_keys_client_side"]
            self.assertEqual(keys, SessionKeys(unhex(d["c2s_key"]), unhex(d["c2s_nonce"]),
                                               unhex(d["s2c_key"]), unhex(d["s2c_nonce"])))

    def test_machines_reproduce_session(self) -> None:
        """Client and server machines exchange the captured bytes and derive its keys."""
        for s in SESSIONS:
            client, server = self.machines(s)
            hello = client.start()
            self.assertEqual(hello, self.segment(s, "client_to_server", "client_hello"))
            c2s, s2c = unhex(s["client_to_server"]), unhex(s["server_to_client"])
            accepted = server.feed(c2s)
            self.assertIsInstance(accepted, hs.Accepted)
            self.assertEqual(accepted.reply, self.segment(s, "server_to_client", "server_hello"))
            self.assertEqual(accepted.established.leftover, c2s[len(hello):])
            established = client.feed(s2c)
            self.assertEqual(established.leftover, s2c[hs.SERVER_HELLO_SIZE:])
            d = s["derived_keys_client_side"]
            expected = SessionKeys(unhex(d["c2s_key"]), unhex(d["c2s_nonce"]),
                                   unhex(d["s2c_key"]), unhex(d["s2c_nonce"]))
            self.assertEqual(established.keys, expected)
            self.assertEqual(accepted.established.keys, expected)
            for e in (established, accepted.established):
                self.assertEqual((e.mode, e.peer_version, e.key_id), (s["mode"], 1, int(s["key_id"])))
                self.assertEqual(e.kem_key_id, int(s["kem_key_id"]) if "kem_key_id" in s else None)


class RoundTripTests(SynchronousTestCase):
    """A ClientHandshake and a ServerHandshake talking to each other."""

    def run_pair(self, client: hs.ClientHandshake,
                 server: hs.ServerHandshake) -> tuple[hs.Established, hs.Established]:
        accepted = server.feed(client.start())
        self.assertIsInstance(accepted, hs.Accepted)
        established = client.feed(accepted.reply)
        self.assertIsInstance(established, hs.Established)
        return established, accepted.established

    def test_connect(self) -> None:
        """A PSK-only handshake with real randomness gives both sides the same keys."""
        client = hs.ClientHandshake(KEY_ID, PSK, 12345, now=lambda: NOW)
        server = hs.ServerHandshake({KEY_ID: PSK}, None, 12345, now=lambda: NOW)
        mine, theirs = self.run_pair(client, server)
        self.assertEqual(mine.keys, theirs.keys)
        self.assertEqual((mine.mode, theirs.mode), ("connect", "connect"))
        self.assertEqual((mine.peer_version, theirs.peer_version),
                         (hs.EXTENDED_VERSION, hs.EXTENDED_VERSION))
        self.assertEqual((theirs.kem_key_id, theirs.leftover), (None, b""))

    def test_kemconnect(self) -> None:
        """A hybrid-KEM handshake with native encapsulation gives both sides the same keys."""
        client = hs.ClientHandshake(KEY_ID, PSK, kem_public=(KEM_KEY_ID, KEM_PUBLIC),
                                    now=lambda: NOW)
        server = hs.ServerHandshake({KEY_ID: PSK}, {KEM_KEY_ID: KEM_SEED}, now=lambda: NOW)
        mine, theirs = self.run_pair(client, server)
        self.assertEqual(mine.keys, theirs.keys)
        self.assertEqual((mine.mode, theirs.mode), ("kemconnect", "kemconnect"))
        self.assertEqual((mine.kem_key_id, theirs.kem_key_id), (KEM_KEY_ID, KEM_KEY_ID))

    def test_kemconnect_with_expanded_key(self) -> None:
        """The server also accepts an already expanded SecretKey in kem_keys."""
        server = make_server({KEM_KEY_ID: kem.SecretKey(KEM_SEED)})
        mine, theirs = self.run_pair(make_client(kem_mode=True), server)
        _, secret = fixed_encapsulate(KEM_PUBLIC)
        self.assertEqual(theirs.keys, derive_session_keys(PSK, CR, SR, secret))
        self.assertEqual(mine.keys, theirs.keys)

    def test_require_kem_accepts_kemconnect(self) -> None:
        """A server requiring KEM still accepts a kemconnect hello."""
        mine, theirs = self.run_pair(make_client(kem_mode=True),
                                     make_server({KEM_KEY_ID: KEM_SEED}, require_kem=True))
        self.assertEqual(mine.keys, theirs.keys)

    def test_draw_order(self) -> None:
        """The client draws client_random before encapsulating, then the timestamp is used."""
        calls: List[str] = []

        def random(n: int) -> bytes:
            calls.append("random")
            return CR

        def encapsulate(pk: bytes) -> tuple[bytes, bytes]:
            calls.append("encapsulate")
            return fixed_encapsulate(pk)
        client = hs.ClientHandshake(KEY_ID, PSK, kem_public=(KEM_KEY_ID, KEM_PUBLIC),
                                    version=1, random=random, now=lambda: NOW,
                                    encapsulate=encapsulate)
        self.assertEqual(client.start(), kem_hello())
        self.assertEqual(calls, ["random", "encapsulate"])

    def test_timestamp_truncated(self) -> None:
        """The ClientHello timestamp is the whole seconds of now(), truncated."""
        hello = make_client(now=NOW + 0.999, version=1).start()
        self.assertEqual(hello, connect_hello())

    def test_client_leftover(self) -> None:
        """Bytes after the ServerHello in the same chunk are returned as leftover."""
        client = make_client()
        client.start()
        reply = hs.build_server_hello(PSK, CR, SR, 0)
        self.assertIsNone(client.feed(reply[:10]))
        self.assertEqual(client.feed(reply[10:] + b"XUMZmore").leftover, b"XUMZmore")

    def test_server_leftover(self) -> None:
        """Bytes after the ClientHello in the same chunk are returned as leftover."""
        server = make_server()
        hello = connect_hello()
        self.assertIsNone(server.feed(hello[:65]))
        result = server.feed(hello[65:] + b"pipelined")
        self.assertEqual(result.established.leftover, b"pipelined")


class ServerRejectionTests(SynchronousTestCase):
    """Each check of PROTOCOL.md section 3.3, in order."""

    def assertRejected(self, result: Any, status: hs.Status | None,
                       reason: str | None = None) -> hs.Rejected:
        self.assertIsInstance(result, hs.Rejected)
        self.assertEqual(result.status, status)
        self.assertEqual(result.reply, b"" if status is None else bytes((status,)))
        if reason is not None:
            self.assertEqual(result.reason, reason)
        return result

    def test_unknown_operation_after_two_bytes(self) -> None:
        """An unknown operation byte is rejected without reply as soon as it arrives."""
        for op in (2, 0x55, 255):
            server = make_server()
            self.assertIsNone(server.feed(b"\x01"))
            self.assertRejected(server.feed(bytes((op,))), None)

    def test_any_version_accepted(self) -> None:
        """Any version byte is accepted when the hash verifies, and is remembered."""
        for version in (0, 1, 2, 7, 255):
            result = make_server().feed(connect_hello(version=version))
            self.assertEqual(result.established.peer_version, version)

    def test_unknown_key(self) -> None:
        """An unknown PSK key id gets status 1."""
        self.assertRejected(make_server().feed(connect_hello(key_id=8)), hs.Status.UNKNOWN_KEY,
                            "unknown key id 8")

    def test_unknown_key_before_hash(self) -> None:
        """The key id is checked before the hash, so a garbage hash still gets status 1."""
        hello = connect_hello(key_id=8)[:34] + bytes(32)
        self.assertRejected(make_server().feed(hello), hs.Status.UNKNOWN_KEY)

    def test_bad_hash(self) -> None:
        """A ClientHello hashed with another PSK, or with any byte flipped, gets status 4."""
        self.assertRejected(make_server().feed(connect_hello(psk=OTHER_PSK)),
                            hs.Status.CLIENT_AUTH_FAILED)
        hello = connect_hello()
        for i in [0] + list(range(10, 66)):
            tampered = hello[:i] + bytes((hello[i] ^ 0x01,)) + hello[i + 1:]
            self.assertRejected(make_server().feed(tampered), hs.Status.CLIENT_AUTH_FAILED)

    def test_hash_before_timestamp(self) -> None:
        """A stale hello with a bad hash gets status 4, not 5."""
        self.assertRejected(make_server().feed(connect_hello(psk=OTHER_PSK, timestamp=0)),
                            hs.Status.CLIENT_AUTH_FAILED)

    def test_timestamp_window(self) -> None:
        """Exactly 3600 s of skew either way is accepted; 3601 s is rejected with the skew."""
        for skew in (-3600, 0, 3600):
            self.assertIsInstance(make_server().feed(connect_hello(timestamp=NOW + skew)),
                                  hs.Accepted)
        for skew in (-3601, 3601, NOW, -NOW):
            result = self.assertRejected(
                make_server().feed(connect_hello(timestamp=NOW + skew)),
                hs.Status.TIMESTAMP_INVALID)
            self.assertEqual(result.skew, skew)

    def test_timestamp_uses_whole_seconds(self) -> None:
        """The server truncates its clock to whole seconds before comparing."""
        server = make_server(now=NOW - 3600 + 0.9)
        self.assertIsInstance(server.feed(connect_hello(timestamp=NOW)), hs.Accepted)

    def test_timestamp_window_with_fractional_clock(self) -> None:
        """With the server clock at T+0.999, timestamps T±3600 are accepted and T±3601 refused with skew ±3601."""
        for skew, accepted in ((3600, True), (-3600, True), (3601, False), (-3601, False)):
            hello = hs.build_connect_hello(2, KEY_ID, PSK, CR, NOW + skew)
            server = make_server(now=NOW + 0.999, replay_cache=hs.ReplayCache(now=lambda: NOW))
            result = server.feed(hello)
            if accepted:
                self.assertIsInstance(result, hs.Accepted, skew)
            else:
                self.assertIsInstance(result, hs.Rejected, skew)
                assert isinstance(result, hs.Rejected)
                self.assertEqual((result.status, result.skew),
                                 (hs.Status.TIMESTAMP_INVALID, skew))

    def test_no_kem_keys(self) -> None:
        """A kemconnect hello to a server without KEM keys gets status 3."""
        for keys in (None, {}):
            self.assertRejected(make_server(keys).feed(kem_hello()), hs.Status.UNKNOWN_KEM_KEY)

    def test_unknown_kem_key(self) -> None:
        """A kemconnect hello naming an unknown KEM key id gets status 3."""
        self.assertRejected(make_server({KEM_KEY_ID: KEM_SEED}).feed(kem_hello(kem_key_id=5)),
                            hs.Status.UNKNOWN_KEM_KEY, "unknown KEM key id 5")

    def test_kem_checked_after_timestamp(self) -> None:
        """A stale kemconnect hello to a server without KEM keys gets status 5."""
        hello = hs.build_kemconnect_hello(1, KEY_ID, PSK, KEM_KEY_ID, CR, NOW - 4000,
                                          fixed_encapsulate(KEM_PUBLIC)[0])
        self.assertRejected(make_server().feed(hello), hs.Status.TIMESTAMP_INVALID)

    def test_decapsulation_failure(self) -> None:
        """An all-zero X25519 ciphertext part (not covered by the hash) gets status 2."""
        bad = fixed_encapsulate(KEM_PUBLIC)[0][:1088] + bytes(32)
        self.assertRejected(make_server({KEM_KEY_ID: KEM_SEED}).feed(kem_hello(ciphertext=bad)),
                            hs.Status.SERVER_ERROR)

    def test_swapped_ciphertext_accepted(self) -> None:
        """A swapped ML-KEM ciphertext still completes but the keys then differ (section 11.4)."""
        ct = fixed_encapsulate(KEM_PUBLIC)[0]
        tampered = bytes((ct[0] ^ 1,)) + ct[1:]
        client = make_client(kem_mode=True, version=1)
        client.start()
        result = make_server({KEM_KEY_ID: KEM_SEED}).feed(kem_hello(ciphertext=tampered))
        self.assertNotEqual(client.feed(result.reply).keys, result.established.keys)

    def test_require_kem_refuses_connect(self) -> None:
        """A server requiring KEM refuses a verified connect hello with status 4."""
        self.assertRejected(make_server(require_kem=True).feed(connect_hello()),
                            hs.Status.CLIENT_AUTH_FAILED,
                            "PSK-only handshake refused (server requires KEM)")

    def test_require_kem_after_hash(self) -> None:
        """With require_kem, a connect hello with a bad hash is reported as a hash failure."""
        result = self.assertRejected(
            make_server(require_kem=True).feed(connect_hello(psk=OTHER_PSK)),
            hs.Status.CLIENT_AUTH_FAILED)
        self.assertNotIn("requires KEM", result.reason)

    def test_rejection_kinds(self) -> None:
        """Every rejection carries the kind of its check, whatever its status byte or reason text."""
        bad_ciphertext = fixed_encapsulate(KEM_PUBLIC)[0][:1088] + bytes(32)
        cache = hs.ReplayCache(now=lambda: NOW)
        make_server(replay_cache=cache).feed(connect_hello())
        full = hs.ReplayCache(buckets=1, slots=1, now=lambda: NOW)
        full.check_and_add(b"x" * 32, NOW)
        failing = FixedVerdictCache(Verdict.FAILED)
        cases = [
            (make_server(versions=(1, 2)).feed(b"\x07"), hs.RejectKind.BAD_VERSION),
            (make_server().feed(b"\x01\x09"), hs.RejectKind.BAD_OPERATION),
            (make_server().feed(connect_hello(key_id=8)), hs.RejectKind.UNKNOWN_KEY),
            (make_server(hide_unknown_key=True).feed(connect_hello(key_id=8)),
             hs.RejectKind.UNKNOWN_KEY),
            (make_server().feed(connect_hello(psk=OTHER_PSK)), hs.RejectKind.BAD_HASH),
            (make_server().feed(connect_hello(timestamp=NOW - 4000)), hs.RejectKind.TIMESTAMP),
            (make_server(replay_cache=cache).feed(connect_hello()), hs.RejectKind.REPLAY),
            (make_server(replay_cache=full).feed(connect_hello()),
             hs.RejectKind.REPLAY_CACHE_FULL),
            (make_server(replay_cache=failing).feed(connect_hello()),
             hs.RejectKind.REPLAY_CACHE_ERROR),
            (make_server(require_kem=True).feed(connect_hello()), hs.RejectKind.KEM_REQUIRED),
            (make_server().feed(kem_hello()), hs.RejectKind.KEM),
            (make_server({KEM_KEY_ID: KEM_SEED}).feed(kem_hello(kem_key_id=5)),
             hs.RejectKind.KEM),
            (make_server({KEM_KEY_ID: KEM_SEED}).feed(kem_hello(ciphertext=bad_ciphertext)),
             hs.RejectKind.KEM),
        ]
        self.assertEqual([r.kind for r, _ in cases], [kind for _, kind in cases])
        self.assertEqual({kind for _, kind in cases}, set(hs.RejectKind))

    def test_replay_accepted(self) -> None:
        """The same ClientHello is accepted by a second server (no replay cache)."""
        self.assertIsInstance(make_server().feed(connect_hello()), hs.Accepted)
        self.assertIsInstance(make_server().feed(connect_hello()), hs.Accepted)

    def test_feed_after_end(self) -> None:
        """Feeding a server machine after it accepted or rejected raises HandshakeError."""
        accepted = make_server()
        accepted.feed(connect_hello())
        self.assertRaises(HandshakeError, accepted.feed, b"x")
        rejected = make_server()
        rejected.feed(b"\x01\x09")
        self.assertRaises(HandshakeError, rejected.feed, b"")

    def test_bad_configuration(self) -> None:
        """Malformed keys or cluster ids are refused when the machine is built."""
        self.assertRaises(ValueError, hs.ServerHandshake, {1: PSK[:31]})
        self.assertRaises(ValueError, hs.ServerHandshake, {1: PSK}, {2: KEM_SEED[:16]})
        self.assertRaises(ValueError, hs.ServerHandshake, {1: PSK}, None, -1)
        self.assertRaises(ValueError, hs.ClientHandshake, 1 << 64, PSK)
        self.assertRaises(ValueError, hs.ClientHandshake, 1, PSK, 1 << 128)
        self.assertRaises(ValueError, hs.ClientHandshake, 1, PSK + b"x")
        self.assertRaises(ValueError, hs.ClientHandshake, 1, PSK, kem_public=(1, b"short"))
        self.assertRaises(ValueError, hs.ClientHandshake, 1, PSK, version=256)


class ClientFailureTests(SynchronousTestCase):
    """The client's checks of the ServerHello (PROTOCOL.md section 3.5)."""

    def started(self, **kw: Any) -> hs.ClientHandshake:
        client = make_client(**kw)
        client.start()
        return client

    def test_rejection_statuses(self) -> None:
        """Statuses 1-5 raise HandshakeError naming the status (4 and 5 with a hint)."""
        for status in list(hs.Status)[1:]:
            client = self.started()
            with self.assertRaises(HandshakeError) as cm:
                client.feed(bytes((status,)))
            self.assertTrue(str(cm.exception).startswith(
                f"server rejected handshake: {status.name.lower()}"))
            if status == hs.Status.TIMESTAMP_INVALID:
                self.assertIn("check NTP", str(cm.exception))
            self.assertIs(cm.exception.status, status)
            self.assertRaises(HandshakeError, client.feed, b"")

    def test_invalid_status(self) -> None:
        """A status byte above 5 raises HandshakeError as an invalid status."""
        for status in (6, 0x58, 255):
            with self.assertRaises(HandshakeError) as cm:
                self.started().feed(bytes((status,)) + bytes(48))
            self.assertEqual(cm.exception.status, status)
            self.assertIn("invalid handshake status", str(cm.exception))

    def test_wrong_cluster_id(self) -> None:
        """A server configured with another cluster id fails server authentication."""
        client = make_client(cluster_id=0)
        accepted = make_server(cluster_id=12345).feed(client.start())
        with self.assertRaises(HandshakeError) as cm:
            client.feed(accepted.reply)
        self.assertEqual(str(cm.exception),
                         "server authentication failed (check that both ends use the "
                         "same -c cluster id and key)")
        self.assertIsNone(cm.exception.status)
        self.assertRaises(HandshakeError, client.feed, b"")

    def test_needs_whole_server_hello(self) -> None:
        """The client waits for all 49 bytes of an ok ServerHello."""
        client = self.started()
        reply = hs.build_server_hello(PSK, CR, SR, 0)
        for i in range(48):
            self.assertIsNone(client.feed(reply[i:i + 1]))
        self.assertIsInstance(client.feed(reply[48:]), hs.Established)

    def test_calls_out_of_order_raise(self) -> None:
        """feed before start, start twice and feed after success raise HandshakeError."""
        client = make_client()
        self.assertRaises(HandshakeError, client.feed, b"\x00")
        client.start()
        self.assertRaises(HandshakeError, client.start)
        client.feed(hs.build_server_hello(PSK, CR, SR, 0))
        self.assertRaises(HandshakeError, client.feed, b"")

    def test_encapsulation_failure(self) -> None:
        """A KEM public key with a low-order X25519 part makes start() raise HandshakeError."""
        client = hs.ClientHandshake(KEY_ID, PSK, kem_public=(1, KEM_PUBLIC[:1184] + bytes(32)),
                                    now=lambda: NOW)
        self.assertRaises(HandshakeError, client.start)


class PropertyTests(SynchronousTestCase):
    """Chunking invariance and robustness against arbitrary input."""

    @given(st.booleans(), st.lists(st.integers(min_value=0)), st.binary(max_size=40))
    def test_server_chunking_invariance(self, kem_mode: bool, cuts: List[int],
                                        extra: bytes) -> None:
        """Any split of the ClientHello gives the same acceptance and keys."""
        hello = kem_hello() if kem_mode else connect_hello()
        whole = make_server({KEM_KEY_ID: KEM_SEED}).feed(hello + extra)
        self.assertEqual(whole.established.leftover, extra)
        results, end = feed_chunks(make_server({KEM_KEY_ID: KEM_SEED}), hello + extra, cuts)
        self.assertTrue(all(r is None for r in results[:-1]))
        result = results[-1]
        self.assertEqual((result.reply, result.established.keys),
                         (whole.reply, whole.established.keys))
        # The leftover is what came after the hello in the completing chunk.
        self.assertEqual(result.established.leftover, (hello + extra)[len(hello):end])

    @given(st.lists(st.integers(min_value=0)), st.binary(max_size=40))
    def test_client_chunking_invariance(self, cuts: List[int], extra: bytes) -> None:
        """Any split of the ServerHello gives the same keys."""
        client = make_client()
        client.start()
        data = hs.build_server_hello(PSK, CR, SR, 0) + extra
        results, end = feed_chunks(client, data, cuts)
        self.assertTrue(all(r is None for r in results[:-1]))
        self.assertEqual(results[-1].keys, derive_session_keys(PSK, CR, SR))
        self.assertEqual(results[-1].leftover, data[hs.SERVER_HELLO_SIZE:end])

    @given(st.binary(max_size=1300), st.lists(st.integers(min_value=0), max_size=8),
           st.sampled_from([b"", b"\x01\x00", b"\x01\x01", b"\x02\x00"]))
    def test_server_arbitrary_input(self, data: bytes, cuts: List[int], prefix: bytes) -> None:
        """Arbitrary bytes in any chunks give None, Accepted or Rejected, never an exception."""
        server = make_server({KEM_KEY_ID: KEM_SEED, 0: KEM_SEED})
        for result in feed_chunks(server, prefix + data, cuts)[0]:
            self.assertIsInstance(result, (type(None), hs.Accepted, hs.Rejected))

    @given(st.binary(max_size=100), st.lists(st.integers(min_value=0), max_size=8))
    def test_client_arbitrary_input(self, data: bytes, cuts: List[int]) -> None:
        """Arbitrary ServerHello bytes give None or HandshakeError, never another exception."""
        client = make_client()
        client.start()
        try:
            results, _ = feed_chunks(client, data, cuts)
        except HandshakeError:
            return
        self.assertTrue(all(r is None for r in results))


class HardeningTests(SynchronousTestCase):
    """Replay refusal and the uniform failure status."""

    def test_replayed_hello_refused(self) -> None:
        """A byte-identical ClientHello presented twice is refused the second time with status 4."""
        cache = hs.ReplayCache(now=lambda: NOW)
        client = make_client()
        hello = client.start()
        first = make_server(replay_cache=cache).feed(hello)
        self.assertIsInstance(first, hs.Accepted)
        again = make_server(replay_cache=cache).feed(hello)
        self.assertIsInstance(again, hs.Rejected)
        self.assertEqual(again.status, hs.Status.CLIENT_AUTH_FAILED)
        self.assertIn("replayed", again.reason)

    def test_replay_cache_forgets_expired_and_refuses_when_full(self) -> None:
        """Entries older than the timestamp window are forgotten; a full cache refuses new hellos and never forgets an unexpired one."""
        clock = [1000.0]
        cache = hs.ReplayCache(buckets=1, slots=3, now=lambda: clock[0])
        verdicts = [cache.check_and_add(bytes([i]) * 32, 1000) for i in range(5)]
        self.assertEqual(verdicts, [Verdict.FRESH] * 3 + [Verdict.FULL] * 2)
        self.assertEqual(len(cache), 3)
        self.assertIs(cache.check_and_add(bytes([0]) * 32, 1000), Verdict.REPLAYED)
        clock[0] += hs.TIMESTAMP_TOLERANCE + 5
        self.assertIs(cache.check_and_add(b"x" * 32, int(clock[0])), Verdict.FRESH)
        self.assertEqual(len(cache), 1)

    def test_full_cache_refuses_hello(self) -> None:
        """A hello the replay cache has no room for is refused with status 2 (server error), kind REPLAY_CACHE_FULL, and is not a replay."""
        cache = hs.ReplayCache(buckets=1, slots=1, now=lambda: NOW)
        cache.check_and_add(b"x" * 32, NOW)
        result = make_server(replay_cache=cache).feed(connect_hello())
        self.assertIsInstance(result, hs.Rejected)
        self.assertEqual(result.reply, bytes((hs.Status.SERVER_ERROR,)))
        self.assertIs(result.kind, hs.RejectKind.REPLAY_CACHE_FULL)
        self.assertIn("replay cache full", result.reason)

    def test_cache_error_refuses_hello(self) -> None:
        """A hello the replay cache cannot record (an I/O error) is refused with status 2, kind REPLAY_CACHE_ERROR."""

        result = make_server(replay_cache=FixedVerdictCache(Verdict.FAILED)).feed(connect_hello())
        self.assertIsInstance(result, hs.Rejected)
        self.assertEqual(result.reply, bytes((hs.Status.SERVER_ERROR,)))
        self.assertIs(result.kind, hs.RejectKind.REPLAY_CACHE_ERROR)

    def test_unknown_key_hidden(self) -> None:
        """With hide_unknown_key an unknown key id gets status 4, like a bad hash."""
        client = hs.ClientHandshake(999, PSK, random=draws(CR), now=lambda: NOW)
        result = make_server(hide_unknown_key=True).feed(client.start())
        self.assertIsInstance(result, hs.Rejected)
        self.assertEqual(result.reply, bytes((hs.Status.CLIENT_AUTH_FAILED,)))
        self.assertIn("unknown key id 999", result.reason)

    def test_versions_restricted(self) -> None:
        """With versions=(1, 2) any other version byte is refused at once, without a reply."""
        for version in (0, 3, 7, 0x16, 0x47, 255):
            result = make_server(versions=(1, 2)).feed(bytes([version]))
            self.assertIsInstance(result, hs.Rejected)
            self.assertEqual(result.reply, b"")
            self.assertIn(f"unknown version byte {version}", result.reason)
        for version in (1, 2):
            result = make_server(versions=(1, 2)).feed(connect_hello(version=version))
            self.assertIsInstance(result, hs.Accepted)


class KeyUseTests(SynchronousTestCase):
    """Both ends record which keys their handshake used in one record, KeyUse."""

    def test_connect(self) -> None:
        """Without KEM both ends record the PSK id and fingerprint and no KEM key."""
        client = hs.ClientHandshake(KEY_ID, PSK, now=lambda: NOW)
        server = hs.ServerHandshake({KEY_ID: PSK}, None, now=lambda: NOW)
        accepted = server.feed(client.start())
        assert isinstance(accepted, hs.Accepted)
        mine = client.feed(accepted.reply)
        assert mine is not None
        expected = KeyUse(KEY_ID, kdf.key_fingerprint(PSK), None, None)
        self.assertEqual((mine.key_use, accepted.established.key_use), (expected, expected))

    def test_kemconnect(self) -> None:
        """With KEM the client records its public key's fingerprint, the server its seed's."""
        client = hs.ClientHandshake(KEY_ID, PSK, kem_public=(KEM_KEY_ID, KEM_PUBLIC),
                                    now=lambda: NOW)
        server = hs.ServerHandshake({KEY_ID: PSK}, {KEM_KEY_ID: KEM_SEED}, now=lambda: NOW)
        accepted = server.feed(client.start())
        assert isinstance(accepted, hs.Accepted)
        mine = client.feed(accepted.reply)
        assert mine is not None
        self.assertEqual(mine.key_use, KeyUse(KEY_ID, kdf.key_fingerprint(PSK), KEM_KEY_ID,
                                                 kdf.public_key_fingerprint(KEM_PUBLIC)))
        self.assertEqual(accepted.established.key_use,
                         KeyUse(KEY_ID, kdf.key_fingerprint(PSK), KEM_KEY_ID,
                                   kdf.key_fingerprint(KEM_SEED)))
        self.assertNotEqual(kdf.public_key_fingerprint(KEM_PUBLIC),
                            kdf.public_key_fingerprint(kem.public_key_from_seed(PSK[::-1])))
