import os
import random

import numpy as np
import pytest
import torch

# The kernels' tests run where they can: compiled on a CUDA device, else on the CPU in Triton's
# interpreter. TRITON_INTERPRET is read when triton is first imported, and other libraries
# (bitsandbytes, torch.compile) may import it long before tests/kernels is collected, so it is set
# here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests use tiny tensors: one thread avoids thread start-up costs and contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
