"""Suite-wide settings.

Hypothesis: no per-example deadline and no "input generation is slow" health check.
CI runs on 2 shared cores next to real processes; timing belongs to ``make bench``,
never to a unit test's verdict.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "handoffd", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("handoffd")
