"""Live key reload (SIGHUP): re-read the key files and swap them atomically.

What a reload does (docs/operations.rst, "Key rotation", is the user's side):

1. Every key file named in the configuration (``-k``, ``--kemsecret`` on a
   server, ``--kempublic`` on a client) is read and validated completely:
   the same parsers as at start-up, then the key material itself
   (:meth:`~tigertunnel.keys.ring.KeyRing.check`: key ids, sizes, every KEM
   secret seed expanded), and a KEM public key must accept an
   encapsulation. Any error keeps the old keys and is logged with the
   reason (file, line, error name; never key material).
2. The new :class:`~tigertunnel.keys.ring.KeyRing` replaces the old one on
   every multiplexer of the tunnel end at once (the settings,
   :class:`~tigertunnel.config.model.TunnelConfig`, stay as they are); new handshakes are built
   from
   it, so new client hellos use the new first PSK and servers accept
   exactly the keys now in the file.
3. Established pool connections keep working. Those keyed with a key that
   is no longer current are *retired* (state ``DRAINING``; each multiplexer
   does it, :meth:`~tigertunnel.net.pairmux.SessionMultiplexer.retire_outdated`,
   comparing each connection's :class:`~tigertunnel.keys.ring.KeyUse`
   with the new ring):

   * tunnel client: a pool connection whose PSK key id is not the new first
     key, or whose handshake used a replaced KEM public key, is marked
     draining (no new sessions are placed on it while another pool
     connection can take them) and closed as soon as it carries no session,
     or after :data:`~tigertunnel.net.retire.DRAIN_TIMEOUT` seconds; its pool slot then reconnects
     with the current key at once. Until one pool connection with the
     current key is up, only one idle retired connection at a time is
     closed (to try the key) and the others are kept, even past the
     timeout: a key the servers do not accept yet cannot empty the pool;
   * tunnel server: a pool connection whose PSK key id was removed from the
     file is closed as soon as it carries no stream, or after
     :data:`~tigertunnel.net.retire.RETIRE_GRACE` seconds (its client reconnects with its own
     current key).

   Handshakes already under way during the reload finish with the old keys;
   a second sweep, one handshake timeout later, retires those too.

A server pool connection remembers the KEM key id of its handshake, so
removing a key from a server's ``--kemsecret`` file retires the pool
connections made with it, like a removed PSK.

Every pool connection also remembers a fingerprint of the PSK bytes its
handshake used (:func:`~tigertunnel.crypto.kdf.key_fingerprint`). A key
whose bytes change under the same key id (a leaked key replaced in place
instead of rotated) therefore retires the connections made with the old
bytes, at either end, exactly like a removed key.
"""

import signal
import threading
import time
from types import FrameType
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Protocol,
    Sequence,
    Union,
)

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall

from tigertunnel.config.model import Role, TunnelConfig
from tigertunnel.crypto import kem
from tigertunnel.keys.files import (
    load_kem_public_file,
    load_kem_secret_file,
    load_psk_file,
)
from tigertunnel.keys.ring import KeyRing
from tigertunnel.errors import KEMError, KeyFileError, TunnelError
from tigertunnel.interfaces import Clock
from tigertunnel.logs import logger
from tigertunnel.net.multiplexer import SessionMultiplexer
from tigertunnel.net.retire import DRAIN_TIMEOUT as DRAIN_TIMEOUT
from tigertunnel.net.retire import RETIRE_GRACE as RETIRE_GRACE

#: Seconds between two looks at the retired pool connections.
CHECK_INTERVAL = 1.0


class ThreadHop(Protocol):
    """The reactor call a signal handler uses to get back to the reactor thread."""

    def callFromThread(self, callable: Callable[..., Any], *args: Any,
                       **kw: Any) -> None:
        """Call ``callable`` in the reactor thread."""


log = logger(__name__)


class ReloadError(TunnelError):
    """The key files cannot be reloaded; the old keys stay in use."""


def load_keys(config: TunnelConfig) -> KeyRing:
    """Read and completely validate the key files ``config`` names.

    :returns: the new keys (nothing is changed).
    :raises ReloadError: a file cannot be read or used; the message names
        the file, the line and the reason.
    """
    if config.key_path is None:
        return KeyRing()
    try:
        psk = load_psk_file(config.key_path)
        ring = KeyRing(psk)
        if config.kem_path is not None and config.role is Role.SERVER:
            ring = KeyRing(psk, kem_secret=load_kem_secret_file(config.kem_path))
        elif config.kem_path is not None:
            ring = KeyRing(psk, kem_public=load_kem_public_file(config.kem_path))
    except KeyFileError as e:
        raise ReloadError(str(e)) from None
    # Each file's keys on their own, so that an error names its file.
    for path, keys in ((config.key_path, KeyRing(psk)), (config.kem_path, ring)):
        try:
            keys.check()
        except ValueError as e:
            raise ReloadError(f"{path}: {e}") from None
    if ring.kem_public is not None:
        try:
            kem.encapsulate(ring.kem_public[1])
        except KEMError as e:
            raise ReloadError(f"{config.kem_path}: unusable KEM public "
                              f"key ({e})") from None
    return ring


def describe(keys: KeyRing, role: Role) -> str:
    """A one-line summary of key ids for logs (never key material)."""
    return keys.describe(client=role is Role.CLIENT)


class KeyReloader:
    """Reloads the keys of a tunnel end and has outdated pool connections retired.

    :param muxes: the multiplexers of the tunnel end; they share one
        configuration, whose key files are reloaded, and take the new
        :class:`~tigertunnel.keys.ring.KeyRing` together
        (:meth:`~tigertunnel.net.pairmux.SessionMultiplexer.retire_outdated`,
        which retires and closes what the new ring makes outdated).
    :param clock: schedules the later looks at the retired pool connections.
    :param now: wall-clock time, for the reported reload time.
    """

    def __init__(self, muxes: Sequence[SessionMultiplexer], clock: Clock,
                 now: Callable[[], float] = time.time) -> None:
        self.muxes = list(muxes)
        self.clock = clock
        self.now = now
        #: Wall-clock time of the last reload attempt, ``None`` before any.
        self.last_time: Optional[float] = None
        #: Whether the last reload attempt succeeded (``None`` before any).
        self.last_ok: Optional[bool] = None
        #: Why the last reload failed ("" when it did not).
        self.last_error = ""
        self.results: Dict[str, int] = {"ok": 0, "error": 0}
        self._check_call: Optional[IDelayedCall] = None
        self._sweep_call: Optional[IDelayedCall] = None

    def reload(self) -> bool:
        """Re-read every key file; swap the keys only if all of them are good.

        :returns: whether the new keys are in use.
        """
        self.last_time = self.now()
        try:
            ring = load_keys(self.muxes[0].config) if self.muxes else KeyRing()
        except ReloadError as e:
            self.last_ok, self.last_error = False, str(e)
            self.results["error"] += 1
            log.error("key reload failed, keeping the old keys: {reason}",
                      reason=str(e))
            return False
        self.last_ok, self.last_error = True, ""
        self.results["ok"] += 1
        if ring.psk is None:
            log.info("key reload: no key files (plaintext mode)")
            self.sweep()
        else:
            role = self.muxes[0].config.role
            log.info("{role} keys reloaded: {keys}", role=role,
                     keys=describe(ring, role))
            self.sweep(ring)
        # Handshakes under way now were built with the old keys.
        timeout = max(mux.handshake_timeout for mux in self.muxes) if self.muxes else 0
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = self.clock.callLater(timeout + CHECK_INTERVAL,
                                                self._late_sweep)
        return True

    def _late_sweep(self) -> None:
        self._sweep_call = None
        self.sweep()

    def sweep(self, ring: Optional[KeyRing] = None) -> None:
        """Give every multiplexer ``ring`` (by default the one it has) and
        have it retire the pool connections keyed with outdated keys."""
        now = self.clock.seconds()
        pending = False
        for mux in self.muxes:
            pending = mux.retire_outdated(ring or mux.keyring, now) or pending
        self._schedule(pending)

    def check(self) -> None:
        """Close the retired pool connections that may go now."""
        now = self.clock.seconds()
        pending = False
        for mux in self.muxes:
            pending = mux.close_retired(now) or pending
        self._schedule(pending)

    def _schedule(self, pending: bool) -> None:
        if self._check_call is not None and self._check_call.active():
            self._check_call.cancel()
        self._check_call = None
        if pending:
            self._check_call = self.clock.callLater(CHECK_INTERVAL, self.check)

    def stop(self) -> None:
        """Cancel the scheduled checks (the tunnel end is stopping)."""
        for call in (self._check_call, self._sweep_call):
            if call is not None and call.active():
                call.cancel()
        self._check_call = self._sweep_call = None

    def status(self) -> Dict[str, Any]:
        """The reload state for ``/status``: time, result, error, counts."""
        return {"time": self.last_time, "ok": self.last_ok,
                "error": self.last_error or None,
                "results": dict(self.results)}


#: What ``signal.signal`` returns and takes.
SignalHandler = Union[Callable[[int, Optional[FrameType]], Any], int,
                      signal.Handlers, None]


class ReloadListener(Protocol):
    """Told around every reload (the systemd notifier)."""

    def reloading(self) -> None:
        """A reload starts."""

    def reloaded(self, ok: bool) -> None:
        """The reload ended; ``ok`` says whether the new keys are in use."""


class ReloadService(Service):
    """Reloads the keys on SIGHUP (twistd keeps SIGUSR1 for log rotation).

    The handler is installed in :meth:`startService` and the previous one
    restored in :meth:`stopService`. The signal handler only hops into the
    reactor (``callFromThread``); the reload runs there.

    :param reactor: provides ``callFromThread``.
    :param listeners: told around every reload (the systemd notifier).
    """

    def __init__(self, reloader: KeyReloader, reactor: ThreadHop,
                 listeners: "Sequence[ReloadListener]" = ()) -> None:
        self.reloader = reloader
        self.reactor = reactor
        self.listeners = list(listeners)
        self._previous: SignalHandler = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)
            self._installed = True

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous
                          if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        self.reloader.stop()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Reload now (what SIGHUP triggers); returns whether it succeeded."""
        if not self.running:
            return False
        log.info("SIGHUP: reloading key files")
        for listener in self.listeners:
            listener.reloading()
        ok = self.reloader.reload()
        for listener in self.listeners:
            listener.reloaded(ok)
        return ok
