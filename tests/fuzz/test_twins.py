"""The compiled data path and the pure-Python one agree on random inputs (differential fuzz).

A few cases of every target (``twins.py``) run in the normal suite, with
seed 0. ``tox -e fuzz`` runs many more under ASan and UBSan, bounded by a
case count and a wall time (see ``tests/fuzz/__init__.py``). The budget is
cut into two shards, one test method each, which ``trial -j2`` runs side by
side; each writes what it ran to ``TIGERTUNNEL_FUZZ_REPORT`` and
``sanitized.py`` prints their sum in one line::

   fuzz: 80000 cases in 138.2 s (cpu 272.0 s, 2 processes), seed 123, 0 differences (parser 16000, ...)
"""

import dataclasses
import json
import os
import random
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from twisted.trial.unittest import SynchronousTestCase

from tests.fuzz.twins import TARGETS, Observation
from tests.helpers import COMPILED_SKIP
from tigertunnel.wire.frames import FrameParser
from tigertunnel.wire.implementation import COMPILED, PURE

CASES_VARIABLE = "TIGERTUNNEL_FUZZ_CASES"
SECONDS_VARIABLE = "TIGERTUNNEL_FUZZ_SECONDS"
SEED_VARIABLE = "TIGERTUNNEL_FUZZ_SEED"
ONLY_VARIABLE = "TIGERTUNNEL_FUZZ_ONLY"

#: A directory where each shard writes what it ran (``shard-N.json``).
REPORT_VARIABLE = "TIGERTUNNEL_FUZZ_REPORT"
#: The budget is cut into this many test methods, so trial -j2 runs them side by side.
SHARDS = 2

#: Cases and seconds in the normal suite (no TIGERTUNNEL_FUZZ_CASES).
SUITE_CASES = 10 * len(TARGETS)
SUITE_SECONDS = 120.0

class Budget(NamedTuple):
    """How much to fuzz: at most ``cases`` cases and about ``seconds`` of wall time."""

    cases: int
    seconds: float
    seed: int
    only: Optional[Tuple[str, int]]
    long: bool

def _parsed(environ: "Dict[str, str]", name: str, kind: type, default: object) -> Any:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}") \
            from None


def budget_from(environ: "Dict[str, str]") -> Budget:
    """The budget the environment asks for; ``ValueError`` names a bad value."""
    long = bool(environ.get(CASES_VARIABLE, "").strip())
    cases = _parsed(environ, CASES_VARIABLE, int, SUITE_CASES)
    seconds = _parsed(environ, SECONDS_VARIABLE, float, SUITE_SECONDS)
    seed = _parsed(environ, SEED_VARIABLE, int, None)
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32) if long else 0
    if cases < 1 or seconds <= 0:
        raise ValueError(f"{CASES_VARIABLE}={cases} and {SECONDS_VARIABLE}={seconds} "
                         f"must be positive")
    only = None
    spec = environ.get(ONLY_VARIABLE, "").strip()
    if spec:
        target, _, number = spec.partition(":")
        if target not in TARGETS or not number.isdigit():
            raise ValueError(f"{ONLY_VARIABLE}={spec!r} is not TARGET:CASE "
                             f"(targets: {', '.join(TARGETS)})")
        only = (target, int(number))
    return Budget(cases, seconds, seed, only, long)


def first_difference(a: List[Observation], b: List[Observation]) -> Optional[int]:
    """The index of the first observation where ``a`` and ``b`` differ (``None``: equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))

def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 600 else text[:600] + f"... ({len(text)} characters)"

class Report(NamedTuple):
    """What one shard of the fuzz ran (written to ``TIGERTUNNEL_FUZZ_REPORT``)."""

    cases: int
    seconds: float
    cpu: float
    seed: int
    counts: Dict[str, int]

    def line(self) -> str:
        """The line the fuzz prints: cases, time, seed, cases per target."""
        detail = ", ".join(f"{name} {n}" for name, n in self.counts.items())
        return (f"{self.cases} cases in {self.seconds:.1f} s (cpu {self.cpu:.1f} s), "
                f"seed {self.seed}, 0 differences ({detail})")


class TwinsAgreeTests(SynchronousTestCase):
    """The compiled twins give the pure-Python ones' bytes, errors, counters and events."""

    skip = COMPILED_SKIP

    def play(self, seed: int, target: str, number: int) -> None:
        """Run case ``number`` of ``target`` on both twins; fail on any difference."""
        make, run = TARGETS[target]
        case = make(random.Random(f"{seed}/{target}/{number}"))
        assert COMPILED is not None
        pure, compiled = run(PURE, case), run(COMPILED, case)
        at = first_difference(pure, compiled)
        if at is not None:
            self.fail(
                f"{target} case {number} (seed {seed}) differs at observation {at}:\n"
                f"  pure:     {_short(pure[at] if at < len(pure) else '<none>')}\n"
                f"  compiled: {_short(compiled[at] if at < len(compiled) else '<none>')}\n"
                f"reproduce: {SEED_VARIABLE}={seed} {ONLY_VARIABLE}={target}:{number} "
                f"python -m twisted.trial tests.fuzz.test_twins")

    def fuzz(self, shard: int) -> None:
        """Run shard ``shard`` of the budget: cases ``shard``, ``shard + SHARDS``, ... of the round-robin."""
        budget = budget_from(dict(os.environ))
        if budget.only is not None:
            if shard == 0:
                self.play(budget.seed, *budget.only)
            return
        names = list(TARGETS)
        counts = {name: 0 for name in names}
        started, cpu = time.monotonic(), time.process_time()
        mine = range(shard, budget.cases, SHARDS)
        for index in mine:
            if time.monotonic() - started >= budget.seconds:
                break
            name = names[index % len(names)]
            self.play(budget.seed, name, index // len(names))
            counts[name] += 1
        ran = sum(counts.values())
        report = Report(ran, time.monotonic() - started, time.process_time() - cpu,
                        budget.seed, counts)
        if budget.long:
            print(f"\nfuzz shard {shard}/{SHARDS}: {report.line()}", flush=True)
        directory = os.environ.get(REPORT_VARIABLE, "")
        if directory:
            with open(os.path.join(directory, f"shard-{shard}.json"), "w") as f:
                json.dump(report._asdict(), f)
        # The time bound may cut the run short, but never to nothing.
        self.assertGreaterEqual(min(counts.values()), 1 if len(mine) >= len(names) else 0,
                                counts)

    def test_shard_0(self) -> None:
        """The cases of shard 0 give equal observations on both twins, within the budget."""
        self.fuzz(0)

    def test_shard_1(self) -> None:
        """The cases of shard 1 give equal observations on both twins, within the budget."""
        self.fuzz(1)


class BudgetTests(SynchronousTestCase):
    """The fuzz budget comes from the environment, with a message naming a bad value."""

    def test_suite_default(self) -> None:
        """Without TIGERTUNNEL_FUZZ_CASES the suite runs a few cases of each target with seed 0."""
        budget = budget_from({})
        self.assertEqual((budget.cases, budget.seed, budget.only, budget.long),
                         (SUITE_CASES, 0, None, False))

    def test_long_run(self) -> None:
        """TIGERTUNNEL_FUZZ_CASES, _SECONDS and _SEED set the run; ONLY picks one case."""
        budget = budget_from({CASES_VARIABLE: "5000", SECONDS_VARIABLE: "90",
                              SEED_VARIABLE: "77", ONLY_VARIABLE: "codec:12"})
        self.assertEqual(budget, Budget(5000, 90.0, 77, ("codec", 12), True))

    def test_fresh_seed(self) -> None:
        """A long run without a seed draws a fresh one."""
        seeds = {budget_from({CASES_VARIABLE: "10"}).seed for _ in range(4)}
        self.assertGreater(len(seeds), 1)

    def test_bad_values(self) -> None:
        """A bad count, time or case selector is refused with its name and value."""
        for environ, words in (({CASES_VARIABLE: "many"}, "TIGERTUNNEL_FUZZ_CASES='many'"),
                               ({CASES_VARIABLE: "1.5"}, "'1.5' is not an integer"),
                               ({SEED_VARIABLE: "x"}, "TIGERTUNNEL_FUZZ_SEED='x'"),
                               ({SECONDS_VARIABLE: "0"}, "must be positive"),
                               ({ONLY_VARIABLE: "nope:1"}, "'nope:1'")):
            with self.assertRaises(ValueError) as caught:
                budget_from(environ)
            self.assertIn(words, str(caught.exception))


class HarnessTests(SynchronousTestCase):
    """The fuzz can fail: a twin that differs anywhere is reported, with how to reproduce it."""

    def test_difference_is_caught(self) -> None:
        """A parser twin whose buffered count is one off fails the first parser case, naming seed and case."""

        class OffByOne(FrameParser):
            def buffered(self) -> int:
                return int(super().buffered()) + 1

        from tests.fuzz import test_twins
        self.patch(test_twins, "COMPILED", dataclasses.replace(PURE, FrameParser=OffByOne))
        with self.assertRaises(self.failureException) as caught:
            TwinsAgreeTests("test_shard_0").play(0, "parser", 0)
        self.assertIn(f"{SEED_VARIABLE}=0 {ONLY_VARIABLE}=parser:0", str(caught.exception))

    def test_same_twin_agrees(self) -> None:
        """Every target run twice on the pure twin gives equal observations (cases are deterministic)."""
        for target in TARGETS:
            make, run = TARGETS[target]
            first = run(PURE, make(random.Random(f"9/{target}/0")))
            again = run(PURE, make(random.Random(f"9/{target}/0")))
            self.assertEqual(first, again, target)
