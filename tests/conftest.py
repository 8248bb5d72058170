import os

from hypothesis import HealthCheck, settings

# Derandomised, bounded hypothesis runs in CI; a little more exploration locally.
settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
