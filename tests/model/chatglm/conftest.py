"""The reference values here were computed by THUDM's code with one CPU thread; the
comparisons run the same way, so that float sums add up in the same order."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
