import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import sft

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl"
QUICK = ["--batch-size", "8", "--eval-n", "8", "--eval-batch-size", "8", "--max-new-tokens", "40"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_ignores_prompt_positions_and_counts_completion_ones():
    torch.manual_seed(0)
    logprobs = -torch.rand(3, 10)
    completion_mask = torch.zeros(3, 10, dtype=torch.long)
    completion_mask[:, 6:] = 1
    loss = sft.sft_loss(logprobs, completion_mask, num_target_tokens=12)
    changed_prompt = logprobs.clone()
    changed_prompt[:, :6] = -torch.rand(3, 6) * 50  # other targets at prompt positions
    assert torch.equal(sft.sft_loss(changed_prompt, completion_mask, 12), loss)
    changed_completion = logprobs.clone()
    changed_completion[0, 7] -= 1.0
    assert torch.isclose(sft.sft_loss(changed_completion, completion_mask, 12), loss + 1 / 12)
    assert torch.isclose(loss, -logprobs[:, 6:].sum() / 12)


def test_encode_appends_eos_and_hides_the_solution(toy):
    _, tokenizer = toy
    example = common.load_examples("toy", "test")[0]
    prompt_ids, completion_ids = sft.encode(tokenizer, example, open_book=False, max_new_tokens=64)
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion_ids[:-1]) == example["solution"]
    assert example["solution"] not in tokenizer.decode(prompt_ids)
    open_prompt, open_completion = sft.encode(tokenizer, example, open_book=True, max_new_tokens=64)
    assert example["solution"] in tokenizer.decode(open_prompt) and open_completion == completion_ids
    _, cut = sft.encode(tokenizer, example, open_book=False, max_new_tokens=5)
    assert len(cut) == 5


def test_accumulation_normalises_by_the_tokens_of_the_whole_step(tmp_path):
    """Micro-batches of 2 must give the loss and gradient norm of one batch of 8."""
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    sft.main(QUICK + ["--steps", "1", "--out", str(whole)])
    sft.main(QUICK + ["--steps", "1", "--out", str(micro), "--micro-batch-size", "2"])
    a, b = metrics(whole)[0], metrics(micro)[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_short_run_lowers_loss_and_writes_outputs(tmp_path):
    """On real GSM8K records, new to the toy model, a few steps must lower the loss clearly."""
    out = tmp_path / "run"
    sft.main(QUICK + ["--steps", "24", "--lr", "2e-3", "--out", str(out), "--data", str(FIXTURE)])
    losses = [row["loss"] for row in metrics(out)]
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    row = metrics(out)[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_second"} <= set(row)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("before", "after"):
        assert set(summary[key]) == {"accuracy", "n"} and summary[key]["n"] == 3  # 10% of 38
    assert summary["steps"] == 24 and summary["train_tokens"] > 0 and summary["generated_tokens"] == 0
    assert summary["wall_seconds"] > 0
    checkpoint = common.latest_checkpoint(out)
    assert checkpoint.name == "checkpoint-000024"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert json.loads((checkpoint / "state.json").read_text())["data_position"] == 24 * 8


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, crash_after):
    # dropout and open-book prompts both draw random numbers, so RNG state must be restored too
    args = QUICK + ["--steps", "6", "--save-every", "2", "--lora-dropout", "0.1",
                    "--open-book-fraction", "0.3", "--lr", "1e-3"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    sft.main(args + ["--out", str(straight)])

    crash_after(5, sft.main, args + ["--out", str(broken)])
    assert common.latest_checkpoint(broken).name == "checkpoint-000004"
    assert len(metrics(broken)) == 5

    sft.main(args + ["--out", str(broken), "--resume"])
    assert [r["step"] for r in metrics(broken)] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics(straight), metrics(broken)):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    adapter_a = load_file(common.latest_checkpoint(straight) / "adapter_model.safetensors")
    adapter_b = load_file(common.latest_checkpoint(broken) / "adapter_model.safetensors")
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    summary_a = json.loads((straight / "summary.json").read_text())
    summary_b = json.loads((broken / "summary.json").read_text())
    assert summary_a["before"] == summary_b["before"] and summary_a["after"] == summary_b["after"]


def test_full_fine_tuning_saves_a_loadable_model(tmp_path):
    out = tmp_path / "full"
    sft.main(QUICK + ["--steps", "2", "--full", "--out", str(out)])
    checkpoint = common.latest_checkpoint(out)
    model, _ = common.load_model(str(checkpoint))
    base, _ = common.load_model("toy")
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters())]
    assert any(changed)
