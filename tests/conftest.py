import os

import pytest
from hypothesis import HealthCheck, settings

# Derandomised, bounded hypothesis runs in CI; a little more exploration locally.
settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def fake_cupy():
    """The numpy-backed CuPy stand-in (tests/_cupy_standin.py) as ``cupy`` / ``cupyx`` for one
    test: skmixed then takes its GPU code paths on the CPU. The backend's cached CuPy lookup
    is cleared before and after, so other tests see the machine as it is."""
    from _cupy_standin import install

    from skmixed import _backend

    _backend._cupy.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        yield install(mp)
    _backend._cupy.cache_clear()
