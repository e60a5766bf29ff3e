"""Outcome: the one result of something that ends once, for any number of waiters.

A pool connection's handshake ends once, established or failed; a pool
slot, a test or admission may each ask for a Deferred of it, before or
after. :class:`Outcome` keeps the result and fires every waiter with it.
"""

from typing import Generic, List, Optional, TypeVar, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

#: The type of the settled result.
T = TypeVar("T")


class Outcome(Generic[T]):
    """A result that is settled once: a value or a :class:`~twisted.python.failure.Failure`."""

    def __init__(self) -> None:
        self._result: Optional[Union[T, Failure]] = None
        self._settled = False
        self._waiters: List["Deferred[T]"] = []

    @property
    def settled(self) -> bool:
        """Whether the result is known."""
        return self._settled

    def wait(self) -> "Deferred[T]":
        """A new Deferred that fires with the result (at once if settled)."""
        if not self._settled:
            d: Deferred[T] = Deferred()
            self._waiters.append(d)
            return d
        result = self._result
        if isinstance(result, Failure):
            return fail(result)
        return succeed(result)  # type: ignore[arg-type]

    def settle(self, result: Union[T, Failure]) -> None:
        """Keep ``result`` and fire the waiters; a later call does nothing."""
        if self._settled:
            return
        self._result, self._settled = result, True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
