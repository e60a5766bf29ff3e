"""Both ways of running a tunnel end use the lean reactor (``tigertunnel-epoll``) and carry TB frames on it.

* the console script installs it by itself;
* ``twistd --reactor=tigertunnel-epoll`` (as the systemd units run) finds it
  through the reactor plugin.
"""

import signal

from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.integration.tbpeers import Script, tb_connect, the_reactor
from tests.integration.tunnels import Daemons, echo_rtt, listening_backend, psk_file

LEAN = "reactor class: tigertunnel.net.reactor.LeanEPollReactor"


class LeanReactorTests(TestCase):
    """Real processes on the lean reactor."""

    timeout = 60

    async def test_twistd_daemons(self) -> None:
        """twistd --reactor=tigertunnel-epoll: both daemons say so in their log and echo TB frames byte-identical."""
        backend = listening_backend(self, Script())
        d = await Daemons(self, backend.port_number).start()
        for role in ("server", "client"):
            self.assertIn(LEAN, procs.read_text(d.path(f"{role}.log")))
        peer = await d.tb_client()
        for tag in range(5):
            await echo_rtt(peer, tag, size=256 + 1000 * tag)

    async def test_console_script(self) -> None:
        """The console script installs it by itself (no option) and echoes TB frames byte-identical; SIGTERM ends it with status 0."""
        backend = listening_backend(self, Script())
        directory = procs.fresh_dir(self.mktemp())
        psk = psk_file(directory)
        server_port, client_port = procs.free_ports(2)
        tunnel = procs.executable("tigertunnel")
        server = procs.spawn([tunnel, "server", "-p",
                              f"127.0.0.1:{server_port},127.0.0.1:{backend.port_number}",
                              "-k", psk])
        self.addCleanup(server.kill)
        await procs.wait_for_output(server, LEAN, 10)
        client = procs.spawn([tunnel, "client", "-p",
                              f"127.0.0.1:{client_port},127.0.0.1:{server_port}",
                              "-k", psk, "-n", "1"])
        self.addCleanup(client.kill)
        await procs.wait_for_output(client, LEAN, 10)
        await procs.wait_for_output(client, " up (key id ", 10)
        peer = await tb_connect(client_port)
        self.addCleanup(lambda: peer.is_lost or peer.transport.abortConnection())
        for tag in range(5):
            await echo_rtt(peer, tag, size=256 + 1000 * tag)
        peer.transport.loseConnection()
        await peer.lost.addTimeout(5, the_reactor())
        for child in (client, server):
            self.assertEqual(await child.kill(signal.SIGTERM, timeout=15), 0, child.output[-800:])
            self.assertNotIn("Traceback", child.output)
