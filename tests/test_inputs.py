"""The inputs shown and checked at a run's start (issue 31): the first example as the model sees it,
in inputs.txt and on the screen, --show-inputs, and the thinking check."""
import json

import pytest

import common
import engine
import grpo
import opsd
import sft

QUICK = ["--steps", "2", "--batch-size", "4", "--eval-n", "4", "--no-eval-before"]


def test_every_run_writes_its_inputs_and_show_inputs_trains_nothing(tmp_path, capsys):
    opsd.main(QUICK + ["--out", str(tmp_path / "opsd")])
    shown = (tmp_path / "opsd" / "inputs.txt").read_text()
    example = common.load_examples("toy", "train")[0]
    assert f"== student (--student-thinking off: the template has no such mode) prompt" in shown
    assert common.solution_prompt(example["question"], example["solution"]) in shown
    assert shown.count("⟦|⟧") == 5  # the first line; each prompt: its heading and its boundary
    assert "== checked: the completion's" in shown
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        grpo.main(QUICK + ["--show-inputs", "--out", str(tmp_path / "grpo")])
    assert exit_.value.code == 0 and "== policy prompt" in capsys.readouterr().out
    assert not (tmp_path / "grpo").exists()  # nothing written, nothing trained


def test_sft_shows_the_reference_it_trains_on(tmp_path):
    sft.main(QUICK + ["--steps", "1", "--out", str(tmp_path)])
    example = common.load_examples("toy", "train")[0]
    shown = (tmp_path / "inputs.txt").read_text()
    assert f"⟦|⟧{example['solution']}<|im_end|>" in shown and "(trained on)" in shown


def test_showing_the_inputs_leaves_the_random_streams_as_they_were(tmp_path, monkeypatch):
    opsd.main(QUICK + ["--out", str(tmp_path / "shown")])
    monkeypatch.setattr(common, "show_inputs", lambda run, first_inputs: None)
    opsd.main(QUICK + ["--out", str(tmp_path / "not_shown")])
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
            for name in ("shown", "not_shown")]
    assert [row["loss"] for row in rows[0]] == [row["loss"] for row in rows[1]]


def test_a_template_that_always_thinks_refuses_a_thinking_flag_that_is_off(tmp_path, monkeypatch):
    real_load_tokenizer = common.load_tokenizer

    def always_thinking(name):
        tokenizer = real_load_tokenizer(name)
        tokenizer.chat_template += "{% if add_generation_prompt %}<think>\n{% endif %}"
        return tokenizer
    monkeypatch.setattr(common, "load_tokenizer", always_thinking)
    with pytest.raises(common.InputError, match="--student-thinking off, but the model's chat "
                                                "template always opens a <think> block"):
        opsd.main(QUICK + ["--out", str(tmp_path / "off")])
    opsd.main(QUICK + ["--steps", "1", "--student-thinking", "--out", str(tmp_path / "on")])


def test_the_truncated_share_counts_the_completions_without_an_end_token(toy):
    model, tokenizer = toy
    rollouts = {"completions": [[5, 6], [5, 6, 7, 8], [5], [5, 6, 7]],
                "finished": [True, False, True, False]}  # constructed: two cut
    assert common.rollout_health(rollouts) == {"completion_length": 2.5, "truncated_fraction": 0.5}
    prompts = common.student_prompts(tokenizer, common.load_examples("toy", "test")[:8])
    short = engine.generate(model, tokenizer, prompts, 6)  # toy answers are longer than 6
    assert common.rollout_health(short)["truncated_fraction"] == 1.0
    whole = engine.generate(model, tokenizer, prompts, 64)
    assert common.rollout_health(whole)["truncated_fraction"] == 0.0  # all end in <|im_end|>


def test_the_warning_fires_when_no_group_has_a_reward_spread_and_not_on_the_toy(tmp_path, capsys):
    wrong = [{"question": example["question"], "answer": "1+1=2\n#### 999999"}  # never right
             for example in common.load_examples("toy", "train")[:64]]
    data = tmp_path / "wrong.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in wrong))
    grpo.main(["--data", str(data), "--eval-data", "toy", "--steps", "4", "--batch-size", "4",
               "--eval-n", "4", "--no-eval-before", "--out", str(tmp_path / "wrong")])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: nothing trains for 3 steps in a row: every group's rewards are "
                        "equal (all right or all wrong), so every advantage is 0: give problems "
                        "this model solves sometimes, or raise --num-generations or --temperature, "
                        "or add --format-reward"]  # once, at step 3, not again at step 4
    grpo.main(["--steps", "3", "--batch-size", "8", "--eval-n", "4", "--no-eval-before",
               "--out", str(tmp_path / "toy")])
    assert "\nwarning" not in capsys.readouterr().out
