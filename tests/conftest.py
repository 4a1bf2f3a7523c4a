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


@pytest.fixture
def crash_after(monkeypatch):
    """crash_after(step, main, argv): run a script's main(argv) and stop it with KeyboardInterrupt
    right after it has logged `step`, as a killed job would stop."""
    def run(step, main, argv):
        real_log_step = common.log_step

        def log_then_crash(metrics_file, row, *rest):
            real_log_step(metrics_file, row, *rest)
            if row["step"] == step:
                raise KeyboardInterrupt
        monkeypatch.setattr(common, "log_step", log_then_crash)
        with pytest.raises(KeyboardInterrupt):
            main(argv)
        monkeypatch.setattr(common, "log_step", real_log_step)
    return run
