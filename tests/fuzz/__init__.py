"""The differential fuzz of the data path's two twins (compiled and pure Python).

``test_twins.py`` drives :mod:`tigertunnel.wire._hotpath` and the
pure-Python classes it replaces with the same random inputs and requires
the same bytes, errors, counters and events from both. Every case comes from
a seeded ``random.Random`` (``inputs.py``), so a failure names the seed, the
target and the case number that reproduce it. ``test_sanitizer.py`` shows
that the sanitizer build really runs instrumented code.

In the normal suite a few cases of each target run with seed 0. ``tox -e
fuzz`` (``sanitized.py``) builds the extension with ASan and UBSan in a copy
of the tree and runs this package under the ASan runtime, in two trial
workers, with:

``TIGERTUNNEL_FUZZ_CASES``
   how many cases to run in all (round-robin over the targets);
``TIGERTUNNEL_FUZZ_SECONDS``
   a wall-time bound: the fuzz stops there even if cases are left;
``TIGERTUNNEL_FUZZ_SEED``
   the seed (a fresh one, printed, when unset);
``TIGERTUNNEL_FUZZ_ONLY``
   ``target:case`` runs that one case (to reproduce a failure);
``TIGERTUNNEL_FUZZ_REPORT``
   a directory where each shard of the run writes what it ran (set by
   ``sanitized.py``, which prints the total).
"""
