"""Shared pytest set-up: kernel tests hold the machine lock while they run."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import machine_lock  # noqa: E402


@pytest.fixture(autouse=True)
def _kernel_lock(request):
    """A test marked `kernel` sees THP state no other test or benchmark is changing."""
    if request.node.get_closest_marker("kernel") is None:
        yield
        return
    with machine_lock():
        yield
