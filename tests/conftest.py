"""Fixtures shared by the test modules: one intra-op thread, the bundled digits."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """The CI box has 2 shared cores: one intra-op thread is faster (no OpenMP spin-waiting on tiny GEMMs) and
    deterministic. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    """sklearn's bundled 8×8 digits through models.data (float32 in [−1, 1], labels)."""
    from models.data import load_dataset

    return load_dataset("digits")
