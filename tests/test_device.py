"""Every tensor the project's code makes names its device: the check for a CPU tensor meeting a GPU
one, which a CPU-only machine never sees (`torch.ones(n)` is made on the CPU, and multiplied by a
CUDA tensor it stops the run: opsd.py did so at step 1 on a GPU).

While the scripts train a step or two on the toy, a TorchFunctionMode watches every call of a
tensor factory (torch.ones, zeros, full, empty, tensor, arange, rand, ...). A call made from one of
the project's own files (sft.py, grpo.py, opsd.py, common.py, engine.py, lora.py) must pass
`device=`: the model's device, or the CPU on purpose (data built from Python lists, moved once).

What it catches: any tensor those files make without naming a device, on every path these runs
take (the three scripts' training steps, their variants below, rollouts and evaluation). What it
cannot: a tensor made by a library (transformers, torch) on the wrong device; one made on the CPU
on purpose and then mixed with a GPU tensor by mistake; paths these runs do not take.
"""
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import grpo
import opsd
import sft

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = {str(REPO / f"{name}.py") for name in ("sft", "grpo", "opsd", "common", "engine", "lora")}
FACTORIES = {torch.ones, torch.zeros, torch.full, torch.empty, torch.tensor, torch.as_tensor,
             torch.arange, torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace,
             torch.eye}
QUICK = ["--steps", "2", "--batch-size", "4", "--max-new-tokens", "16", "--eval-n", "4",
         "--eval-batch-size", "8", "--overwrite"]
RUNS = {
    "sft": (sft.main, []),
    "orpo": (sft.main, ["--rejection-sampling", "4", "--orpo-lambda"]),
    "grpo": (grpo.main, ["--num-generations", "4", "--beta", "0.04", "--num-iterations", "2"]),
    "grpo-sft-mix": (grpo.main, ["--num-generations", "2", "--sft-mix", "adaptive",
                                 "--garl-q", "0.5"]),
    "opsd": (opsd.main, ["--eval-k", "2"]),
    "opsd-paced-sampled": (opsd.main, ["--num-generations", "2", "--paced", "--loss", "sampled"]),
    "opsd-ema-bridge": (opsd.main, ["--teacher", "ema", "--teacher-rollout-steps", "1"]),
}


class DevicelessFactories(TorchFunctionMode):
    """Records 'file:line factory' for each tensor factory called from the project's files without
    a device."""

    def __init__(self):
        super().__init__()
        self.calls = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)  # the caller of the factory (torch's own calls are torch's)
            if frame.f_code.co_filename in PROJECT_FILES:
                self.calls.add(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} "
                               f"torch.{func.__name__}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", list(RUNS))
def test_every_tensor_the_scripts_make_names_its_device(name, tmp_path):
    main, argv = RUNS[name]
    with DevicelessFactories() as watch:
        main(QUICK + argv + ["--out", str(tmp_path)])
    assert not watch.calls, f"tensors made without a device: {sorted(watch.calls)}"


def test_the_watch_sees_a_tensor_made_without_a_device():
    """The check can fail: a factory call from a project file without device= is recorded."""
    import engine
    with DevicelessFactories() as watch:
        engine.pack([[1, 2]], [[3]], pad_id=0, device="cpu")  # builds its rows on the CPU
        code = compile("torch.ones(3)", str(REPO / "opsd.py"), "eval")  # as if opsd.py made it
        eval(code, {"torch": torch})
    assert any(call.startswith("opsd.py:1 torch.ones") for call in watch.calls)
