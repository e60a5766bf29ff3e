"""Transition tables: the explicit lifecycles of the net/ objects.

A pool connection, a session and a pool slot each keep their lifecycle in
one enum attribute and move it only through a :class:`Transitions` table:
every (state, input) pair is either listed, with the state it leads to, or
an error (:class:`TransitionError`). The pool connection's table is here
(:data:`POOL_TRANSITIONS`, used by
:mod:`~tigertunnel.net.tunnel_protocol`); the session's and the pool
slot's live beside their objects (:mod:`~tigertunnel.net.frame_protocol`,
:mod:`~tigertunnel.net.pool`). The objects do the work that goes with
a transition themselves; the table only says which moves exist, so that a
move nobody planned for fails loudly instead of leaving flags half set.
"""

import enum
from typing import Dict, Generic, Iterator, Mapping, Tuple, TypeVar

#: The states of a transition table.
S = TypeVar("S", bound=enum.Enum)
#: The inputs of a transition table.
I = TypeVar("I", bound=enum.Enum)


class TransitionError(RuntimeError):
    """An input arrived in a state that has no transition for it (a bug)."""


class Transitions(Generic[S, I]):
    """The legal moves of one kind of object.

    :param name: names the object kind in errors (``pool connection`` ...).
    :param table: for each state, the state each accepted input leads to.
        Every state of the enum must appear (a final state with an empty
        mapping), and every target must be a state of the same enum.
    :raises ValueError: the table leaves out a state or leads outside it.
    """

    def __init__(self, name: str, table: Mapping[S, Mapping[I, S]]) -> None:
        self.name = name
        states = list(table)
        if not states:
            raise ValueError(f"{name}: empty transition table")
        kind = type(states[0])
        missing = [s.name for s in kind if s not in table]
        if missing:
            raise ValueError(f"{name}: no transitions listed for state(s) "
                             f"{', '.join(missing)}")
        for state, moves in table.items():
            for event, target in moves.items():
                if not isinstance(target, kind):
                    raise ValueError(f"{name}: {state.name} --{event.name}--> "
                                     f"{target!r} is not a {kind.__name__}")
        self._table: Dict[S, Dict[I, S]] = {s: dict(m) for s, m in table.items()}

    def __call__(self, state: S, event: I) -> S:
        """The state ``event`` leads to from ``state``.

        :raises TransitionError: ``event`` is not accepted in ``state``.
        """
        try:
            return self._table[state][event]
        except KeyError:
            raise TransitionError(f"{self.name}: input {event.name} is not "
                                  f"accepted in state {state.name}") from None

    def __iter__(self) -> Iterator[Tuple[S, I, S]]:
        """Every listed move as (state, input, next state)."""
        for state, moves in self._table.items():
            for event, target in moves.items():
                yield state, event, target


class PoolState(enum.Enum):
    """Where a pool connection is in its life (see
    :mod:`~tigertunnel.net.tunnel_protocol`)."""

    NEW = "new"
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    DRAINING = "draining"
    CLOSING = "closing"
    DEAD = "dead"
    CLOSED = "closed"


class PoolInput(enum.Enum):
    """What happens to a pool connection."""

    #: The TCP connection was made (connectionMade).
    CONNECT = "connect"
    #: The handshake completed (at once in plaintext mode).
    ESTABLISH = "establish"
    #: The handshake failed, timed out or was evicted; or the established
    #: connection failed (bad bytes): it is closed or aborted.
    FAIL = "fail"
    #: Close gracefully (key reload, shutdown, a pool slot stopping).
    CLOSE = "close"
    #: A key reload retired the key it was made with: no new sessions
    #: while another connection can take them, closed once idle.
    RETIRE = "retire"
    #: A later reload made its key current again.
    RENEW = "renew"
    #: The connection is gone (connectionLost).
    LOSE = "lose"


_S, _I = PoolState, PoolInput

#: Every move a pool connection may make; anything else is a TransitionError.
POOL_TRANSITIONS: Transitions[PoolState, PoolInput] = Transitions("pool connection", {
    _S.NEW: {_I.CONNECT: _S.HANDSHAKING},
    _S.HANDSHAKING: {_I.ESTABLISH: _S.ESTABLISHED, _I.FAIL: _S.DEAD,
                     _I.CLOSE: _S.DEAD, _I.LOSE: _S.CLOSED},
    _S.ESTABLISHED: {_I.CLOSE: _S.CLOSING, _I.FAIL: _S.DEAD, _I.LOSE: _S.CLOSED,
                     _I.RETIRE: _S.DRAINING},
    _S.DRAINING: {_I.RENEW: _S.ESTABLISHED, _I.CLOSE: _S.CLOSING,
                  _I.FAIL: _S.DEAD, _I.LOSE: _S.CLOSED},
    _S.CLOSING: {_I.CLOSE: _S.CLOSING, _I.FAIL: _S.DEAD, _I.LOSE: _S.CLOSED},
    # A dead connection may still be evicted (aborted) or closed again.
    _S.DEAD: {_I.CLOSE: _S.DEAD, _I.FAIL: _S.DEAD, _I.LOSE: _S.CLOSED},
    # Closing what is already gone (a late sweep or shutdown) does nothing.
    _S.CLOSED: {_I.CLOSE: _S.CLOSED},
})
