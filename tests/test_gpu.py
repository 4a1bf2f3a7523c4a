"""The CUDA paths, on a GPU only (skipped elsewhere): bfloat16 LoRA and full fine-tuning with float32
master weights, SDPA or Flash Attention 2, gradient checkpointing, and an exact resume.

The model is a randomly initialised Qwen3 of Qwen3-1.7B's shape (28 layers, hidden 2048) with the
toy's tokenizer and vocabulary, so nothing is downloaded. Its completions run to --max-new-tokens.

    python -m pytest -q -s tests/test_gpu.py     # prints peak GPU memory and tokens per second
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import common
import grpo
import opsd
import sft

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.gpu]
RUN = ["--data", "toy", "--steps", "2", "--batch-size", "8", "--max-new-tokens", "128",
       "--eval-n", "16", "--eval-batch-size", "16", "--gradient-checkpointing"]


@pytest.fixture(scope="module")
def qwen3_shaped(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    folder = tmp_path_factory.mktemp("qwen3-1.7b-shape")
    _, tokenizer = common.load_model("toy", device="cpu")
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def report(name, out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{name}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
          f"tokens/s {[row['tokens_per_second'] for row in rows]}, "
          f"losses {[round(row['loss'], 4) for row in rows]}")
    torch.cuda.reset_peak_memory_stats()
    return rows


def test_each_script_on_a_qwen3_1_7b_shaped_model(qwen3_shaped, tmp_path):
    model = ["--model", qwen3_shaped]
    sft.main(model + RUN + ["--full", "--lr", "5e-6", "--out", str(tmp_path / "sft")])
    rows = report("sft --full (bf16 compute, fp32 weights)", tmp_path / "sft")
    assert all(row["grad_norm"] > 0 for row in rows)
    saved, _ = common.load_model(str(common.latest_checkpoint(tmp_path / "sft")), full=True)
    base, _ = common.load_model(qwen3_shaped, full=True)
    moved = sum(int((a != b).sum()) for a, b in zip(saved.parameters(), base.parameters()))
    assert moved / sum(p.numel() for p in base.parameters()) > 0.9  # bf16 weights: under 10%
    del saved, base
    grpo.main(model + RUN + ["--num-generations", "4", "--out", str(tmp_path / "grpo")])
    report("grpo (LoRA, bf16 base)", tmp_path / "grpo")
    opsd.main(model + RUN + ["--out", str(tmp_path / "opsd")])
    report("opsd (LoRA, bf16 base)", tmp_path / "opsd")


def test_resume_on_cuda(qwen3_shaped, tmp_path, monkeypatch):
    """The optimizer state loads onto the CPU first and each rank restores its own GPU's random
    state: resumed from the checkpoint of step 1 of a run, step 2 samples the same rollouts and
    gives the same loss as that run. (A second run from scratch would not do for the comparison:
    GPU backward kernels add in a varying order, so its step-1 weights differ in the last bits.)"""
    real_save = common.save_checkpoint

    def save_and_copy(run):  # a copy of checkpoint 1 (the run deletes it later)
        folder = real_save(run)
        if run.step == 1:
            shutil.copytree(folder, tmp_path / "resumed" / folder.name)
        return folder
    monkeypatch.setattr(common, "save_checkpoint", save_and_copy)
    argv = ["--model", qwen3_shaped] + RUN + ["--save-every", "1"]
    opsd.main(argv + ["--out", str(tmp_path / "straight")])
    opsd.main(argv + ["--out", str(tmp_path / "resumed"), "--resume"])
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    print(f"\nstep 2 straight {straight[1]}\nstep 2 resumed  {resumed[0]}")
    assert resumed[0]["generated_tokens"] == straight[1]["generated_tokens"]
    assert resumed[0]["loss"] == pytest.approx(straight[1]["loss"], rel=1e-5)
