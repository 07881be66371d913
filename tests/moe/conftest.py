"""Shared fixtures of the MoE tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test process: the results must not depend on it, and the 2-core CI machine
    runs gloo ranks beside the test process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
