"""``ops/memory.py`` in fresh interpreters (it changes process-wide state, so never in the test process)."""

import json
import sys

from twisted.trial.unittest import TestCase

from tests.integration import procs

FREEZE = """
import gc, json
from tigertunnel.ops.memory import freeze_startup_heap
frozen = freeze_startup_heap()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a          # a cycle made after the freeze
del a, b
print(json.dumps({"frozen": frozen, "count": gc.get_freeze_count(), "collected": gc.collect()}))
"""

MALLOC = """
import json
from tigertunnel.ops.memory import tune_malloc
print(json.dumps({"first": tune_malloc(), "again": tune_malloc()}))
"""


class MemoryTuningTests(TestCase):
    """Start-up heap freezing and malloc settings, each in its own interpreter."""

    timeout = 60

    async def run_python(self, code: str) -> dict:  # type: ignore[type-arg]
        result = await procs.run([sys.executable, "-c", code])
        self.assertEqual(result.status, 0, result.describe())
        parsed: dict = json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[type-arg]
        return parsed

    async def test_freeze_keeps_collecting_new_cycles(self) -> None:
        """Everything alive at the freeze leaves the collector's sight; a cycle made afterwards is still collected."""
        got = await self.run_python(FREEZE)
        self.assertGreater(got["frozen"], 1000)
        self.assertEqual(got["count"], got["frozen"])
        self.assertGreaterEqual(got["collected"], 2)

    async def test_malloc_settings_applied_once(self) -> None:
        """On glibc the settings apply, and a second call reports the first outcome."""
        got = await self.run_python(MALLOC)
        self.assertEqual(got["first"], got["again"])
        if sys.platform.startswith("linux"):
            self.assertTrue(got["first"])
