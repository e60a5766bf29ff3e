"""Tests for :mod:`tigertunnel.net.states` and the transition tables of sessions, pool connections and pool slots."""

import enum
from typing import Any, Dict, List, Set

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.memnet import Tunnel
from tests.test_protocols import Ends
from tigertunnel.errors import HandshakeError
from tigertunnel.net.frame_protocol import SESSION_TRANSITIONS, SessionInput, SessionState
from tigertunnel.net.pool import SLOT_TRANSITIONS, SlotInput, SlotState
from tigertunnel.net.states import TransitionError, Transitions
from tigertunnel.net.states import POOL_TRANSITIONS, PoolInput, PoolState


class Light(enum.Enum):
    OFF = "off"
    ON = "on"
    BROKEN = "broken"


class Press(enum.Enum):
    SWITCH = "switch"
    HAMMER = "hammer"


LIGHT = Transitions("light", {
    Light.OFF: {Press.SWITCH: Light.ON, Press.HAMMER: Light.BROKEN},
    Light.ON: {Press.SWITCH: Light.OFF, Press.HAMMER: Light.BROKEN},
    Light.BROKEN: {},
})


def lost(protocol: Any) -> None:
    """Tell ``protocol`` its connection closed."""
    protocol.connectionLost(Failure(ConnectionDone()))


class TransitionsTests(SynchronousTestCase):
    """The table itself."""

    def test_listed_move(self) -> None:
        """A listed (state, input) pair gives its next state."""
        self.assertEqual(LIGHT(Light.OFF, Press.SWITCH), Light.ON)
        self.assertEqual(LIGHT(Light.ON, Press.HAMMER), Light.BROKEN)

    def test_unlisted_move_raises(self) -> None:
        """An input a state does not accept raises TransitionError naming the table, input and state."""
        with self.assertRaises(TransitionError) as caught:
            LIGHT(Light.BROKEN, Press.SWITCH)
        self.assertEqual(str(caught.exception),
                         "light: input SWITCH is not accepted in state BROKEN")

    def test_missing_state_refused(self) -> None:
        """A table that leaves out a state of its enum is refused when built."""
        with self.assertRaises(ValueError) as caught:
            Transitions("light", {Light.OFF: {Press.SWITCH: Light.ON}})
        self.assertEqual(str(caught.exception),
                         "light: no transitions listed for state(s) ON, BROKEN")

    def test_foreign_target_refused(self) -> None:
        """A move that leads outside the state enum is refused when built."""
        with self.assertRaises(ValueError):
            Transitions("light", {Light.OFF: {Press.SWITCH: Press.HAMMER},
                                  Light.ON: {}, Light.BROKEN: {}})

    def test_iteration_lists_moves(self) -> None:
        """Iterating a table yields every listed move once."""
        moves = list(LIGHT)
        self.assertEqual(len(moves), 4)
        self.assertEqual(len(set(moves)), 4)
        self.assertIn((Light.ON, Press.SWITCH, LIGHT(Light.ON, Press.SWITCH)), moves)
        self.assertNotIn((Light.BROKEN, Press.HAMMER), [(s, e) for s, e, _ in moves])


def reachable(table: Transitions[Any, Any], start: Any) -> Set[Any]:
    """The states reachable from ``start``."""
    seen = {start}
    todo = [start]
    while todo:
        state = todo.pop()
        for source, _, target in table:
            if source is state and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


class TableShapeTests(SynchronousTestCase):
    """The three lifecycles have no unreachable state and no state that cannot end."""

    CASES: List[Any] = [
        (SESSION_TRANSITIONS, [SessionState.NEW, SessionState.UNPLACED], SessionState.CLOSED),
        (POOL_TRANSITIONS, [PoolState.NEW], PoolState.CLOSED),
        (SLOT_TRANSITIONS, [SlotState.IDLE], SlotState.STOPPED),
    ]

    def test_every_state_reachable(self) -> None:
        """Every state can be reached from an initial state."""
        for table, starts, _ in self.CASES:
            kind = type(starts[0])
            found = set().union(*(reachable(table, s) for s in starts))
            self.assertEqual(found, set(kind), table.name)

    def test_every_state_can_end(self) -> None:
        """From every state the final state can be reached."""
        for table, starts, final in self.CASES:
            for state in type(final):
                self.assertIn(final, reachable(table, state), f"{table.name}: {state}")


class SessionStateTests(SynchronousTestCase):
    """A session moves only along its table."""

    def test_backend_session_must_be_attached_first(self) -> None:
        """A tunnel server's session that connects before it is attached raises TransitionError."""
        ends = Ends()
        session = ends.server.new_session()
        self.assertIs(session.state, SessionState.NEW)
        with self.assertRaises(TransitionError):
            session.makeConnection(StringTransport())

    def test_client_session_lifecycle(self) -> None:
        """A TB client's session goes UNPLACED, OPEN (placed), CLOSING, CLOSED."""
        ends = Ends()
        ends.link()
        session = ends.client.frame_factory.buildProtocol(None)
        self.assertIs(session.state, SessionState.UNPLACED)
        session.makeConnection(StringTransport())
        self.assertIs(session.state, SessionState.OPEN)
        session.close()
        self.assertIs(session.state, SessionState.CLOSING)
        lost(session)
        self.assertIs(session.state, SessionState.CLOSED)
        session.close()
        self.assertIs(session.state, SessionState.CLOSED)
        with self.assertRaises(TransitionError):
            lost(session)

    def test_refused_session_closes(self) -> None:
        """A TB client's session with no pool connection to go to ends up CLOSING at once."""
        ends = Ends()
        session = ends.client.frame_factory.buildProtocol(None)
        transport = StringTransport()
        session.makeConnection(transport)
        self.assertIs(session.state, SessionState.CLOSING)
        self.assertTrue(transport.disconnecting)

    def test_attach_twice_raises(self) -> None:
        """Attaching an open session to another stream raises TransitionError."""
        ends = Ends()
        client, _, _, _ = ends.link()
        session, _ = ends.tb_client()
        with self.assertRaises(TransitionError):
            session.attached(client, 99)
        self.assertEqual(session.stream_id, 1)

    def test_backend_session_lifecycle(self) -> None:
        """A tunnel server's session goes CONNECTING (attached), then OPEN once its backend connects."""
        ends = Ends()
        ends.link()
        ends.backends.hold = True
        ends.tb_client()
        backend, _ = ends.backends.held[0]
        self.assertIs(backend.state, SessionState.CONNECTING)
        ends.backends.make(backend)
        self.assertIs(backend.state, SessionState.OPEN)


class PoolConnectionStateTests(SynchronousTestCase):
    """A pool connection moves only along its table."""

    def test_lifecycle(self) -> None:
        """NEW, HANDSHAKING, ESTABLISHED, CLOSING (graceful close), CLOSED."""
        ends = Ends()
        connection = ends.client.new_pool_connection(0)
        self.assertIs(connection.state, PoolState.NEW)
        transport = StringTransport()
        connection.makeConnection(transport)
        self.assertIs(connection.state, PoolState.HANDSHAKING)
        self.assertFalse(connection.established)
        client, _, _, _ = ends.link()
        self.assertIs(client.state, PoolState.ESTABLISHED)
        client.close_gracefully()
        self.assertIs(client.state, PoolState.CLOSING)
        self.assertTrue(client.established)
        lost(client)
        self.assertIs(client.state, PoolState.CLOSED)
        client.close_gracefully()
        self.assertIs(client.state, PoolState.CLOSED)

    def test_lost_before_connected_raises(self) -> None:
        """connectionLost on a pool connection that was never connected raises TransitionError."""
        connection = Ends().client.new_pool_connection(0)
        with self.assertRaises(TransitionError):
            lost(connection)

    def test_open_stream_needs_established(self) -> None:
        """Opening a stream on a pool connection still in its handshake raises TransitionError."""
        ends = Ends()
        connection = ends.client.new_pool_connection(0)
        connection.makeConnection(StringTransport())
        with self.assertRaises(TransitionError) as caught:
            connection.open_stream(ends.client.new_session())
        self.assertIn("HANDSHAKING", str(caught.exception))

    def test_rejected_handshake_is_dead(self) -> None:
        """After a rejected handshake the connection is DEAD: later bytes are ignored."""
        ends = Ends()
        connection = ends.client.new_pool_connection(0)
        transport = StringTransport()
        connection.makeConnection(transport)
        connection.dataReceived(b"\x04")
        self.assertIs(connection.state, PoolState.DEAD)
        connection.dataReceived(b"\x00" * 49)
        self.assertIs(connection.state, PoolState.DEAD)
        self.assertEqual(ends.client.pool_connections, [])
        self.failureResultOf(connection.ready, HandshakeError)

    def test_closed_during_handshake(self) -> None:
        """A pool connection closed in its handshake is DEAD, stops its timer and fails ready once lost."""
        ends = Ends()
        connection = ends.client.new_pool_connection(0)
        transport = StringTransport()
        connection.makeConnection(transport)
        connection.close_gracefully()
        self.assertIs(connection.state, PoolState.DEAD)
        self.assertTrue(transport.disconnecting)
        ends.clock.advance(ends.client.handshake_timeout)
        self.assertEqual(ends.client.handshake_failures, 0)
        lost(connection)
        self.assertIn("connection lost during handshake",
                      self.failureResultOf(connection.ready, HandshakeError).getErrorMessage())


class PoolSlotStateTests(SynchronousTestCase):
    """A pool slot moves only along its table."""

    def test_lifecycle(self) -> None:
        """IDLE, CONNECTED once up, WAITING after a loss, CONNECTED again, STOPPING and STOPPED."""
        t = Tunnel(pool_size=1)
        slot = t.client.pool[0]
        self.assertIs(slot.state, SlotState.IDLE)
        t.start()
        self.assertIs(slot.state, SlotState.CONNECTED)
        assert slot.connection is not None
        slot.connection.transport.loseConnection()
        t.net.flush()
        self.assertIs(slot.state, SlotState.WAITING)
        t.net.advance(0.2)
        self.assertIs(slot.state, SlotState.CONNECTED)
        d = slot.stopService()
        self.assertIs(slot.state, SlotState.STOPPING)
        t.net.flush()
        self.successResultOf(d)
        self.assertIs(slot.state, SlotState.STOPPED)

    def test_refused_waits(self) -> None:
        """A refused connect leaves the slot WAITING; stopping it then is immediate."""
        t = Tunnel(pool_size=1)
        t.net.refusing.add(t.server_addr)
        t.start()
        slot = t.client.pool[0]
        self.assertIs(slot.state, SlotState.WAITING)
        self.successResultOf(slot.stopService())
        self.assertIs(slot.state, SlotState.STOPPED)
        self.assertEqual(t.clock.getDelayedCalls(), [])

    def test_retry_while_connected_raises(self) -> None:
        """A retry timer firing for a connected slot is a TransitionError, not a second connection."""
        t = Tunnel(pool_size=1)
        t.start()
        slot = t.client.pool[0]
        attempts = len(t.net.connect_attempts)
        with self.assertRaises(TransitionError):
            slot._retry_now()
        self.assertEqual(len(t.net.connect_attempts), attempts)
        self.assertIs(slot.state, SlotState.CONNECTED)


class InputCoverageTests(SynchronousTestCase):
    """Every input of each table is used by some state (no dead inputs)."""

    def test_inputs_used(self) -> None:
        """Each input enum member appears in at least one listed move."""
        for table, inputs in ((SESSION_TRANSITIONS, SessionInput),
                              (POOL_TRANSITIONS, PoolInput),
                              (SLOT_TRANSITIONS, SlotInput)):
            used: Dict[Any, int] = {}
            for _, event, _ in table:
                used[event] = used.get(event, 0) + 1
            self.assertEqual(set(used), set(inputs), table.name)
