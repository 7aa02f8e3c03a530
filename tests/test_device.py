from __future__ import annotations

import pytest
import torch

from tasks.errors import RuntimeUnavailable
from tasks.training.device import describe, select_device


def test_cpu_is_always_available_and_described_with_its_threads() -> None:
    device = select_device("cpu")
    assert device.type == "cpu"
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert describe(device) == "cpu (3 threads)"
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_an_error_and_auto_falls_back_to_cpu() -> None:
    with pytest.raises(RuntimeUnavailable, match=r"train\.device is cuda"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"

