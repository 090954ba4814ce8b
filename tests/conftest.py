"""Shared pytest configuration: a deterministic hypothesis profile for CI."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "qnetem",
    derandomize=True,  # same examples on every run: CI failures reproduce locally
    deadline=None,  # no wall-clock deadlines in tests (speed lives in bench/)
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("qnetem")
