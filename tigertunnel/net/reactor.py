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

Both read the reactor's private state, so the loop itself lives in
:mod:`tigertunnel.net.twisted_private`
(:class:`~tigertunnel.net.twisted_private.LeanLoop`), which checks
at import that the installed Twisted has what it reads; if not,
:func:`install` installs Twisted's stock epoll reactor instead (and that
module logs one warning saying so).

The ``tigertunnel`` console script installs it (on Linux, unless a reactor
was installed already); under ``twistd`` it is chosen with
``--reactor=tigertunnel-epoll`` (the systemd units do), through the
reactor plugin in ``twisted/plugins/tigertunnel_plugin.py``.
"""

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor

from tigertunnel.net import twisted_private
from tigertunnel.net.twisted_private import LONGEST_WAIT, LeanLoop

__all__ = ["LeanEPollReactor", "install", "NAME", "LONGEST_WAIT"]

#: The reactor's short name for ``twistd --reactor``.
NAME = "tigertunnel-epoll"


class LeanEPollReactor(LeanLoop, EPollReactor):
    """:class:`~twisted.internet.epollreactor.EPollReactor` without a logging context per
    socket event."""


def install() -> EPollReactor:
    """Install :class:`LeanEPollReactor` as the global reactor (before
    anything imports it); Twisted's :class:`~twisted.internet.epollreactor.EPollReactor` when
    :data:`~tigertunnel.net.twisted_private.LEAN_REACTOR` is false."""
    reactor = LeanEPollReactor() if twisted_private.LEAN_REACTOR else EPollReactor()
    installReactor(reactor)
    return reactor
