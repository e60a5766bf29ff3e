"""Tests for :mod:`tigertunnel.tools.tbcost` (the per-frame cost measurement)."""

import io
import sys

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.tools.tbcost import main, measure
from tigertunnel.tools.traces import SINGLE


class CostTests(SynchronousTestCase):
    """The measurement runs the real accounting over a trace and reports per frame."""

    def test_single_trace_frames_and_costs_reported(self) -> None:
        """One pass over the single trace reports its 16 frames and positive costs."""
        got = measure(SINGLE, number=1, repeat=1)
        self.assertEqual(got["frames"], 16)
        self.assertGreater(got["watch"], 0)
        self.assertGreater(got["loop"], 0)

    def test_main_prints_each_trace(self) -> None:
        """The command prints one line per shipped trace."""
        out = io.StringIO()
        saved, sys.stdout = sys.stdout, out
        try:
            self.assertEqual(main(["-n", "1", "-r", "1"]), 0)
        finally:
            sys.stdout = saved
        lines = out.getvalue().splitlines()
        self.assertEqual([line.split(":")[0] for line in lines],
                         ["tb-0.17.8-single", "tb-0.17.8-cluster3"])
        self.assertTrue(all("ns/frame" in line for line in lines))
