"""Fixtures shared by the unit tests: the kernel backends, one battery against both."""

from __future__ import annotations

import pytest

from emulator.kernels import Backend, get_backend


@pytest.fixture(params=["numpy", "c"], scope="module")
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test that takes it runs once per backend (CONVENTIONS 6)."""
    return get_backend(request.param)


@pytest.fixture(scope="module")
def both() -> tuple[Backend, Backend]:
    """(numpy, c), for tests that compare the two backends directly."""
    return get_backend("numpy"), get_backend("c")
