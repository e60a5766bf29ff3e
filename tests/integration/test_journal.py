"""Real processes: the log a journal gets (priorities, levels, JSON).

A ``twistd -n`` tunnel client writes its log to a file connected as its
standard output and error, the way systemd connects the journal's stream;
with ``JOURNAL_STREAM`` naming that file (its device and inode) every line
starts with its sd-daemon priority and carries no timestamp. The tunnel
server is a daemonized ``twistd``, killed and started again to make an
outage.

Every process a test starts is stopped in a cleanup (SIGTERM, then
SIGKILL), found by the test's unique directory in its command line.
"""

import json
import os
import re
import signal
from typing import Dict, List, Optional

from twisted.trial.unittest import TestCase

from tests.integration import procs
from tigertunnel.keys.generate import keygen

#: Seconds allowed for a line to appear (a loaded 2-core machine).
WAIT = 30.0
#: A line of the journal's form: priority, then [namespace#level].
JOURNAL_LINE = re.compile(r"^<([2-7])>\[[\w./ ]+#(\w+)\] ")
#: Twisted's timestamp, anywhere at the start of a line (after a priority).
TIMESTAMP = re.compile(r"^(<\d>)?\d{4}-\d\d-\d\dT\d\d:\d\d")
PRIORITY_OF = {"critical": "2", "error": "3", "warn": "4", "info": "6", "debug": "7"}


def lines_of(path: str) -> List[str]:
    """The non-empty lines of file ``path``."""
    return [line for line in procs.read_text(path).splitlines() if line.strip()]


class JournalTests(TestCase):
    """The client's log as the journal, the warn level and JSON sees it."""

    timeout = 180

    def setUp(self) -> None:
        self.dir = procs.fresh_dir(self.mktemp())
        self.addCleanup(procs.stop_strays, self.dir)
        self.psk = self.path("psk.key")
        keygen(self.psk)
        self.server_port, self.client_port, self.backend_port = procs.free_ports(3)

    def path(self, name: str) -> str:
        """An absolute path in this test's directory."""
        return os.path.join(self.dir, name)

    def env(self, journal_of: Optional[str] = None) -> Dict[str, str]:
        """Our environment, with JOURNAL_STREAM naming ``journal_of`` (or unset)."""
        env = procs.child_env()
        env.pop("JOURNAL_STREAM", None)
        if journal_of is not None:
            info = os.stat(journal_of)
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        return env

    async def start_server(self) -> int:
        """Start the tunnel server daemonized; return its pid.

        (A server killed before leaves its pidfile, and its pid may stay a
        zombie for a while: a new pidfile for each start.)
        """
        self.starts = getattr(self, "starts", 0) + 1
        self.spid = self.path(f"server-{self.starts}.pid")
        result = await procs.run(
            [procs.executable("twistd"), "--pidfile", self.spid, "--logfile",
             self.path("server.log"), "tigertunnel", "server", "-p",
             f"127.0.0.1:{self.server_port},127.0.0.1:{self.backend_port}",
             "-k", self.psk])
        self.assertEqual(result.status, 0, result.describe())
        pid = procs.read_pidfile(self.spid)
        assert pid is not None
        return pid

    def client(self, log: str, *options: str, journal: bool = False) -> procs.Child:
        """Start ``twistd -n`` tunnel client logging to ``log`` (as the journal when asked)."""
        open(log, "wb").close()
        args = [procs.executable("twistd"), "-n", "--pidfile=", "--logfile=-",
                "--reactor=tigertunnel-epoll", "tigertunnel", "client", "-p",
                f"127.0.0.1:{self.client_port},127.0.0.1:{self.server_port}",
                "-k", self.psk, "-n", "2", *options]
        child = procs.spawn_to_file(args, log, self.env(log if journal else None))
        self.addCleanup(child.kill, signal.SIGKILL)
        return child

    async def test_outage_on_the_journal(self) -> None:
        """With JOURNAL_STREAM naming its output, every line of a client through a server outage starts with its priority and has no timestamp: the outage lines are <4>, the rest <6>."""
        server = await self.start_server()
        log = self.path("client.journal")
        client = self.client(log, journal=True)
        await procs.wait_for_text(log, "client pool connection", WAIT, count=2)
        os.kill(server, signal.SIGKILL)
        await procs.wait_for_text(log, "lost its last pool connection", WAIT)
        await procs.wait_for_text(log, "cannot connect pool connection", WAIT)
        await self.start_server()
        await procs.wait_for_text(log, "up again after", WAIT)
        self.assertEqual(await client.kill(signal.SIGTERM, timeout=WAIT), 0)

        rows = lines_of(log)
        self.assertGreater(len(rows), 6)
        for row in rows:
            match = JOURNAL_LINE.match(row)
            self.assertIsNotNone(match, row)
            assert match is not None
            self.assertEqual(match.group(1), PRIORITY_OF[match.group(2)], row)
            self.assertIsNone(TIMESTAMP.match(row), row)
        by_text = {text: [row[:3] for row in rows if text in row] for text in (
            "lost its last pool connection", "up again after", "reactor class:",
            "Main loop terminated.")}
        self.assertEqual(by_text, {
            "lost its last pool connection": ["<4>"], "up again after": ["<6>"],
            "reactor class:": ["<6>"], "Main loop terminated.": ["<6>"]}, rows)
        # A slot retrying before the other connection's loss was seen fails
        # at info (a pool connection was still up); with none up, a warning.
        failed = [row[:3] for row in rows if "cannot connect pool connection" in row]
        self.assertEqual(failed[-1], "<4>", rows)
        self.assertLessEqual(set(failed), {"<4>", "<6>"})

    async def test_warn_level_shows_the_outage_only(self) -> None:
        """At --log-level warn a client whose server is down logs the outage as a warning and none of the start-up or shutdown lines."""
        log = self.path("client.log")
        client = self.client(log, "--log-level", "warn")
        text = await procs.wait_for_text(log, "cannot connect pool connection", WAIT)
        self.assertEqual(await client.kill(signal.SIGTERM, timeout=WAIT), 0)
        rows = lines_of(log)
        outage = [row for row in rows if "cannot connect pool connection" in row]
        self.assertEqual(len(outage), 1, rows)
        self.assertRegex(outage[0], r"^\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4} "
                                    r"\[tigertunnel\.net\.multiplexer#warn\] client pair0: "
                                    r"cannot connect pool connection")
        for row in rows:  # nothing below warn (a hardening warning may show)
            self.assertRegex(row, r"^\S+ \[[\w.]+#(warn|error|critical)\] ")
        for quiet in ("reactor class:", "Main loop terminated.", "starting up",
                      "Server Shut Down.", "starting on", "Closed"):
            self.assertNotIn(quiet, text + procs.read_text(log))

    async def test_json_lines_parse(self) -> None:
        """With --log-format json every line the console script writes is a JSON object with time, level, namespace and message, pool connection lines with their pair and pool connection."""
        await self.start_server()
        child = procs.spawn([procs.executable("tigertunnel"), "client", "-p",
                             f"127.0.0.1:{self.client_port},127.0.0.1:{self.server_port}",
                             "-k", self.psk, "-n", "2", "--log-format", "json"])
        self.addCleanup(child.kill, signal.SIGKILL)
        await procs.wait_until(lambda: child.output.count("pool connection") >= 2
                               or not child.running, WAIT, "2 pool connections up")
        self.assertEqual(await child.kill(signal.SIGTERM, timeout=WAIT), 0)
        records = [json.loads(row) for row in child.output.splitlines() if row.strip()]
        self.assertGreater(len(records), 3)
        for record in records:
            self.assertLessEqual({"time", "level", "namespace", "message"}, set(record))
        up = [r for r in records if "pool connection" in r["message"] and " up " in r["message"]]
        self.assertEqual(len(up), 2, records)
        self.assertEqual({(r["pair"], r["level"], r["namespace"]) for r in up},
                         {("pair0", "info", "tigertunnel.net.pairmux")})
        self.assertTrue(all(r["pool_connection"].startswith("pair0/") for r in up))
        self.assertIn("tigertunnel.cli", {r["namespace"] for r in records
                                          if r["message"].startswith("reactor class:")})
