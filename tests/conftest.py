"""Every test starts on one torch thread and leaves torch as it found it.

One thread is what the recipes and the benchmark run on, and it makes each test's arithmetic independent of the
order tests run in: a command run in-process (``medm2g evaluate --threads 1``) or a test that sets its own count
can no longer change the numbers, or the speed, of the tests after it. Code paths that need more threads (the
oneDNN regression in test_prompt_encoders) set them in a subprocess.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(callers_threads)
