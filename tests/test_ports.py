"""Free ports come from outside the kernel's ephemeral range and can be bound."""

import os
import random
import socket

from twisted.trial.unittest import TestCase

from tigertunnel.tools import ports


class PortTests(TestCase):
    """``tools/ports.py``: the ports the demo, the benchmark and the tests listen on."""

    def test_candidates_avoid_the_ephemeral_range(self) -> None:
        """The candidates lie below the ephemeral range, or above it when it starts too low."""
        self.assertEqual(ports.candidate_range((32768, 60999)), (ports.LOWEST, 32768))
        self.assertEqual(ports.candidate_range((10500, 60000)), (60001, 65536))

    def test_unreadable_range_falls_back_to_linux_default(self) -> None:
        """A missing or garbled range file gives Linux's default range."""
        missing = self.mktemp()
        self.assertEqual(ports.ephemeral_range(missing), (32768, 60999))
        garbled = self.mktemp()
        with open(garbled, "w") as f:
            f.write("not numbers\n")
        self.assertEqual(ports.ephemeral_range(garbled), (32768, 60999))
        good = self.mktemp()
        with open(good, "w") as f:
            f.write("20000\t40000\n")
        self.assertEqual(ports.ephemeral_range(good), (20000, 40000))

    def test_free_ports_are_distinct_bindable_and_not_ephemeral(self) -> None:
        """Eight ports: all different, all outside the ephemeral range, each bindable now."""
        got = ports.free_ports(8)
        self.assertEqual(len(set(got)), 8)
        low, high = ports.ephemeral_range()
        for port in got:
            self.assertFalse(low <= port <= high, f"{port} is in {low}-{high}")
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))

    def test_taken_port_is_skipped(self) -> None:
        """A port someone holds is never returned, even when it is drawn first."""
        taken = ports.free_port()
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", taken))
            holder.listen(1)

            class Drawn(random.Random):
                def __init__(self) -> None:
                    super().__init__(int.from_bytes(os.urandom(4), "big"))
                    self.first = True

                def randrange(self, *args: int) -> int:  # type: ignore[override]
                    if self.first:
                        self.first = False
                        return taken
                    return super().randrange(*args)

            got = ports.free_ports(1, rng=Drawn())
            self.assertNotEqual(got, [taken])
