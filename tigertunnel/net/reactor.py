"""The epoll reactor with a lean event dispatch: ``tigertunnel-epoll``.

Twisted's :class:`~twisted.internet.epollreactor.EPollReactor` runs every
socket event through :func:`twisted.python.log.callWithLogger`, which asks
the socket's transport for its log prefix and pushes a legacy logging
context (``{"system": prefix}``) around the read or write. That is about
2.5 us of Python per event, and a tunnel with one TB session in flight
spends an event on each of the four sockets a round trip crosses in each
tunnel process: with the compiled data path it is the largest single cost
left in Python.

:class:`LeanEPollReactor` is that reactor with two changes:

* ``doPoll`` hands each event straight to the reactor's own
  ``_doReadOrWrite``, which already logs any exception from a transport and
  disconnects only that transport. What is lost is the legacy ``system``
  field of log events emitted while handling a socket event (Twisted's own
  ``log.err`` then says ``-`` instead of the protocol's name); tigertunnel's
  log lines name their source by namespace and do not use it.
* ``mainLoop`` runs the timed calls only when one is due (or new, or a
  thread queued a call, or ``stop`` was called: the shutdown event is
  fired there) and computes the poll timeout from the same clock
  reading; Twisted's loop calls ``runUntilCurrent`` and ``timeout`` and
  enters an error handler on every turn, a dozen Python calls per turn,
  and a TB round trip takes two turns in each tunnel process. What runs,
  and when, is the same: due calls run before the next poll, calls added
  while handling events are seen by the next turn, the poll never sleeps
  past the earliest call, and an exception escaping a turn is logged and the
  loop goes on.

The ``tigertunnel`` console script installs it (on Linux, unless a reactor
was installed already); under ``twistd`` it is chosen with
``--reactor=tigertunnel-epoll`` (the systemd units do), through the
reactor plugin in ``twisted/plugins/tigertunnel_plugin.py``.
"""

import errno
from typing import Any, Optional

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.python import log

from tigertunnel.logs import logger

__all__ = ["LeanEPollReactor", "install", "NAME"]

#: The reactor's short name for ``twistd --reactor``.
NAME = "tigertunnel-epoll"
#: The longest poll timeout, in seconds: epoll_wait takes a C int of ms
#: (Twisted's ``timeout`` uses the same bound).
LONGEST_WAIT = 2147483

#: Through the level filter: "Main loop terminated." follows --log-level.
_log = logger(__name__)


class LeanEPollReactor(EPollReactor):
    """:class:`~twisted.internet.epollreactor.EPollReactor` without a logging context per socket event."""

    def doPoll(self, timeout: Optional[float]) -> None:
        """Poll for events and handle each one; ``None`` waits indefinitely."""
        try:
            events = self._poller.poll(-1 if timeout is None else timeout,
                                       len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise  # a programming error, as in EPollReactor
        selectable_of = self._selectables.get
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable: Any = selectable_of(fd)
            if selectable is None:
                continue  # removed by an earlier event of this poll
            try:
                handle(selectable, fd, event)
            except BaseException:
                # _doReadOrWrite catches what a transport raises; this is
                # its disconnect path failing: log it, keep serving.
                log.err(None, "error handling a socket event")

    doIteration = doPoll

    def mainLoop(self) -> None:
        """Turn until stopped; an exception escaping a turn is logged and
        the loop goes on (as in Twisted's ``mainLoop``)."""
        while self._started:
            try:
                self._turn_until_stopped()
            except BaseException:
                _log.failure("Unexpected error in main loop")
        _log.info("Main loop terminated.")

    def _turn_until_stopped(self) -> None:
        seconds = self.seconds
        poll = self.doPoll
        while self._started:
            now = seconds()
            pending = self._pendingTimedCalls
            if (self.threadCallQueue or self._newTimedCalls or self._justStopped
                    or (pending and pending[0].time <= now)):
                self.runUntilCurrent()
                # Calls made by the calls just run; Twisted's timeout()
                # inserts them the same way.
                self._insertNewDelayedCalls()
                now = seconds()
                pending = self._pendingTimedCalls
            if not self.running:
                wait: Optional[float] = 0.0
            elif not pending:
                wait = None
            else:
                wait = pending[0].time - now
                if wait < 0.0:
                    wait = 0.0
                elif wait > LONGEST_WAIT:
                    wait = LONGEST_WAIT
            poll(wait)


def install() -> LeanEPollReactor:
    """Install :class:`LeanEPollReactor` as the global reactor (before anything imports it)."""
    reactor = LeanEPollReactor()
    installReactor(reactor)
    return reactor
