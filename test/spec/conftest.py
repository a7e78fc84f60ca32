"""Fixtures shared by the speculative-decoding tests."""

import time

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


@pytest.fixture(scope="session")
def wait_for():
    """``wait_for(predicate, timeout_s, what)``: polls until ``predicate()`` is truthy and returns that
    value; fails the test naming ``what`` after ``timeout_s``."""

    def wait(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll_s)
        pytest.fail(f"timed out after {timeout_s}s waiting for {what}")

    return wait
