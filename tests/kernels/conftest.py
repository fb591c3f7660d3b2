import pytest
import torch

from tests.kernels.common import kernel_backend


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_backend():
    """Forces the Triton kernels (the interpreter on CPU) for one test."""
    with kernel_backend("triton"):
        yield
