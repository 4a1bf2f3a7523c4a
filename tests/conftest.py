import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402


@pytest.fixture(scope="session")
def toy():
    """The built-in toy model and tokenizer, loaded once (tests copy it before changing it)."""
    return common.load_model("toy")


@pytest.fixture
def toy_model(toy):
    import copy
    model, tokenizer = toy
    torch.manual_seed(0)
    return copy.deepcopy(model), tokenizer
