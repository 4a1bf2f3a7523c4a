import argparse
import json

import pytest
import torch

import common
import engine
import sft


def test_toy_settings_apply_only_to_flags_not_given():
    args = sft.parse_args(["--lr", "0.1", "--steps=7"])
    assert args.lr == 0.1 and args.steps == 7
    assert args.lora_r == sft.TOY_SETTINGS["lora_r"] and args.batch_size == sft.TOY_SETTINGS["batch_size"]
    real = sft.parse_args(["--model", "Qwen/Qwen3-1.7B"])
    assert real.lr == 5e-6 and real.lora_r == 64 and real.lora_alpha == 128


def test_optimizer_skips_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = common.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [(4, 4)]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3


def test_schedule_warms_up_then_decays_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = common.make_scheduler(optimizer, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01
    assert lrs[12] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(8 / 16 * torch.pi)).item()))
    constant = common.make_scheduler(optimizer, 0, 20, "constant")
    assert constant.get_last_lr()[0] == 1.0


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, toy_model, monkeypatch):
    from lora import apply_lora
    model, tokenizer = toy_model
    apply_lora(model, 4, 8)
    optimizer = common.make_optimizer(model, 1e-3, 0.0)
    scheduler = common.make_scheduler(optimizer, 0, 10)
    args = argparse.Namespace(full=False, model="toy", keep_checkpoints=1, out=str(tmp_path))
    run = common.Run(args, model, tokenizer, [], [], optimizer, scheduler, step=2,
                     state={"data_position": 4})
    common.save_checkpoint(run)

    def disk_full(*_, **__):
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        run.step, run.state = 4, {}
        common.save_checkpoint(run)
    latest = common.latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-000002"  # the half-written step 4 is not taken for a checkpoint
    assert json.loads((latest / "state.json").read_text()) == {"step": 2, "data_position": 4}
    assert (latest / "trainer_state.pt").exists()


def test_resume_drops_metrics_rows_past_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                                    for s in range(1, 6)))
    with common.open_metrics(tmp_path, resumed_step=3) as handle:
        handle.write(json.dumps({"step": 4, "loss": 2.0}) + "\n")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 2.0


def test_eval_split_is_held_out(tmp_path):
    """--eval-data toy evaluates on the toy test split; a separate file is held out whole."""
    import json as json_module
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json_module.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n"
                                 for i in range(7)))
    toy_test = {e["question"] for e in common.load_examples("toy", "test")}
    for number, (eval_data, expected) in enumerate([(None, toy_test), ("toy", toy_test),
                                                    (str(eval_file), {f"q{i}" for i in range(7)})]):
        args = sft.parse_args(["--steps", "1", "--eval-n", "1000", "--out", str(tmp_path / str(number))]
                              + (["--eval-data", eval_data] if eval_data else []))
        run = common.start_run(args)
        run.metrics_file.close()
        assert {e["question"] for e in run.eval_examples} == expected


def test_full_fine_tuning_in_bfloat16_loses_no_update():
    """--full --dtype bfloat16 computes in bfloat16 but AdamW updates float32 weights: at lr 5e-6
    every weight moves. (Updating bfloat16 weights moves about 8% of them: the rest round away.)"""
    model, tokenizer = common.load_model("toy", dtype="bfloat16", full=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = common.make_optimizer(model, lr=5e-6, weight_decay=0.0)
    input_ids = tokenizer(["Tom has 3 pens. Tom buys 4 more.\n3+4=7"],
                          return_tensors="pt")["input_ids"].to(model.device)
    for _ in range(3):
        logits = model(input_ids=input_ids).logits
        assert logits.dtype == torch.bfloat16  # the matrix products ran in bfloat16
        # so does the output layer as the scripts call it (engine.output_logits)
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
        assert torch.equal(engine.output_logits(model, hidden), logits)
        torch.nn.functional.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before))
    assert moved / sum(b.numel() for b in before) > 0.99
    # LoRA: the frozen base is stored in bfloat16, the adapters in float32 (lora.py).
    model, _ = common.load_model("toy", dtype="bfloat16")
    from lora import apply_lora
    apply_lora(model, r=4, alpha=8)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_flash_attention_is_used_from_version_2_1_on(monkeypatch):
    """The training pass needs a causal mask aligned at the bottom right (a shorter query than its
    keys), which flash-attn has since 2.1: an older one is left out, with a note."""
    import importlib.metadata

    def installed(version):
        def lookup(name):
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return lookup
    for version, usable in [(None, False), ("2.0.9", False), ("1.0.4", False), ("2.1.0", True),
                            ("2.8.3.post1", True)]:
        monkeypatch.setattr(importlib.metadata, "version", installed(version))
        assert common.flash_attention_usable() is usable


def test_tests_run_on_the_cpu_on_a_machine_with_a_gpu(monkeypatch):
    """The README's test command on a GPU machine: the scripts' models go where
    common.default_device() says, which tests/conftest.py keeps on the CPU for every test but the
    GPU ones (their batches and expected numbers are the CPU's)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.default_device() == torch.device("cpu")
    assert common.load_model("toy")[0].device == torch.device("cpu")
