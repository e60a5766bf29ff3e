"""Operations on real processes: reload, metrics, systemd, shutdown, check-config.

* SIGHUP with new key files: the session open during the rotation keeps
  working, new pool connections use the new key; SIGHUP with a broken key
  file keeps the old keys and logs why;
* ``/metrics`` and ``/status`` scraped over HTTP while traffic flows (the
  counts match what was sent), 503 while the server is down;
* ``sd_notify`` datagrams (READY, WATCHDOG, RELOADING, STOPPING) received on
  a unix datagram socket this test binds as ``NOTIFY_SOCKET``;
* SIGTERM drains: exit status 0, pidfile removed, the TB session closed;
* socket activation through ``--systemd-sockets`` (an inherited listening
  socket, as systemd passes it);
* ``tigertunnel check-config`` on good and bad input.

Every process is stopped in a cleanup; every wait is bounded.
"""

import json
import os
import shutil
import signal
import socket
import tempfile
from typing import Any, List, Tuple

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tests.integration import procs
from tests.integration.test_sockets import Peer, PeerFactory, digest
from tests.strategies import make_tb_frame
from tigertunnel.keys.format import format_key_line
from tigertunnel.tools.echo import EchoFactory

OLD, NEW = 1_700_000_000_000_000_001, 1_800_000_000_000_000_002
KEYS = {OLD: bytes(range(32)), NEW: bytes(range(100, 132))}


def _reactor() -> Any:
    from twisted.internet import reactor
    return reactor


def frames(count: int, tag: int) -> List[bytes]:
    """``count`` TB frames of varied sizes, recognisable by ``tag``."""
    return [make_tb_frame(bytes([tag, i]) * (i * 37 % 500), bytes([tag]) * 64)
            for i in range(count)]


async def http_get(url: str) -> Tuple[int, bytes]:
    """GET ``url``: (status code, body)."""
    response = await Agent(_reactor()).request(b"GET", url.encode())
    return response.code, await readBody(response)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name{labels}`` in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    found = [s.value for family in text_string_to_metric_families(text)
             for s in family.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} samples {name}{labels}")
    return found[0]


class Collector(ProcessProtocol):
    """A foreground child: output, and a Deferred firing with its exit status."""

    def __init__(self) -> None:
        self.output: List[bytes] = []
        self.ended: "defer.Deferred[int]" = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(-1 if code is None else int(code))


class Notifications(DatagramProtocol):
    """Collects the datagrams sent to our NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.messages: List[List[str]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.messages.append(data.decode().split("\n"))

    def kinds(self) -> List[str]:
        """The first line of each message."""
        return [m[0] for m in self.messages]


class _OperationsCase(TestCase):
    """A directory with key files, an echo backend, and no process left behind."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = procs.fresh_dir(self.mktemp())
        self.addCleanup(procs.stop_strays, self.dir)
        reactor = _reactor()
        self.echo = WrappingFactory(EchoFactory())
        port = reactor.listenTCP(0, self.echo, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.backend = f"127.0.0.1:{port.getHost().port}"

    def path(self, name: str) -> str:
        """An absolute path in this test's directory."""
        return os.path.join(self.dir, name)

    def write_keys(self, name: str, *ids: int) -> str:
        """Replace key file ``name`` (mode 0600) with the keys ``ids``, in order."""
        return self.write(name, "".join(format_key_line(i, KEYS[i]) for i in ids))

    def write(self, name: str, text: str) -> str:
        """Atomically replace file ``name`` (mode 0600) with ``text``."""
        path = self.path(name)
        with open(path + ".new", "w") as f:
            f.write(text)
        os.chmod(path + ".new", 0o600)
        os.replace(path + ".new", path)
        return path

    async def daemon(self, role: str, *args: str) -> int:
        """Start ``twistd tigertunnel ROLE ARGS`` daemonized; return its pid."""
        result = await procs.run([procs.executable("twistd"), "--pidfile",
                                  self.path(f"{role}.pid"), "--logfile",
                                  self.path(f"{role}.log"), "tigertunnel", role, *args])
        self.assertEqual(result.status, 0, result.describe())
        pid = procs.read_pidfile(self.path(f"{role}.pid"))
        assert pid is not None
        return pid

    async def tb_session(self, port: int) -> Peer:
        """A TB client connected to the tunnel client's listener."""
        endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", port, timeout=5)
        peer = await endpoint.connect(PeerFactory())
        self.addCleanup(lambda: peer.is_lost or peer.transport.abortConnection())
        return peer

    async def round_trip(self, peer: Peer, batch: List[bytes]) -> None:
        """Send ``batch`` and wait until it is echoed back byte-identical."""
        before = len(peer.digests)
        peer.transport.writeSequence(batch)
        await procs.wait_until(lambda: len(peer.digests) >= before + len(batch), 10,
                               "the echoed frames")
        self.assertEqual(peer.digests[before:], [digest(f) for f in batch])


class RotationTests(_OperationsCase):
    """Key rotation by SIGHUP with metrics scraped along the way."""

    async def test_rotation_with_metrics(self) -> None:
        """Sessions survive a rotation, new handshakes use the new key, a broken file changes nothing, and the figures match."""
        server_port, client_port, smetrics, cmetrics = procs.free_ports(4)
        client_key = self.write_keys("client.key", OLD)
        self.write_keys("server.key", OLD)
        clog, slog = self.path("client.log"), self.path("server.log")
        client_pid = await self.daemon(
            "client", "-p", f"127.0.0.1:{client_port},127.0.0.1:{server_port}",
            "-k", client_key, "-n", "2", "--metrics", f"tcp:{cmetrics}:interface=127.0.0.1")
        status_url = f"http://127.0.0.1:{cmetrics}/status"
        await procs.wait_for_text(clog, "cannot connect pool connection", 10)
        code, body = await http_get(status_url)
        self.assertEqual(code, 503, body)
        self.assertFalse(json.loads(body)["pairs"][0]["healthy"])

        server_pid = await self.daemon(
            "server", "-p", f"127.0.0.1:{server_port},{self.backend}", "-k",
            self.path("server.key"), "--metrics", f"tcp:{smetrics}:interface=127.0.0.1")
        await procs.wait_for_text(clog, f" up (key id {OLD})", 15, count=2)
        self.assertEqual((await http_get(status_url))[0], 200)

        peer = await self.tb_session(client_port)
        sent = frames(20, 1)
        await self.round_trip(peer, sent)
        text = (await http_get(f"http://127.0.0.1:{cmetrics}/metrics"))[1].decode()
        size = sum(len(f) for f in sent)
        for direction in ("to_tunnel", "from_tunnel"):
            self.assertEqual(metric(text, "tigertunnel_frames_total", direction=direction), 20)
            self.assertEqual(metric(text, "tigertunnel_bytes_total", direction=direction), size)
        self.assertEqual(metric(text, "tigertunnel_sessions"), 1)
        self.assertEqual(metric(text, "tigertunnel_pool_connections_by_key", key_id=str(OLD)), 2)
        server_text = (await http_get(f"http://127.0.0.1:{smetrics}/metrics"))[1].decode()
        self.assertEqual(metric(server_text, "tigertunnel_frames_total",
                                direction="from_tunnel"), 20)
        self.assertEqual(metric(server_text, "tigertunnel_pool_connections", state="healthy"), 2)

        # README rotation: both keys on the server, new key first on the client.
        self.write_keys("server.key", OLD, NEW)
        os.kill(server_pid, signal.SIGHUP)
        await procs.wait_for_text(slog, "server keys reloaded", 10)
        self.write_keys("client.key", NEW, OLD)
        os.kill(client_pid, signal.SIGHUP)
        await procs.wait_for_text(clog, f" up (key id {NEW})", 10)
        await self.round_trip(peer, frames(5, 2))  # the session survived
        second = await self.tb_session(client_port)
        await self.round_trip(second, frames(3, 3))
        doc = json.loads((await http_get(status_url))[1])
        self.assertEqual(doc["keys"]["psk"], [str(NEW)])
        self.assertTrue(doc["reload"]["ok"])
        links = doc["pairs"][0]["links"]
        self.assertIn({"key_id": str(OLD), "state": "draining", "sessions": 1},
                      [{k: link[k] for k in ("key_id", "state", "sessions")} for link in links])
        self.assertIn({"key_id": str(NEW), "state": "healthy", "sessions": 1},
                      [{k: link[k] for k in ("key_id", "state", "sessions")} for link in links])

        # A broken key file: old keys kept, reason logged and reported.
        self.write("client.key", "# half-written\n123:abc\n")
        os.kill(client_pid, signal.SIGHUP)
        await procs.wait_for_text(clog, "key reload failed, keeping the old keys", 10)
        self.assertIn(f"{client_key}:2: InvalidKeySize", procs.read_text(clog))
        doc = json.loads((await http_get(status_url))[1])
        self.assertEqual((doc["reload"]["ok"], doc["keys"]["psk"]), (False, [str(NEW)]))
        self.assertIn("InvalidKeySize", doc["reload"]["error"])
        text = (await http_get(f"http://127.0.0.1:{cmetrics}/metrics"))[1].decode()
        self.assertEqual(metric(text, "tigertunnel_key_reload_last_success"), 0)
        self.assertEqual(metric(text, "tigertunnel_key_reloads_total", result="error"), 1)
        await self.round_trip(peer, frames(2, 4))
        third = await self.tb_session(client_port)
        await self.round_trip(third, frames(2, 5))

        for name, pid in (("client", client_pid), ("server", server_pid)):
            self.assertTrue(await procs.stop_pid(pid, timeout=15), f"{name} needed SIGKILL")
            self.assertFalse(os.path.exists(self.path(f"{name}.pid")))
            log = procs.read_text(self.path(f"{name}.log"))
            self.assertIn("Server Shut Down.", log)
            self.assertNotIn("Traceback", log)
        await peer.lost.addTimeout(5, _reactor())


class SystemdTests(_OperationsCase):
    """sd_notify datagrams and the SIGTERM drain of a foreground twistd."""

    async def test_notify_watchdog_reload_and_drain(self) -> None:
        """READY, WATCHDOG, RELOADING/READY and STOPPING arrive; SIGTERM drains the session and exits 0."""
        reactor = _reactor()
        notifications = Notifications()
        # A unix socket path must be short: not in trial's deep directory.
        notify_dir = tempfile.mkdtemp(prefix="tt-notify-")
        self.addCleanup(shutil.rmtree, notify_dir, True)
        notify_path = os.path.join(notify_dir, "notify")
        listening = reactor.listenUNIXDatagram(notify_path, notifications)
        self.addCleanup(listening.stopListening)
        server_port, client_port = procs.free_ports(2)
        key = self.write_keys("psk.key", OLD)
        pidfile = self.path("server.pid")
        env = dict(procs.child_env(), NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="300000")
        child = Collector()
        transport = reactor.spawnProcess(child, procs.executable("twistd"), [
            procs.executable("twistd"), "-n", "--pidfile", pidfile, "--logfile",
            self.path("server.log"), "tigertunnel", "server", "-p",
            f"127.0.0.1:{server_port},{self.backend}", "-k", key,
            "--shutdown-timeout", "5"], env=env)
        self.addCleanup(lambda: child.ended.called or transport.signalProcess("KILL"))
        await procs.wait_until(lambda: "READY=1" in notifications.kinds(), 10, "READY=1")
        self.assertIn(f"MAINPID={transport.pid}", notifications.messages[0])
        await procs.wait_until(lambda: notifications.kinds().count("WATCHDOG=1") >= 3, 5,
                               "three WATCHDOG=1")

        os.kill(transport.pid, signal.SIGHUP)
        await procs.wait_until(lambda: "RELOADING=1" in notifications.kinds(), 5, "RELOADING=1")
        await procs.wait_until(lambda: notifications.kinds().count("READY=1") == 2, 5,
                               "READY=1 after the reload")
        reloading = notifications.messages[notifications.kinds().index("RELOADING=1")]
        self.assertTrue(reloading[1].startswith("MONOTONIC_USEC="), reloading)

        await self.daemon("client", "-p", f"127.0.0.1:{client_port},127.0.0.1:{server_port}",
                          "-k", key, "-n", "1")
        await procs.wait_for_text(self.path("client.log"), f" up (key id {OLD})", 10)
        peer = await self.tb_session(client_port)
        await self.round_trip(peer, frames(10, 6))
        self.assertTrue(os.path.exists(pidfile))

        transport.signalProcess("TERM")
        status = await child.ended.addTimeout(10, reactor)
        output = b"".join(child.output).decode(errors="replace")
        self.assertEqual(status, 0, output)
        self.assertFalse(os.path.exists(pidfile), "pidfile left behind")
        self.assertIn("STOPPING=1", notifications.kinds())
        log = procs.read_text(self.path("server.log"))
        self.assertIn("shutting down: closing 1 sessions", log)
        self.assertNotIn("shutdown timeout", log)
        self.assertNotIn("Traceback", log)
        # The v2 stream_close told the tunnel client to close the TB session.
        await peer.lost.addTimeout(5, reactor)
        await procs.wait_until(lambda: not self.echo.protocols, 5, "the backend connection to close")


class SocketActivationTests(_OperationsCase):
    """A listening socket inherited the way systemd passes it."""

    async def test_inherited_listener(self) -> None:
        """With --systemd-sockets the client serves TB clients on the inherited socket."""
        reactor = _reactor()
        server_port = procs.free_ports(1)[0]
        await self.daemon("server", "-p", f"127.0.0.1:{server_port},{self.backend}",
                          "--plaintext")
        inherited = socket.socket()
        self.addCleanup(inherited.close)
        inherited.bind(("127.0.0.1", 0))
        inherited.listen(16)
        port = inherited.getsockname()[1]
        child = Collector()
        script = ('export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=tt; exec "$@"')
        args = ["/bin/sh", "-c", script, "sh", procs.executable("twistd"), "-n",
                "--pidfile", self.path("client.pid"), "--logfile", self.path("client.log"),
                "tigertunnel", "client", "--plaintext", "--systemd-sockets", "-n", "1",
                "-p", f"127.0.0.1:{port},127.0.0.1:{server_port}"]
        transport = reactor.spawnProcess(child, args[0], args, env=procs.child_env(),
                                         childFDs={0: "w", 1: "r", 2: "r", 3: inherited.fileno()})
        self.addCleanup(lambda: child.ended.called or transport.signalProcess("KILL"))
        inherited.close()  # the child has it now
        await procs.wait_for_text(self.path("client.log"), "pool connection", 10)
        peer = await self.tb_session(port)
        await self.round_trip(peer, frames(4, 7))
        transport.signalProcess("TERM")
        self.assertEqual(await child.ended.addTimeout(10, reactor), 0,
                         b"".join(child.output).decode(errors="replace"))


class CheckConfigTests(_OperationsCase):
    """``tigertunnel check-config`` validates without starting anything."""

    CLUSTER = """[tunnel]
key = psk.key
cluster = 5

[replica 0]
tunnel = 127.0.0.1:3000
backend = 127.0.0.1:3001

[replica 1]
tunnel = 127.0.0.1:3010
backend = 127.0.0.1:3011

[replica 2]
tunnel = 127.0.0.1:3020
backend = 127.0.0.1:3021
"""

    async def check(self, *args: str) -> procs.Result:
        """Run ``tigertunnel check-config ARGS``."""
        return await procs.run([procs.executable("tigertunnel"), "check-config", *args])

    async def test_good_and_bad(self) -> None:
        """A good cluster file passes for every tunnel end; bad input fails with one line naming it."""
        self.write_keys("psk.key", OLD)
        good = self.write("good.ini", self.CLUSTER)
        unknown = self.write("unknown.ini", self.CLUSTER + "port = 4\n")
        bad_key = self.write("badkey.ini", self.CLUSTER.replace("psk.key", "nope.key"))
        results = await defer.gatherResults([defer.ensureDeferred(d) for d in (
            self.check("--config", good),
            self.check("client", "--config", good, "--replica", "1"),
            self.check("--config", unknown),
            self.check("server", "--config", bad_key, "--replica", "0"),
            self.check("server", "-p", ":3000,127.0.0.1:99999", "-k", self.path("psk.key")),
        )], consumeErrors=True)
        whole, replica, unknown_r, bad_key_r, bad_flag = results
        self.assertEqual(whole.status, 0, whole.describe())
        self.assertEqual(whole.stdout.count("ok: "), 7, whole.stdout)  # 3 servers, 1 + 3 clients
        self.assertEqual(replica.status, 0, replica.describe())
        self.assertIn("pair1: 127.0.0.1:4002 -> 127.0.0.1:3020", replica.stdout)
        for result, expected in (
                (unknown_r, f"{unknown}: [replica 2] port: unknown key"),
                (bad_key_r, f"{bad_key}: [tunnel] key: {self.path('nope.key')}: Unreadable"),
                (bad_flag, "invalid target address: '127.0.0.1:99999'")):
            self.assertEqual(result.status, 1, result.describe())
            err = [line for line in result.stderr.splitlines() if line.strip()]
            self.assertEqual(len(err), 1, result.describe())
            self.assertIn(expected, err[0])
        self.assertEqual(procs.pids_mentioning(self.dir), [])
