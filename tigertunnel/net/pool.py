"""PoolSlot: keeps one pool connection of a tunnel client up.

A client pair has ``-n`` slots. Each connects, runs the handshake and, when
the TCP connect fails, the handshake fails or an established pool
connection is lost, tries again after ``policy(consecutive failures)``
seconds (:func:`~tigertunnel.net.backoff.backoff_policy`: 100 ms doubling
to 10 s, with jitter); a completed handshake resets the count.

(Twisted's ``ClientService`` is not used: it cannot handle a connection
that closes after its ``prepareConnection`` failed, which is exactly what
a rejected handshake does.)

Lifecycle (:data:`SLOT_TRANSITIONS`): ``IDLE`` -> ``CONNECTING`` (TCP) ->
``CONNECTED`` (handshaking or established) -> ``WAITING`` (for the next
attempt) -> ``CONNECTING`` ...; stopping goes to ``STOPPED``, through
``STOPPING`` while the pool connection closes gracefully.
"""

import enum
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from tigertunnel.interfaces import PoolOwner
from tigertunnel.logs import logger
from tigertunnel.net.backoff import backoff_policy
from tigertunnel.net.frame_protocol import PrebuiltFactory
from tigertunnel.net.states import Transitions
from tigertunnel.net.tunnel_protocol import TunnelProtocol

log = logger(__name__)


class SlotState(enum.Enum):
    """Where a pool slot is (see the module docstring)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"
    STOPPING = "stopping"
    STOPPED = "stopped"


class SlotInput(enum.Enum):
    """What happens to a pool slot."""

    START = "start"
    #: The TCP connection was made.
    CONNECTED = "connected"
    CONNECT_FAILED = "connect_failed"
    #: The pool connection's handshake completed.
    READY = "ready"
    #: The pool connection is gone.
    LOST = "lost"
    #: The backoff delay is over.
    RETRY = "retry"
    STOP = "stop"


_S, _I = SlotState, SlotInput

#: Every move a pool slot may make; anything else is a TransitionError.
SLOT_TRANSITIONS: Transitions[SlotState, SlotInput] = Transitions("pool slot", {
    _S.IDLE: {_I.START: _S.CONNECTING, _I.STOP: _S.STOPPED},
    _S.CONNECTING: {_I.CONNECTED: _S.CONNECTED, _I.CONNECT_FAILED: _S.WAITING,
                    _I.STOP: _S.STOPPED},
    _S.CONNECTED: {_I.READY: _S.CONNECTED, _I.LOST: _S.WAITING,
                   _I.STOP: _S.STOPPING},
    _S.WAITING: {_I.RETRY: _S.CONNECTING, _I.STOP: _S.STOPPED},
    _S.STOPPING: {_I.READY: _S.STOPPING, _I.LOST: _S.STOPPED},
    # A connect cancelled by the stop reports its failure afterwards.
    _S.STOPPED: {_I.START: _S.CONNECTING, _I.STOP: _S.STOPPED,
                 _I.CONNECT_FAILED: _S.STOPPED},
})


class PoolSlot(Service):
    """Keeps one pool connection up: connect, handshake, reconnect with backoff.

    :param owner: the tunnel client's multiplexer of the pair.
    :param index: the slot's number in the pool (in pool connection names).
    :param policy: seconds to wait after ``n`` consecutive failures
        (docs/protocol.rst §7.8's backoff by default).
    """

    def __init__(self, owner: "PoolOwner[TunnelProtocol]", index: int,
                 policy: Callable[[int], float] = backoff_policy()) -> None:
        self.owner = owner
        self.index = index
        self.policy = policy
        self.state = SlotState.IDLE
        #: Consecutive failed attempts.
        self.failures = 0
        self.connected_before = False
        #: The slot's pool connection while connected (handshaking or
        #: established).
        self.connection: Optional[TunnelProtocol] = None
        self._connecting: Optional[Deferred[Any]] = None
        self._retry: Optional[IDelayedCall] = None
        self._stopped: Optional[Deferred[None]] = None

    def _goto(self, event: SlotInput) -> SlotState:
        """Make the move ``event`` and return the state it leaves."""
        before = self.state
        self.state = SLOT_TRANSITIONS(before, event)
        return before

    def startService(self) -> None:
        super().startService()
        self._goto(SlotInput.START)
        self._attempt()

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        before = self._goto(SlotInput.STOP)
        if before is SlotState.WAITING and self._retry is not None:
            if self._retry.active():
                self._retry.cancel()
            self._retry = None
        elif before is SlotState.CONNECTING and self._connecting is not None:
            self._connecting.cancel()
        elif before is SlotState.CONNECTED and self.connection is not None:
            stopped: Deferred[None] = Deferred()
            self._stopped = stopped
            self.connection.close_gracefully()
            return stopped
        return succeed(None)

    def _attempt(self) -> None:
        owner = self.owner
        connection = owner.new_pool_connection(self.index)
        connection.on_lost = self._lost
        d = owner.pool_endpoint().connect(PrebuiltFactory(connection))
        self._connecting = d
        d.addCallbacks(lambda _: self._connected(connection), self._connect_failed)

    def _connected(self, connection: TunnelProtocol) -> None:
        self._goto(SlotInput.CONNECTED)
        self._connecting = None
        self.connection = connection
        connection.ready.addCallbacks(self._ready, lambda f: None)

    def _ready(self, connection: TunnelProtocol) -> None:
        self._goto(SlotInput.READY)
        self.failures = 0
        if self.connected_before:
            self.owner.stats.pool_reconnects += 1
        self.connected_before = True

    def _connect_failed(self, reason: Failure) -> None:
        before = self._goto(SlotInput.CONNECT_FAILED)
        self._connecting = None
        if before is SlotState.STOPPED:
            return  # the stop cancelled it
        delay = self._schedule()
        self.owner.pool_connect_failed(self.index, reason.getErrorMessage(), delay)

    def _lost(self, connection: TunnelProtocol) -> None:
        if connection is not self.connection:
            return  # an earlier attempt's connection
        self.connection = None
        before = self._goto(SlotInput.LOST)
        if before is SlotState.STOPPING:
            stopped, self._stopped = self._stopped, None
            if stopped is not None:
                stopped.callback(None)
            return
        self._schedule()

    def _schedule(self) -> float:
        """Arm the next attempt; returns its delay in seconds."""
        self.failures += 1
        delay = self.policy(self.failures)
        log.debug("client {pair}: pool connection {slot} retry in {delay:.2f} s",
                  pair=self.owner.pair_name, slot=self.index, delay=delay)
        self._retry = self.owner.clock.callLater(delay, self._retry_now)
        return delay

    def _retry_now(self) -> None:
        self._goto(SlotInput.RETRY)
        self._retry = None
        self._attempt()
