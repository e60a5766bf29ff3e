"""The tigertunnel test suite (run with ``python -m twisted.trial tests``).

Hypothesis profiles: ``ci`` (the default: derandomized, no deadline, modest
example counts) and ``long`` (many more examples, for local runs). Choose with
the ``TIGERTUNNEL_HYPOTHESIS`` environment variable.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", deadline=None, max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("TIGERTUNNEL_HYPOTHESIS", "ci"))
