"""The systemd units in ``contrib/systemd/``: checked by systemd, and run as written.

* ``systemd-analyze verify`` accepts every unit (templates instantiated:
  ``tigertunnel-server@0.service``, ``tigertunnel-client@4000.socket``),
  with ``ExecStart`` pointed at this venv's ``twistd`` (verify wants the
  binary to exist);
* ``systemd-analyze security --offline=true`` rates each service 2.0 or
  less (``--threshold=20`` exits non-zero above that);
* the client unit's ``ExecStart`` (plus ``--systemd-sockets --workers 2``)
  runs with two sockets passed the way systemd passes them, named after
  their ports (``LISTEN_FDNAMES``) and in the wrong order, under the unit's
  restrictions that a process can apply to itself: ``NoNewPrivileges=``
  (``PR_SET_NO_NEW_PRIVS``), the empty ``CapabilityBoundingSet=`` (every
  capability dropped from the bounding set, so even root runs with none),
  ``UMask=`` and, if the unit set it, ``MemoryDenyWriteExecute=``
  (``PR_SET_MDWE``). TB frames cross both pairs. The namespace, seccomp and
  mount settings need systemd as PID 1 (not here); what they allow is
  listed in the units' comments and README.rst ("systemd").

The systemd-analyze tests skip, saying why, where it is missing or too old
for ``--offline``.
"""

import os
import re
import shlex
import shutil
import socket
import sys
from typing import Dict, List, Tuple

from twisted.trial.unittest import SkipTest

from tests.integration import procs
from tests.integration.test_operations import Collector, _OperationsCase, _reactor, frames

UNITS = os.path.join(os.path.dirname(__file__), "..", "..", "contrib", "systemd")
SERVICES = ("tigertunnel-server@.service", "tigertunnel-client.service")
#: The worst ``systemd-analyze security`` exposure accepted (the issue's goal).
MAX_EXPOSURE = 2.0

#: Applies what a process can apply itself of a unit's restrictions, then
#: runs argv[1:]; the settings come as a JSON object in argv[1].
SANDBOX = r"""
import ctypes, json, os, sys
settings = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def prctl(*args):
    if libc.prctl(*[ctypes.c_ulong(a) for a in args]) != 0:
        sys.exit(f"prctl{args} failed: errno {ctypes.get_errno()}")
if settings.get("UMask"):
    os.umask(int(settings["UMask"], 8))
if "CapabilityBoundingSet" in settings and settings["CapabilityBoundingSet"] == "":
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        prctl(24, cap, 0, 0, 0)          # PR_CAPBSET_DROP
if settings.get("NoNewPrivileges") == "yes":
    prctl(38, 1, 0, 0, 0)                # PR_SET_NO_NEW_PRIVS
if settings.get("MemoryDenyWriteExecute") == "yes":
    prctl(65, 1, 0, 0, 0)                # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def service_settings(path: str) -> Dict[str, str]:
    """The ``[Service]`` settings of a unit file (continuation lines joined; last one wins)."""
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    section, found = "", {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


def systemd_analyze() -> str:
    """The path of systemd-analyze, or SkipTest."""
    path = shutil.which("systemd-analyze")
    if path is None:
        raise SkipTest("systemd-analyze is not installed")
    return path


class UnitFileTests(_OperationsCase):
    """What systemd says of the units."""

    def instantiated(self) -> str:
        """A directory with the units, templates as instances (``@0``, ``@4000``: systemd
        cannot check a template's ``%i``), ExecStart's twistd this venv's."""
        directory = self.path("units")
        os.makedirs(directory)
        for name in os.listdir(UNITS):
            with open(os.path.join(UNITS, name)) as f:
                text = f.read().replace("/opt/tigertunnel/bin/twistd", procs.executable("twistd"))
            target = name.replace("@.service", "@0.service").replace("@.socket", "@4000.socket")
            with open(os.path.join(directory, target), "w") as f:
                f.write(text)
        return directory

    async def test_verify(self) -> None:
        """systemd-analyze verify accepts every unit and instance without a word about them."""
        tool = systemd_analyze()
        directory = self.instantiated()
        units = sorted(os.path.join(directory, n) for n in os.listdir(directory))
        self.assertEqual([os.path.basename(u) for u in units],
                         ["tigertunnel-client.service", "tigertunnel-client@4000.socket",
                          "tigertunnel-server@0.service"])
        result = await procs.run([tool, "verify", *units], timeout=60)
        self.assertEqual(result.status, 0, result.describe())
        complaints = [line for line in (result.stdout + result.stderr).splitlines()
                      if "tigertunnel" in line]
        self.assertEqual(complaints, [], result.describe())

    async def test_security_exposure(self) -> None:
        """systemd-analyze security --offline=true rates each service 2.0 or less."""
        tool = systemd_analyze()
        directory = self.instantiated()
        for name in SERVICES:
            path = os.path.join(directory, name.replace("@.service", "@0.service"))
            result = await procs.run([tool, "security", "--offline=true", "--threshold=20",
                                      path], timeout=60)
            if "--offline" in result.stderr and "unrecognized" in result.stderr:
                raise SkipTest(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
            score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
            self.assertIsNotNone(score, result.describe())
            assert score is not None
            self.assertLessEqual(float(score.group(1)), MAX_EXPOSURE, f"{name}: {score.group(0)}")
            self.assertEqual(result.status, 0, result.describe())


class ClientUnitRunTests(_OperationsCase):
    """The client unit's command, socket-activated, with workers, under its restrictions."""

    timeout = 90

    def listening(self) -> socket.socket:
        """A listening socket on 127.0.0.1 (to be passed to the child)."""
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        return sock

    def command(self, config: str) -> List[str]:
        """The client unit's ExecStart with this venv and ``config``, socket-activated, 2 workers."""
        settings = service_settings(os.path.join(UNITS, "tigertunnel-client.service"))
        argv = shlex.split(settings["ExecStart"])
        self.assertEqual(argv[0], "/opt/tigertunnel/bin/twistd")
        argv[0] = procs.executable("twistd")
        self.assertIn("/etc/tigertunnel/cluster.ini", argv)
        argv[argv.index("/etc/tigertunnel/cluster.ini")] = config
        return argv + ["--systemd-sockets", "--workers", "2"]

    async def test_socket_activated_workers_under_restrictions(self) -> None:
        """Sockets passed in reverse order are taken by name, both workers start, frames cross both pairs."""
        import json

        server_port = procs.free_ports(1)[0]
        await self.daemon("server", "-p", f"127.0.0.1:{server_port},{self.backend}",
                          "--plaintext", "--replay-file", "memory")
        first, second = self.listening(), self.listening()
        ports: Tuple[int, int] = (first.getsockname()[1], second.getsockname()[1])
        config = self.write("cluster.ini", "[tunnel]\nplaintext = true\nnum-conns = 1\n" + "".join(
            f"\n[replica {i}]\ntunnel = 127.0.0.1:{server_port}\nbackend = {self.backend}\n"
            f"local = 127.0.0.1:{port}\n" for i, port in enumerate(ports)))
        settings = service_settings(os.path.join(UNITS, "tigertunnel-client.service"))
        restrictions = {k: settings[k] for k in ("UMask", "CapabilityBoundingSet",
                                                 "NoNewPrivileges", "MemoryDenyWriteExecute")
                        if k in settings}
        self.assertEqual(restrictions.get("CapabilityBoundingSet"), "")
        self.assertEqual(restrictions.get("NoNewPrivileges"), "yes")
        if os.geteuid() != 0:
            restrictions.pop("CapabilityBoundingSet")  # dropping needs CAP_SETPCAP
        env = procs.child_env()
        env.update(LISTEN_FDS="2", LISTEN_FDNAMES=f"{ports[1]}:{ports[0]}")
        args = [sys.executable, "-c", SANDBOX, json.dumps(restrictions), *self.command(config)]
        child = Collector()
        transport = _reactor().spawnProcess(
            child, args[0], args, env=env,
            childFDs={0: "w", 1: "r", 2: "r", 3: second.fileno(), 4: first.fileno()})
        self.addCleanup(lambda: child.ended.called or transport.signalProcess("KILL"))
        first.close()
        second.close()  # the child has them now

        def output() -> str:
            return b"".join(child.output).decode(errors="replace")

        await procs.wait_until(lambda: output().count(" up (") >= 2 or child.ended.called,
                               30, "a pool connection on both pairs")
        self.assertFalse(child.ended.called, output())
        await procs.wait_until(lambda: "started worker 1" in output(), 30, "worker 1")
        if "CapabilityBoundingSet" in restrictions:
            with open(f"/proc/{transport.pid}/status") as f:
                status = dict(line.split(":\t", 1) for line in f.read().splitlines()
                              if ":\t" in line)
            self.assertEqual(int(status["CapEff"], 16), 0, status["CapEff"])
            self.assertEqual(int(status["CapBnd"], 16), 0, status["CapBnd"])
        for tag, port in enumerate(ports):
            for _ in range(2):  # sessions land on either worker
                peer = await self.tb_session(port)
                await self.round_trip(peer, frames(3, tag + 1))
        transport.signalProcess("TERM")
        self.assertEqual(await child.ended.addTimeout(30, _reactor()), 0, output())
        self.assertNotIn("Traceback", output())


class WriteExecuteTests(_OperationsCase):
    """Why the units leave MemoryDenyWriteExecute= out."""

    async def test_pyaegis_needs_write_execute_memory(self) -> None:
        """Under PR_SET_MDWE (what MemoryDenyWriteExecute=yes enforces) pyaegis cannot be imported."""
        import json

        for name in SERVICES:
            settings = service_settings(os.path.join(UNITS, name))
            self.assertNotIn("MemoryDenyWriteExecute", settings, name)
        result = await procs.run([sys.executable, "-c", SANDBOX,
                                  json.dumps({"MemoryDenyWriteExecute": "yes"}),
                                  sys.executable, "-c", "import pyaegis"])
        if "prctl(65" in result.stderr:
            raise SkipTest(f"this kernel has no PR_SET_MDWE: {result.stderr.strip()}")
        self.assertNotEqual(result.status, 0, result.describe())
        self.assertIn("Cannot allocate write+execute memory for ffi.callback()", result.stderr)
