"""What several test files share."""
import pytest
import torch

import model
import selfe


@pytest.fixture(scope="session")
def untrained_tiny():
    """The tiny preset's system with its EMA, seeded, built but never trained: enough to save, load and
    sample a checkpoint without training on a shared CPU."""
    torch.manual_seed(0)
    system = selfe.SelfE(model.CONFIGS["tiny"])
    system.make_ema()
    return system
