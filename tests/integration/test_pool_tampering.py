"""A tampered pool connection fails closed, delivers nothing after the fault, and comes back.

A :class:`~tests.integration.faults.FaultProxy` between the tunnel client
and server flips a bit in, drops, duplicates, reorders or relabels one
encrypted frame (either way), or corrupts a ClientHello; the pool
connection and its sessions close, and a new session works on the next
pool connection.
"""

from typing import Dict, List

from twisted.trial.unittest import TestCase

from tests.integration.faults import C2S, S2C, ByteFault, Fault, UnitFault
from tests.integration.tbpeers import (
    REPLY,
    control_frame,
    digest,
    filler,
    make_frame,
    reply_frame,
    the_reactor,
)
from tests.integration.tunnels import (
    DEADLINE,
    InProcessTunnel,
    LogCapture,
    first_link,
    ms,
    record,
)

PAST = {"drop": "dropped", "duplicate": "duplicated", "reorder": "reordered"}


class PoolTamperingTests(TestCase):
    """A tampered pool connection fails closed and comes back."""

    timeout = 120

    async def scenario(self, direction: str, fault: UnitFault, what: str) -> Dict[str, float]:
        """Two sessions on one pool connection; a fault on the third data unit of ``direction``.

        Checks that the pool connection and both sessions (TB clients and
        backend connections) close, that nothing sent after the fault
        arrives anywhere, and that a new session works on a new pool
        connection.
        """
        t = await InProcessTunnel(self, faults=first_link(fault, direction)).start()
        a, backend_a = await t.session()
        b, backend_b = await t.session()
        f1 = make_frame(filler(1500, 1), 1)
        f2 = make_frame(filler(1500, 2), 2)
        a.send(f1)
        await a.wait_frames(1, DEADLINE)
        b.send(f2)
        await b.wait_frames(1, DEADLINE)
        assert t.proxy is not None
        link = t.proxy.links[0]
        allowed_a_backend: List[str] = [digest(f1)]
        allowed_a_tb: List[str] = [digest(f1)]
        if direction == C2S:
            f3, f4, f5 = (make_frame(filler(2000, i), i) for i in (3, 4, 5))
            a.send(f3)
            await fault.fired.addTimeout(DEADLINE, the_reactor())
            b.send(f4)
            a.send(f5)
            if fault.action == "duplicate":  # the original f3 went through
                allowed_a_backend.append(digest(f3))
                allowed_a_tb.append(digest(f3))
        else:
            request = control_frame(REPLY, count=3, size=3000, tag=3)
            a.send(request)
            allowed_a_backend.append(digest(request))
            await fault.fired.addTimeout(DEADLINE, the_reactor())
            if fault.action == "duplicate":
                allowed_a_tb.append(digest(reply_frame(3, 0, 3000)))
        assert fault.fired_at is not None
        for peer in (a, b, backend_a, backend_b):
            await peer.wait_lost(DEADLINE)
        await link.closed.addTimeout(DEADLINE, the_reactor())
        detection = {
            "pool connection closed": link.closed_at - fault.fired_at,
            "TB clients closed": max(a.lost_at, b.lost_at) - fault.fired_at,  # type: ignore
            "backend connections closed": max(backend_a.lost_at,  # type: ignore
                                              backend_b.lost_at) - fault.fired_at,
        }
        # Nothing after the fault reached a backend or a TB client.
        self.assertIn(backend_a.digests, [allowed_a_backend[:n] for n in
                                          range(1, len(allowed_a_backend) + 1)], what)
        self.assertEqual(backend_b.digests, [digest(f2)], what)
        self.assertIn(a.digests, [allowed_a_tb[:n] for n in
                                  range(1, len(allowed_a_tb) + 1)], what)
        self.assertEqual(b.digests, [digest(f2)], what)
        self.assertEqual((bytes(a.splitter.buffer), bytes(b.splitter.buffer)), (b"", b""),
                         f"{what}: a partial frame was delivered")
        await t.pool_up()
        rtt = await t.round_trip(50)
        self.assertEqual(len(t.proxy.links), 2, "the pool connection was replaced once")
        record("pool tampering",
               f"{what}: " + ", ".join(f"{k} {ms(v)} after the fault"
                                       for k, v in detection.items())
               + f"; new session on the new pool connection RTT {ms(rtt)}")
        await t.stop()
        return detection

    #: Bit positions in a data unit: (what, offset in the unit, bit).
    FLIPS = [
        ("tag", 12 + 5, 3),
        ("ciphertext (header part)", 12 + 20 + 40, 0),
        ("ciphertext (body part)", 12 + 256 + 100, 7),
        ("mux header magic", 2, 1),
        ("mux header stream id", 4, 0),
        ("mux header type (data -> stream_close)", 8, 1),
        ("mux header reserved byte", 10, 4),
    ]

    async def test_flipped_bit_client_to_server(self) -> None:
        """One flipped bit in a client-to-server frame's tag, ciphertext or mux header fails the pool connection closed."""
        for what, offset, bit in self.FLIPS:
            await self.scenario(C2S, UnitFault("flip", index=2, offset=offset, bit=bit),
                                f"c2s flipped bit in {what}")

    async def test_flipped_bit_server_to_client(self) -> None:
        """One flipped bit in a server-to-client frame's tag, ciphertext or mux header fails the pool connection closed."""
        for what, offset, bit in self.FLIPS:
            await self.scenario(S2C, UnitFault("flip", index=2, offset=offset, bit=bit),
                                f"s2c flipped bit in {what}")

    async def test_dropped_duplicated_reordered_client_to_server(self) -> None:
        """A dropped, duplicated or reordered client-to-server frame fails the pool connection closed."""
        for action in ("drop", "duplicate", "reorder"):
            await self.scenario(C2S, UnitFault(action, index=2), f"c2s {PAST[action]} frame")

    async def test_dropped_duplicated_reordered_server_to_client(self) -> None:
        """A dropped, duplicated or reordered server-to-client frame fails the pool connection closed."""
        for action in ("drop", "duplicate", "reorder"):
            await self.scenario(S2C, UnitFault(action, index=2), f"s2c {PAST[action]} frame")

    async def test_relabelled_frame(self) -> None:
        """A frame relabelled to the other live stream, either way, fails the pool connection closed."""
        await self.scenario(C2S, UnitFault("relabel", index=2, stream=2),
                            "c2s frame of stream 1 relabelled to stream 2")
        await self.scenario(S2C, UnitFault("relabel", index=2, stream=2),
                            "s2c frame of stream 1 relabelled to stream 2")

    async def test_corrupted_hello(self) -> None:
        """A ClientHello with one corrupted byte is refused, and the pool connection retries and comes up."""
        log = LogCapture(self)
        t = await InProcessTunnel(self, faults=lambda i: (
            (ByteFault("corrupt", at=40, mask=0x10) if i == 0 else Fault()), Fault())).start()
        assert t.proxy is not None
        self.assertEqual(len(t.proxy.links), 2)
        gap = t.proxy.links[1].accepted_at - t.proxy.links[0].accepted_at
        rtt = await t.round_trip(1)
        failures = log.matching("handshake failed")
        self.assertEqual(len([f for f in failures if "server pool connection" in f]), 1,
                         failures)
        record("pool tampering",
               f"ClientHello with one corrupted byte: refused ({failures[0]!r}); the "
               f"client retried after {ms(gap)} and its session RTT was {ms(rtt)}")
