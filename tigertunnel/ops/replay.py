"""The ClientHello replay cache of a tunnel server: one per tunnel end.

Every proxy pair and every worker process of a tunnel server checks the
hellos it accepts against one table (:mod:`tigertunnel.wire.replaywindow`),
so a recorded ClientHello is refused after a restart, by another worker and
by another proxy pair of the same end. Where the table is
(:func:`replay_path`, :class:`ReplayCacheService`):

* ``--replay-file FILE``, else ``<pidfile>.replay`` next to twistd's
  pidfile (:func:`default_path`): a file (:mod:`tigertunnel.ops.replayfile`)
  every worker opens and a restarted server loads;
* no file (the console script or ``twistd --pidfile=`` without
  ``--replay-file``, or ``--replay-file memory``) and ``--workers`` above 1:
  shared memory that worker 0 makes and hands to its workers
  (:func:`~tigertunnel.ops.replayfile.create_shared_memory`), forgotten when
  the tunnel end stops;
* no file and one process: the process's memory
  (:class:`~tigertunnel.wire.handshake.ReplayCache`), forgotten at restart.

A hello the table cannot record (no room without forgetting an unexpired
one, or an I/O error) is refused: the handshake answers status 2, the
handshake-failure metric counts it (reason ``replay_cache_full`` or
``replay_cache_error``) and a warning is logged at most once a minute.

The file is opened in ``startService``, that is after ``twistd -u/-g`` has
dropped privileges, so it belongs to the user the tunnel runs as, and worker
processes (started as that user) can open it too.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Union

from twisted.application.service import Service

from tigertunnel.logs import LogRateLimit, logger
from tigertunnel.ops.replayfile import FileReplayCache, create_shared_memory
from tigertunnel.wire.handshake import TIMESTAMP_TOLERANCE, ReplayCache
from tigertunnel.wire.replaywindow import HEADER_SIZE, MAGIC, RECORD_SIZE, Verdict

__all__ = ["FileReplayCache", "ReplayCacheService", "create_shared_memory",
           "default_path", "replay_path", "IN_MEMORY", "MAGIC", "HEADER_SIZE",
           "RECORD_SIZE", "TIMESTAMP_TOLERANCE", "REFUSAL_LOG_INTERVAL"]


def default_path(pidfile: str) -> str:
    """Return where a tunnel end with this pidfile keeps its replay cache."""
    return pidfile + ".replay"


#: ``--replay-file`` values that mean "no file": shared memory with
#: workers, else the process's memory.
IN_MEMORY = ("", "memory")


def replay_path(option: Optional[str], pidfile: Optional[str]) -> Optional[str]:
    """Where a tunnel server keeps its replay cache (absolute), or ``None``
    for no file.

    :param option: the ``--replay-file`` value, ``None`` when not given;
        ``""`` or ``"memory"`` ask for no file.
    :param pidfile: twistd's ``--pidfile`` (``None`` or ``""`` when there is
        none, as for the console script).
    """
    if option is not None:
        return None if option in IN_MEMORY else os.path.abspath(option)
    if pidfile:
        return default_path(os.path.abspath(pidfile))
    return None


log = logger(__name__)

#: Minimum seconds between two log lines about refused hellos of one kind.
REFUSAL_LOG_INTERVAL = 60.0


class ReplayCacheService(Service):
    """The replay cache of a tunnel server, shared by all its proxy pairs
    (and, through the file or the shared memory, by all its workers).

    Until :meth:`startService` the hellos are kept in memory; once started,
    in the table at ``path`` or behind ``descriptor``.

    :param path: the cache file, or ``None``.
    :param descriptor: without a file, the shared memory of the tunnel
        end's workers (:func:`~tigertunnel.ops.replayfile.create_shared_memory`, inherited by
        workers).
    :param now: wall-clock seconds (hello timestamps are wall clock).
    :param monotonic: the clock of the log rate limits.
    :ivar refused: hellos this process refused because the table could not
        record them, by :class:`~tigertunnel.wire.replaywindow.Verdict` (``FULL``, ``FAILED``).
    """

    def __init__(self, path: Optional[str], descriptor: Optional[int] = None,
                 now: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.descriptor = descriptor
        self._now = now
        self._monotonic = monotonic
        self.cache: Union[ReplayCache, FileReplayCache] = ReplayCache(now=now)
        self.refused = {Verdict.FULL: 0, Verdict.FAILED: 0}
        self._limits = {verdict: LogRateLimit(REFUSAL_LOG_INTERVAL)
                        for verdict in self.refused}

    def __len__(self) -> int:
        return len(self.cache)

    def startService(self) -> None:
        """Open the file or the shared memory (after twistd dropped privileges).

        :raises ReplayCacheError: it cannot be used (one line naming it).
        """
        if self.path is not None:
            cache = FileReplayCache(self.path, now=self._now, notice=self._notice)
            log.info("replay cache: {path} ({count} hellos remembered, room "
                     "for {capacity})", path=self.path, count=len(cache),
                     capacity=cache.table.capacity)
            self.cache = cache
        elif self.descriptor is not None:
            cache = FileReplayCache.from_descriptor(self.descriptor, now=self._now)
            log.info("replay cache: in memory shared by the workers of this "
                     "tunnel end (no --pidfile or --replay-file): a "
                     "ClientHello replayed after a restart is not recognised")
            self.cache = cache
        else:
            log.info("replay cache: in memory only (no --pidfile or "
                     "--replay-file): a ClientHello replayed after a restart "
                     "is not recognised")
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        cache = self.cache
        if isinstance(cache, FileReplayCache):
            cache.close()
            self.cache = ReplayCache(now=self._now)

    def _notice(self, text: str) -> None:
        log.warn("{text}", text=text)

    def check_and_add(self, digest: bytes, timestamp: int) -> Verdict:
        """Record a hello by its hash, for every process of the tunnel end;
        log (at most once a minute per kind) a hello refused because it
        could not be recorded."""
        cache = self.cache
        verdict = cache.check_and_add(digest, timestamp)
        if verdict in self.refused:
            self.refused[verdict] += 1
            held = self._limits[verdict].allow(self._monotonic())
            if held is not None:
                where = self.path or "in memory"
                if verdict is Verdict.FULL:
                    log.warn("replay cache {where} is full of unexpired hellos "
                             "(room for {capacity}): refusing new ClientHellos "
                             "until some expire ({count} refused so far)",
                             where=where, capacity=cache.table.capacity,
                             count=self.refused[verdict])
                else:
                    error = getattr(cache, "last_error", None)
                    log.warn("replay cache {where}: {error}; refusing new "
                             "ClientHellos until it works again ({count} "
                             "refused so far)", where=where, error=error,
                             count=self.refused[verdict])
        return verdict
