"""The tigertunnel test suite (run with ``python -m twisted.trial tests``).

Hypothesis profiles: ``ci`` (the default: derandomized, no deadline, modest
example counts) and ``long`` (many more examples, for local runs). Choose with
the ``TIGERTUNNEL_HYPOTHESIS`` environment variable.

``differing_executors`` is off: the data-path tests run each property on
both implementations (``tests.helpers.on_both``), so one test function has
two test-case classes on purpose, and an example found on one must hold on
the other.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile(
    "long", deadline=None, max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile(os.environ.get("TIGERTUNNEL_HYPOTHESIS", "ci"))
