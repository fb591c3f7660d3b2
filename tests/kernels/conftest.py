import pytest
import torch

from tests.kernels.common import DEVICE, kernel_backend


@pytest.fixture(autouse=True)
def _device_and_seed():
    """Kernel tests make their tensors on CUDA when there is one (compiled Triton), else on the
    CPU (the interpreter); and every test starts from the same seed."""
    torch.manual_seed(0)
    before = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(before)


@pytest.fixture
def triton_backend():
    """Forces the Triton kernels (the interpreter on CPU) for one test."""
    with kernel_backend("triton"):
        yield
