import pytest
import torch


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """Tiny models run several times faster on one thread than on two (thread hand-off costs more than the math);
    restore the previous setting so other test folders are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
