"""Shared pytest fixtures."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one intra-op thread: on tiny tensors extra threads only add synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """With QFX_REQUIRE_CUDA=1 (the GPU check, benchmarks/gpu_check.sh) a test that would skip for
    want of CUDA fails instead, so a GPU run cannot pass by skipping its CUDA tests."""
    if os.environ.get("QFX_REQUIRE_CUDA") != "1" or torch.cuda.is_available():
        return
    for mark in item.iter_markers("skipif"):
        if "CUDA" in str(mark.kwargs.get("reason", "")):
            pytest.fail("QFX_REQUIRE_CUDA=1 but torch.cuda.is_available() is False", pytrace=False)
