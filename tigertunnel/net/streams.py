"""The stream table of one pool connection: stream id -> session.

The tunnel client numbers the streams it opens (:meth:`StreamTable.open`);
the tunnel server records the ids the client chose
(:meth:`StreamTable.attach`). Either way the pool connection owns one
table and nothing else writes to it.
"""

from typing import Callable, Dict, Iterator, List, Optional

from tigertunnel.interfaces import Session

#: Stream ids are 32-bit; 0 is never used.
_ID_MASK = 0xFFFFFFFF


class StreamInUseError(ValueError):
    """A stream id that is already open was attached again."""


class StreamTable:
    """The open streams of a pool connection.

    :ivar lookup: the session of a stream id, or ``None`` (the per-frame
        lookup: a bound ``dict.get``, no extra call layer).
    """

    def __init__(self) -> None:
        self._streams: Dict[int, Session] = {}
        self._next_id = 1
        self.lookup: Callable[[int], Optional[Session]] = self._streams.get

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
        """Forget every stream and return their sessions (the pool
        connection is gone)."""
        sessions = list(self._streams.values())
        self._streams.clear()
        return sessions
