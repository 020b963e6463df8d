import random

import numpy as np
import pytest
import torch

# Tests use tiny tensors: one thread avoids thread start-up costs and contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
