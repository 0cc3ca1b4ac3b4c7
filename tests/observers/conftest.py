"""Observer tests run single-threaded: their tensors are small, and on a shared 2-core machine whose
other core is busy every multi-threaded op waits ~10 ms on its thread barrier (30 s vs 3 s in all)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
