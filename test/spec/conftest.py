"""Fixtures shared by the speculative-decoding tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """The op tests' tensors are tiny: on a shared 2-core box intra-op threads only add contention
    (the 20,000-trial sampling test runs 20x slower with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
