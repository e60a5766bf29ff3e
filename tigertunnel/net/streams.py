"""The stream table of one pool connection: stream id -> session.

The tunnel client numbers the streams it opens (:meth:`StreamTable.open`);
the tunnel server records the ids the client chose
(:meth:`StreamTable.attach`). Either way the pool connection owns one
table and nothing else writes to it.

The table also holds the tunnel server's policy for streams the client
opened with a bare (unauthenticated) stream_open
(:meth:`StreamTable.peer_opened`): such a stream is *unproven* until its
first authenticated data frame (:meth:`StreamTable.prove`); at most
:data:`MAX_UNPROVEN_STREAMS` wait at once, and one more, or an open of an
id in use, is a :class:`StreamRefused` that closes the pool connection.
"""

from typing import Callable, Dict, Iterator, List, Optional, Set

from tigertunnel.interfaces import Session

#: Stream ids are 32-bit; 0 is never used.
_ID_MASK = 0xFFFFFFFF


#: Bare (unauthenticated) stream_opens a server holds per pool connection
#: until their first data frame; one more closes the pool connection. A
#: real client has a stream unproven only between a TB connect and the TB
#: peer's first frame (microseconds), so this covers a burst of TB
#: connects; closing (rather than dropping one silently) makes TB
#: reconnect instead of waiting on a stream that would never open.
MAX_UNPROVEN_STREAMS = 64


class StreamInUseError(ValueError):
    """A stream id that is already open was attached again."""


class StreamRefused(ValueError):
    """The peer's stream_open breaks the stream policy (an id in use, or
    too many unproven streams): the pool connection closes."""


class StreamTable:
    """The open streams of a pool connection.

    :ivar lookup: the session of a stream id, or ``None`` (the per-frame
        lookup: a bound ``dict.get``, no extra call layer).
    """

    def __init__(self) -> None:
        self._streams: Dict[int, Session] = {}
        self._next_id = 1
        self.lookup: Callable[[int], Optional[Session]] = self._streams.get
        #: Stream ids the peer opened with a bare stream_open whose first
        #: authenticated data frame has not arrived yet (server).
        self.unproven: Set[int] = set()

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._streams

    def __iter__(self) -> Iterator[Session]:
        """The sessions (a snapshot: callers may close them while iterating)."""
        return iter(list(self._streams.values()))

    def open(self, session: Session) -> int:
        """Record ``session`` under the next free stream id and return the id.

        Ids count up from 1, wrap at 2**32 and skip 0 and ids still open.

        :raises StreamInUseError: all 2**32 - 1 ids are open.
        """
        streams = self._streams
        if len(streams) >= _ID_MASK:
            raise StreamInUseError("every stream id is in use")
        stream_id = self._next_id
        while stream_id in streams or stream_id == 0:
            stream_id = (stream_id + 1) & _ID_MASK
        self._next_id = (stream_id + 1) & _ID_MASK
        streams[stream_id] = session
        return stream_id

    def attach(self, stream_id: int, session: Session) -> None:
        """Record ``session`` under ``stream_id``, which the peer chose.

        :raises StreamInUseError: ``stream_id`` is open already.
        """
        if stream_id in self._streams:
            raise StreamInUseError(f"stream {stream_id} is already open")
        self._streams[stream_id] = session

    def remove(self, stream_id: int, session: Optional[Session] = None) -> Optional[Session]:
        """Forget ``stream_id`` and return its session (``None`` if not open).

        With ``session``, only forget the stream if it belongs to that
        session (a late close of a stream id reused since does nothing).
        """
        streams = self._streams
        if session is not None and streams.get(stream_id) is not session:
            return None
        return streams.pop(stream_id, None)

    def drain(self) -> List[Session]:
        """Forget every stream, unproven ones too, and return the sessions
        (the pool connection is gone)."""
        sessions = list(self._streams.values())
        self._streams.clear()
        self.unproven.clear()
        return sessions

    def peer_opened(self, stream_id: int, proven: bool) -> bool:
        """The peer opened ``stream_id`` (tunnel server).

        :param proven: the stream_open was authenticated (sealed, version
            2), or nothing is (plaintext mode).
        :returns: ``True``: open its backend now; ``False``: it waits,
            unproven, for its first data frame (:meth:`prove`).
        :raises StreamRefused: the id is open or waiting already (our
            client never reuses an open id: tampering or a broken peer), or
            :data:`MAX_UNPROVEN_STREAMS` wait already.
        """
        unproven = self.unproven
        if stream_id in self._streams or stream_id in unproven:
            raise StreamRefused(f"stream_open for stream {stream_id}, which is open")
        if proven:
            return True
        if len(unproven) >= MAX_UNPROVEN_STREAMS:
            raise StreamRefused(f"more than {MAX_UNPROVEN_STREAMS} streams opened "
                                f"without a data frame")
        unproven.add(stream_id)
        return False

    def prove(self, stream_id: int) -> bool:
        """An authenticated data frame arrived for ``stream_id``, which is
        not open: whether it was unproven (it is no longer; open its
        backend). ``False``: closed or refused since, drop the frame."""
        unproven = self.unproven
        if stream_id not in unproven:
            return False
        unproven.discard(stream_id)
        return True

    def peer_closed(self, stream_id: int) -> Optional[Session]:
        """The peer closed ``stream_id``: forget it (unproven or open) and
        return its session, if it had one."""
        session = self._streams.pop(stream_id, None)
        if session is None:
            self.unproven.discard(stream_id)
        return session
