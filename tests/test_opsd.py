import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import common
import engine
import opsd
from lora import load_lora, lora_disabled, lora_layers


def slow_divergence(student_logits, teacher_logits, mask, beta, temperature, clip):
    """The formula, one position and one vocabulary entry at a time, in float64."""
    N, T, V = student_logits.shape
    total, count = 0.0, 0
    for i in range(N):
        for t in range(T):
            if not mask[i, t]:
                continue
            p_student = torch.softmax(student_logits[i, t].double() / temperature, -1)
            p_teacher = torch.softmax(teacher_logits[i, t].double() / temperature, -1)
            position = 0.0
            for v in range(V):
                s, q = p_student[v].item(), p_teacher[v].item()
                if beta == 0:
                    entry = q * math.log(q / s)
                elif beta == 1:
                    entry = s * math.log(s / q)
                else:
                    m = beta * q + (1 - beta) * s
                    entry = beta * q * math.log(q / m) + (1 - beta) * s * math.log(s / m)
                position += min(entry, clip) if clip > 0 else entry
            total += position
            count += 1
    return total / count


class LogitsModel:
    """A stand-in model whose output layer is the identity: its "hidden states" are logits."""
    config = SimpleNamespace(get_text_config=SimpleNamespace)  # no logit scaling or soft cap

    @staticmethod
    def get_output_embeddings():
        return torch.nn.Identity()


def logit_divergence(student_logits, teacher_logits, mask, *args, **kwargs):
    """opsd.divergence's loss given logits rather than hidden states: identity output layers; the
    step is this one batch (its normaliser: the sum of the weights)."""
    return opsd.divergence(LogitsModel, student_logits, opsd.Teacher(LogitsModel), teacher_logits,
                           mask, mask.sum(), *args, **kwargs)[0]


def random_logits(N=3, T=5, V=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(N, T, V, generator=generator) * 2
    teacher = torch.randn(N, T, V, generator=generator) * 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    return student, teacher, mask


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_divergence_matches_the_formula(beta, temperature, clip):
    student, teacher, mask = random_logits()
    got = logit_divergence(student, teacher, mask, beta, temperature, clip)
    expected = slow_divergence(student, teacher, mask, beta, temperature, clip)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if clip:  # the cap really acts in this case
        assert got.item() < logit_divergence(student, teacher, mask, beta, temperature, 0.0).item()


def test_forward_and_reverse_are_not_swapped():
    # teacher sure of token 0; student spread evenly over 4 tokens
    teacher = torch.tensor([[[10.0, 0.0, 0.0, 0.0]]])
    student = torch.zeros(1, 1, 4)
    mask = torch.ones(1, 1)
    p_teacher = torch.softmax(teacher[0, 0], -1)
    forward = (p_teacher * (p_teacher.log() - math.log(0.25))).sum()  # KL(P_T || P_S)
    reverse = (0.25 * (math.log(0.25) - p_teacher.log())).sum()      # KL(P_S || P_T)
    assert logit_divergence(student, teacher, mask, beta=0.0).item() == pytest.approx(forward.item(), rel=1e-5)
    assert logit_divergence(student, teacher, mask, beta=1.0).item() == pytest.approx(reverse.item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_chunked_equals_unchunked(beta, clip):
    student, teacher, mask = random_logits(T=5)
    grads = []
    values = []
    for chunk_size in [1000, 2]:  # one chunk; chunks of 2 positions
        leaf = student.clone().requires_grad_()
        loss = logit_divergence(leaf, teacher, mask, beta, 0.9, clip, chunk_size=chunk_size)
        loss.backward()
        values.append(loss.item())
        grads.append(leaf.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_divergence_of_a_distribution_with_itself_is_zero(beta):
    student, _, mask = random_logits()
    leaf = student.clone().requires_grad_()
    loss = logit_divergence(leaf, student.clone(), mask, beta, 1.3)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert leaf.grad.abs().max() < 1e-6


def test_padding_contributes_nothing_and_the_teacher_gets_no_gradient():
    student, teacher, mask = random_logits()
    student = student.requires_grad_()
    teacher = teacher.requires_grad_()
    loss = logit_divergence(student, teacher, mask)
    loss.backward()
    assert teacher.grad is None
    assert student.grad[mask == 0].abs().max() == 0 and student.grad[mask == 1].abs().max() > 0
    changed = student.detach().clone()
    changed[mask == 0] = 100.0
    assert logit_divergence(changed, teacher, mask).item() == pytest.approx(loss.item())


def test_sampled_token_loss_matches_the_formula():
    torch.manual_seed(0)
    student_logprobs = (-torch.rand(2, 4) * 3).requires_grad_()
    teacher_logprobs = -torch.rand(2, 4) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = opsd.sampled_token_loss(student_logprobs[mask.bool()], teacher_logprobs[mask.bool()],
                                   torch.ones(5), 5)
    loss.backward()
    advantages = teacher_logprobs - student_logprobs.detach()
    assert loss.item() == pytest.approx((-(advantages * student_logprobs.detach())[mask.bool()]).mean().item())
    # the advantage is a constant: the gradient is -A_t / |o| on completion tokens, 0 elsewhere
    assert torch.allclose(student_logprobs.grad, -advantages * mask / mask.sum())


def test_paced_weights_by_hand():
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0])  # pass rates 1/4, 1, 1/2
    weights = opsd.paced_weights(correct, group_size=4)
    expected = [0.25 * 0.75] * 4 + [0.0] * 4 + [0.25] * 4  # p (1 - p)
    assert torch.allclose(weights, torch.tensor(expected))
    skewed = opsd.paced_weights(correct, group_size=4, alpha=2.0, beta=0.5)
    assert skewed[0].item() == pytest.approx(0.25 ** 2 * 0.75 ** 0.5)


def test_weighted_divergence_is_the_weighted_mean_of_the_rows():
    student, teacher, mask = random_logits()
    row_weights = torch.tensor([0.5, 0.0, 2.0])
    got = logit_divergence(student, teacher, row_weights[:, None] * mask, 0.0, 1.0, 0.0)
    rows = [(slow_divergence(student[i:i + 1], teacher[i:i + 1], mask[i:i + 1], 0.0, 1.0, 0.0),
             int(mask[i].sum())) for i in (0, 2)]  # the per-token mean of each row
    expected = (0.5 * rows[0][0] * rows[0][1] + 2.0 * rows[1][0] * rows[1][1]) / (
        0.5 * rows[0][1] + 2.0 * rows[1][1])
    assert got.item() == pytest.approx(expected, rel=1e-5)


def other_teacher(folder, vocabulary_changed=False):
    """A teacher folder: the toy model with other weights (and, if asked, another tokenizer)."""
    model, tokenizer = common.load_model("toy")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    if vocabulary_changed:
        tokenizer.add_tokens(["<extra>"])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_separate_teacher_scores_with_its_own_weights(tmp_path, monkeypatch):
    teacher_folder = other_teacher(tmp_path / "teacher")
    seen, real_divergence = [], opsd.divergence

    def record(student, student_hidden, teacher, teacher_hidden, *args, **kwargs):
        seen.append((student, teacher, teacher_hidden))
        return real_divergence(student, student_hidden, teacher, teacher_hidden, *args, **kwargs)
    monkeypatch.setattr(opsd, "divergence", record)
    opsd.main(["--teacher-model", teacher_folder, "--teacher-prompt", "plain", "--steps", "1",
               "--batch-size", "4", "--eval-n", "0", "--out", str(tmp_path / "run")])
    student, teacher, teacher_hidden = seen[0]
    loaded, _ = common.load_model(teacher_folder)
    hidden = teacher_hidden[0, :3]
    assert teacher.model is not student and not any(p.requires_grad
                                                    for p in teacher.model.parameters())
    assert torch.equal(teacher.logits(hidden), engine.output_logits(loaded, hidden))
    with lora_disabled(student):  # the student's base, its own weights: other logits
        assert not torch.allclose(engine.output_logits(student, hidden),
                                  engine.output_logits(loaded, hidden), atol=1e-3)


def test_a_teacher_with_another_tokenizer_is_refused_before_the_data_loads(tmp_path, monkeypatch):
    teacher_folder = other_teacher(tmp_path / "teacher", vocabulary_changed=True)
    monkeypatch.setattr(common, "load_examples", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(common.InputError, match="tokenizer does not give --model toy's token ids"):
        opsd.main(["--teacher-model", teacher_folder, "--out", str(tmp_path / "run")])


def test_the_bridge_samples_from_the_teacher_first_and_then_from_the_student(tmp_path, monkeypatch):
    teacher_folder = other_teacher(tmp_path / "teacher")
    samplers, real_generate = [], engine.generate

    def record(model, *args, **kwargs):
        samplers.append(model.name_or_path)
        return real_generate(model, *args, **kwargs)
    monkeypatch.setattr(engine, "generate", record)
    out = tmp_path / "run"
    opsd.main(["--teacher-model", teacher_folder, "--teacher-rollout-steps", "2", "--steps", "3",
               "--batch-size", "4", "--eval-n", "0", "--out", str(out)])
    student = str(common.TOY_DIR / "model")
    assert samplers == [student, teacher_folder, teacher_folder, student]  # first: show_inputs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["rollouts"] for row in rows] == ["teacher", "teacher", "student"]


def slow_terms(student_logits, teacher_logits, temperature):
    """Forward-KL terms P_T(v) log(P_T(v) / P_S(v)) of one position, in float64, and P_T."""
    p_student = torch.softmax(student_logits.double() / temperature, -1)
    p_teacher = torch.softmax(teacher_logits.double() / temperature, -1)
    return [(q * math.log(q / s_)).item() for q, s_ in zip(p_teacher, p_student)], p_teacher


def test_per_token_cap_caps_each_sum_and_passes_no_gradient_above_it():
    student, teacher, mask = random_logits()
    leaf = student.clone().requires_grad_()
    clip = 1.5
    loss = logit_divergence(leaf, teacher, mask, 0.0, 1.0, clip, clip_per="token")
    loss.backward()
    sums = {(i, t): sum(slow_terms(student[i, t], teacher[i, t], 1.0)[0])
            for i in range(3) for t in range(5) if mask[i, t]}
    assert 0 < sum(value > clip for value in sums.values()) < len(sums)  # the cap acts, not everywhere
    expected = sum(min(value, clip) for value in sums.values()) / len(sums)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    for (i, t), value in sums.items():  # a capped token passes no gradient; the others do
        assert (leaf.grad[i, t].abs().max() == 0) == (value > clip)


@pytest.mark.parametrize("clip_per", ["entry", "token"])
def test_monitored_uncapped_divergence_and_capped_mass(clip_per):
    student, teacher, mask = random_logits()
    clip = 0.05 if clip_per == "entry" else 1.5
    _, monitored, _ = opsd.divergence(LogitsModel, student, opsd.Teacher(LogitsModel), teacher,
                                      mask, mask.sum(), 0.0, 1.0, clip, clip_per=clip_per)
    uncapped, masses = [], []
    for i, t in [(i, t) for i in range(3) for t in range(5) if mask[i, t]]:
        terms, p_teacher = slow_terms(student[i, t], teacher[i, t], 1.0)
        uncapped.append(sum(terms))
        if clip_per == "entry":  # the teacher's mass on the capped entries
            masses.append(sum(q.item() for q, term in zip(p_teacher, terms) if term > clip))
        else:  # a capped token loses all of it
            masses.append(float(sum(terms) > clip))
    assert monitored[0].item() == pytest.approx(sum(uncapped) / len(uncapped), rel=1e-5)
    assert monitored[1].item() == pytest.approx(sum(masses) / len(masses), rel=1e-5)
    assert 0 < monitored[1].item() < 1


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_teacher_top_k_is_the_divergence_over_the_teachers_top_tokens_renormalised(beta):
    student, teacher, mask = random_logits(V=9)
    k = 3
    got = logit_divergence(student, teacher, mask, beta, 0.8, 0.0, top_k=k)
    top = [[sorted(range(9), key=lambda v: -teacher[i, t, v].item())[:k] for t in range(5)]
           for i in range(3)]  # the teacher's k largest logits, by sorting
    pick = torch.tensor(top)  # [N, T, k]
    expected = slow_divergence(student.gather(-1, pick), teacher.gather(-1, pick), mask, beta, 0.8,
                               0.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() != pytest.approx(logit_divergence(student, teacher, mask, beta, 0.8).item())


def test_sequence_norm_is_the_mean_of_the_completions_token_means():
    student, teacher, mask = random_logits()
    row_weights = torch.tensor([1.0, 1.0, 0.5])
    got = logit_divergence(student, teacher, opsd.token_weights(row_weights, mask, "sequence"),
                           0.0, 1.0, 0.0)
    rows = [slow_divergence(student[i:i + 1], teacher[i:i + 1], mask[i:i + 1], 0.0, 1.0, 0.0)
            for i in range(3)]  # each completion's token mean
    assert got.item() == pytest.approx((rows[0] + rows[1] + 0.5 * rows[2]) / 2.5, rel=1e-5)
    token = logit_divergence(student, teacher, opsd.token_weights(row_weights, mask, "token"),
                             0.0, 1.0, 0.0)
    assert token.item() != pytest.approx(got.item())  # rows of unequal length weigh otherwise


def test_ema_update_and_the_swapped_weights_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)  # frozen: not averaged (LoRA's base)
    ema = {}
    opsd.ema_update(ema, model, 0.9)  # the first call copies the weights
    assert set(ema) == {"1.weight", "1.bias"}
    start = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight += 1.0
    opsd.ema_update(ema, model, 0.9)
    assert torch.allclose(ema["1.weight"], 0.9 * start + 0.1 * (start + 1.0))
    trained = model[1].weight.detach().clone()
    with opsd.ema_weights(model, ema):
        assert torch.equal(model[1].weight, ema["1.weight"])
    assert torch.equal(model[1].weight, trained)


def test_thinking_is_chosen_per_prompt_where_the_template_has_the_switch(toy, monkeypatch):
    _, tokenizer = toy
    message = "What is 2+3?"
    assert common.chat_prompt(tokenizer, message, True) == common.chat_prompt(tokenizer, message)
    monkeypatch.setattr(tokenizer, "chat_template",  # the session's tokenizer: put back after
                        "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                        "<|assistant|>{% if not enable_thinking %}<think></think>{% endif %}")
    assert common.chat_prompt(tokenizer, message, True) == f"<|user|>{message}<|assistant|>"
    assert common.chat_prompt(tokenizer, message) == f"<|user|>{message}<|assistant|><think></think>"


def test_the_schedule_is_constant_on_a_real_model_and_cosine_on_the_toy():
    assert opsd.parse_args(["--model", "some/model"]).schedule == "constant"
    assert opsd.parse_args([]).schedule == "cosine"


def test_paced_trains_the_rows_of_problems_at_the_frontier_and_the_schedule_switches_kl(
        tmp_path, monkeypatch):
    weights, trained_rows, betas = [], [], []  # per step
    real_weights, real_hidden, real_divergence = (opsd.paced_weights, engine.completion_hidden,
                                                  opsd.divergence)

    def record_weights(*args):
        weights.append(real_weights(*args))
        trained_rows.append(0)
        return weights[-1]

    def record_rows(model, batch):
        if torch.is_grad_enabled():  # the student's pass, not the teacher's
            trained_rows[-1] += batch["completion_ids"].shape[0]
        return real_hidden(model, batch)

    def record_beta(*args):
        betas.append(args[6])  # divergence(..., weights, normaliser, beta, ...)
        return real_divergence(*args)
    monkeypatch.setattr(opsd, "paced_weights", record_weights)
    monkeypatch.setattr(engine, "completion_hidden", record_rows)
    monkeypatch.setattr(opsd, "divergence", record_beta)
    out = tmp_path / "paced"
    opsd.main(["--steps", "4", "--batch-size", "4", "--num-generations", "4", "--eval-n", "0",
               "--max-new-tokens", "40", "--micro-batch-size", "4", "--paced",
               "--forward-then-reverse", "--out", str(out)])
    # A problem solved by none or all of its 4 rollouts has weight 0: its rows are not trained.
    assert trained_rows == [int((w > 0).sum()) for w in weights]
    assert 0 < sum(trained_rows) < 4 * 16  # the case is tested: some rows had weight 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["paced_weight"] for row in rows] == pytest.approx([float(w.mean()) for w in weights])
    # Forward KL (beta 0) in steps 1-2, reverse KL (beta 1) in steps 3-4, every micro-batch.
    assert betas[0] == 0.0 and betas[-1] == 1.0 and betas == sorted(betas) and set(betas) == {0, 1}


@pytest.mark.parametrize("argv, message", [
    (["--paced"], "--paced needs --num-generations >= 2"),
    (["--paced-alpha", "2"], "--paced-alpha and --paced-beta are PACED's"),
    (["--forward-then-reverse", "--jsd-beta", "0.5"], "--forward-then-reverse sets"),
    (["--forward-then-reverse", "--loss", "sampled"], "--forward-then-reverse sets"),
])
def test_paced_options_fail_in_one_line_before_the_model_loads(argv, message, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(common.InputError, match=message):
        opsd.main(argv + ["--out", "unused"])


def test_training_step_sees_the_same_completion_and_keeps_the_fixed_teacher(tmp_path, monkeypatch, toy):
    calls = []
    real_completion_hidden = engine.completion_hidden

    def recording(model, batch):
        hidden = real_completion_hidden(model, batch)
        disabled = all(layer.disabled for layer in lora_layers(model))
        calls.append((batch["prompt_ids"], batch["completion_ids"], batch["completion_mask"],
                      disabled, hidden.requires_grad))
        return hidden

    monkeypatch.setattr(engine, "completion_hidden", recording)
    out = tmp_path / "opsd"
    opsd.main(["--steps", "2", "--batch-size", "4", "--eval-n", "4", "--out", str(out)])
    assert len(calls) == 4  # teacher, student; twice
    for teacher_call, student_call in [calls[0:2], calls[2:4]]:
        assert torch.equal(teacher_call[1], student_call[1])  # identical completion token ids
        assert torch.equal(teacher_call[2], student_call[2])
        assert teacher_call[3] and not teacher_call[4]  # fixed teacher: LoRA off, no graph
        assert not student_call[3] and student_call[4]
        assert teacher_call[0].shape[1] > student_call[0].shape[1]  # the teacher prompt is longer

    # The base weights (the fixed teacher) are untouched; the adapter learned something.
    base, _ = toy
    trained, _ = common.load_model("toy")
    load_lora(trained, common.latest_checkpoint(out))
    with torch.no_grad(), lora_disabled(trained):
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        assert torch.equal(trained(input_ids=ids).logits, base(input_ids=ids).logits)
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(trained))


def heldout_divergence(student, teacher, tokenizer, examples, rollouts):
    """Mean forward KL(teacher || student) on fixed rollouts, computed as opsd.main does."""
    teacher_texts = [common.chat_prompt(tokenizer, common.solution_prompt(e["question"], e["solution"]))
                     for e in examples]
    teacher_prompts = tokenizer(teacher_texts, add_special_tokens=False)["input_ids"]
    completions, pad = rollouts["completions"], tokenizer.pad_token_id
    with torch.no_grad():
        teacher_hidden = engine.completion_hidden(teacher, engine.pack(teacher_prompts, completions,
                                                                       pad, "cpu"))
        student_batch = engine.pack(rollouts["prompts"], completions, pad, "cpu")
        student_hidden = engine.completion_hidden(student, student_batch)
        mask = student_batch["completion_mask"]
        return opsd.divergence(student, student_hidden, opsd.Teacher(teacher), teacher_hidden,
                               mask, mask.sum(), temperature=0.7)[0].item()


def test_short_toy_run_lowers_the_divergence_on_held_out_rollouts(tmp_path, toy):
    base, tokenizer = toy
    examples = common.load_examples("toy", "test")[:32]
    torch.manual_seed(0)
    prompts = [common.chat_prompt(tokenizer, common.student_message(e)) for e in examples]
    rollouts = engine.generate(base, tokenizer, prompts, 64, temperature=0.7)
    before = heldout_divergence(base, base, tokenizer, examples, rollouts)

    out = tmp_path / "opsd"
    opsd.main(["--steps", "20", "--schedule", "constant", "--batch-size", "16", "--eval-n", "8",
               "--out", str(out)])
    trained, _ = common.load_model("toy")
    load_lora(trained, common.latest_checkpoint(out))
    after = heldout_divergence(trained, base, tokenizer, examples, rollouts)
    print(f"held-out divergence {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "opsd" and summary["generated_tokens"] == rows[-1]["generated_tokens"] > 0


@pytest.mark.parametrize("teacher", [[], ["--teacher", "ema", "--ema-decay", "0.5"]])
def test_resume_after_a_crash_samples_and_trains_exactly_as_without_one(teacher, tmp_path,
                                                                         crash_after):
    # the rollouts are sampled: the RNG state must come back with the checkpoint (and the EMA
    # teacher's weights, which no other file holds)
    args = ["--steps", "4", "--batch-size", "4", "--save-every", "2", "--eval-n", "4"] + teacher
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    opsd.main(args + ["--out", str(straight)])

    crash_after(3, opsd.main, args + ["--out", str(broken)])
    assert common.latest_checkpoint(broken).name == "checkpoint-000002"

    opsd.main(args + ["--out", str(broken), "--resume"])

    def metrics(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics(broken)] == [1, 2, 3, 4]
    for a, b in zip(metrics(straight), metrics(broken)):
        assert a["loss"] == b["loss"] and a["generated_tokens"] == b["generated_tokens"]
        assert a["capped_mass"] == 0 and a["uncapped_divergence"] == pytest.approx(a["loss"])  # clip 0
    adapter_a = load_file(common.latest_checkpoint(straight) / "adapter_model.safetensors")
    adapter_b = load_file(common.latest_checkpoint(broken) / "adapter_model.safetensors")
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(tmp_path):
    """tests/fixtures/cuda_checkpoint was written on an H200 by `python opsd.py --steps 1
    --batch-size 4 --eval-n 4`: bfloat16 base, optimizer state on cuda:0, one GPU's random state.
    The optimizer state loads onto the CPU first, and a random state of GPUs this machine lacks is
    not restored, so it continues here (and on a machine with another number of GPUs)."""
    out = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "cuda_checkpoint", out)
    opsd.main(["--resume", "--steps", "2", "--batch-size", "4", "--eval-n", "4", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2] and math.isfinite(rows[0]["loss"])
    assert common.latest_checkpoint(out).name == "checkpoint-000002"


def test_the_ema_teacher_of_full_fine_tuning_scores_with_its_averaged_output_layer(tmp_path,
                                                                                   monkeypatch):
    """--teacher ema --full: the teacher's logits come from the averaged weights, its output layer
    included (they once came from the student's live output layer, which LoRA never adapts but
    --full trains). With the average held at the initial weights the EMA teacher is the fixed
    teacher, so the two runs' losses at step 2 are the same."""
    initial = {name: parameter.detach().clone() for name, parameter
               in common.load_model("toy", full=True, device="cpu")[0].named_parameters()}

    def hold_initial(ema, model, decay):
        ema.update({name: initial[name].clone() for name, parameter in model.named_parameters()
                    if parameter.requires_grad})
    monkeypatch.setattr(opsd, "ema_update", hold_initial)
    quick = ["--full", "--steps", "2", "--batch-size", "4", "--eval-n", "0",
             "--max-new-tokens", "24"]
    opsd.main(quick + ["--teacher", "ema", "--out", str(tmp_path / "ema")])
    opsd.main(quick + ["--out", str(tmp_path / "fixed")])
    ema, fixed = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
                  for name in ("ema", "fixed"))
    assert ema[0]["loss"] != pytest.approx(ema[1]["loss"], rel=1e-3)  # the student moved
    assert ema[1]["loss"] == pytest.approx(fixed[1]["loss"], rel=1e-5)
    assert ema[1]["uncapped_divergence"] == pytest.approx(fixed[1]["uncapped_divergence"], rel=1e-5)


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_the_log_shows_the_gap_between_sampler_and_trainer_logprobs(loss, tmp_path):
    """The sampler's log-probability of each drawn token and the training pass's are the same
    number: on a CPU in float32 the logged gap is rounding (the sampler's must be taken at the
    sampling temperature and before top-k and top-p, as the trainer's)."""
    opsd.main(["--steps", "1", "--batch-size", "4", "--eval-n", "0", "--max-new-tokens", "24",
               "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--loss", loss,
               "--out", str(tmp_path)])
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert 0 <= row["logprob_gap_mean"] <= row["logprob_gap_max"] < 1e-4


@pytest.mark.parametrize("loss_norm,loss", [("token", "full"), ("sequence", "full"),
                                            ("token", "sampled")])
def test_micro_batches_add_up_to_the_steps_loss_and_gradient(tmp_path, loss_norm, loss):
    """Every micro-batch's loss is divided by the whole step's weight (`loss_normaliser`), so a
    step cut into micro-batches of 3 rows has the loss and gradient of the step in one batch."""
    quick = ["--steps", "1", "--batch-size", "8", "--eval-n", "0", "--max-new-tokens", "32",
             "--loss-norm", loss_norm, "--loss", loss]
    rows = {}
    for size in ("8", "3"):
        opsd.main(quick + ["--micro-batch-size", size, "--out", str(tmp_path / size)])
        rows[size] = json.loads((tmp_path / size / "metrics.jsonl").read_text())
    assert rows["8"]["grad_norm"] > 0
    assert rows["8"]["generated_tokens"] == rows["3"]["generated_tokens"]  # the same rollouts
    for key in ("grad_norm", "loss", "uncapped_divergence"):
        if key in rows["8"]:
            assert rows["3"][key] == pytest.approx(rows["8"][key], rel=1e-4), key


def test_the_sampled_loss_is_another_loss_on_the_same_rollouts(tmp_path):
    """--loss sampled trains on the sampled tokens' advantages, not the full divergence: the same
    rollouts, another loss and gradient."""
    quick = ["--steps", "1", "--batch-size", "8", "--eval-n", "0", "--max-new-tokens", "32"]
    rows = {}
    for loss in ("full", "sampled"):
        opsd.main(quick + ["--loss", loss, "--out", str(tmp_path / loss)])
        rows[loss] = json.loads((tmp_path / loss / "metrics.jsonl").read_text())
    assert rows["full"]["generated_tokens"] == rows["sampled"]["generated_tokens"]
    assert rows["full"]["loss"] == pytest.approx(rows["full"]["uncapped_divergence"])  # clip 0
    assert rows["sampled"]["loss"] != pytest.approx(rows["full"]["loss"], rel=1e-3)
    assert rows["sampled"]["grad_norm"] != pytest.approx(rows["full"]["grad_norm"], rel=1e-3)

