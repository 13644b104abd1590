"""Suite-wide fixtures."""

import pytest
import torch

INITIAL_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Code under test may call ``torch.set_num_threads`` (the CLI's ``--threads``, the measure scripts), also from
    module-scoped fixtures; after every test the process gets the thread count it started with back, so that a later
    test, e.g. one comparing this process's output bit for bit with a fresh interpreter's, does not depend on which
    tests ran before it."""
    yield
    torch.set_num_threads(INITIAL_THREADS)
