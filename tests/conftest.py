import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on the GPU (tests/test_gpu.py); the others on the CPU")


@pytest.fixture(autouse=True)
def on_the_cpu(request, monkeypatch):
    """Every test but those marked gpu runs on the CPU, on a machine with a GPU too: the scripts'
    models go where common.default_device() says, and these tests' batches, expected numbers and
    exact comparisons are the CPU's."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(common, "default_device", lambda: torch.device("cpu"))


@pytest.fixture(scope="session")
def toy():
    """The built-in toy model and tokenizer on the CPU, loaded once (tests copy it before changing
    it)."""
    return common.load_model("toy", device="cpu")


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
