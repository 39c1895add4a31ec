"""Shared pytest set-up: kernel tests hold the machine lock; fixtures more than one file uses."""

import pytest

from .helpers import machine_lock, saved_thp


@pytest.fixture(autouse=True)
def _kernel_lock(request):
    """A test marked `kernel` sees THP state no other test or benchmark is changing."""
    if request.node.get_closest_marker("kernel") is None:
        yield
        return
    with machine_lock():
        yield


@pytest.fixture
def thp_never():
    """Kernel THP at never for the test: the kernel's khugepaged stays out."""
    with saved_thp(enabled="never"):
        yield
