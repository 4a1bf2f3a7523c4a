import json
from pathlib import Path

import pytest

import common
from common import InputError, extract_answer, is_correct, load_examples, normalize_answer

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl"
GSM8K_TEST = Path(__file__).parent / "fixtures" / "gsm8k_test.jsonl"  # all 1,319, MIT (GSM8K_LICENSE)


def write(path, text):
    path.write_text(text)
    return str(path)


def test_toy_task_is_gsm8k_format_and_splits_are_disjoint():
    train, test = load_examples("toy", "train"), load_examples("toy", "test")
    assert len(test) == 500 and len(train) >= 10000
    assert len(load_examples("toy", "all")) == len(train) + len(test)
    assert not {e["question"] for e in train} & {e["question"] for e in test}
    for example in test[:50]:
        lines = example["solution"].splitlines()
        assert lines[-1] == f"#### {example['answer']}" and 2 <= len(lines) - 1 <= 3
        for line in lines[:-1]:  # every worked step is a true equation
            left, right = line.split("=")
            assert eval(left) == int(right)


def test_real_gsm8k_records_load_and_their_answers_are_extracted():
    examples = load_examples(str(FIXTURE), "all")
    raw = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert len(examples) == len(raw)
    for example, record in zip(examples, raw):
        final = record["answer"].split("####")[-1].strip()
        assert example["answer"] == final.replace(",", "")
        assert is_correct(record["answer"], final)
    assert any("," in r["answer"].split("####")[-1] for r in raw)  # the fixture has 1,080-style
    assert any(e["answer"].startswith("-") for e in examples)


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### $1,080.00", "1080"),
    ("#### 18 dollars", "18"),
    ("#### -3", "-3"),
    ("#### 0.50", "0.5"),
    ("The answer is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{1,000}", "1000"),
    ("no final answer here: 12", None),
    ("####", None),
    ("#### **18**", "18"),
    ("#### $18.00", "18"),
    ("#### 18.", "18"),
    ("#### 18 dollars per week.", "18"),
    ("#### 3/4", "3/4"),
    ("#### 3/4 cup", "3/4"),
    ("#### \\frac{1}{2}", "\\frac{1}{2}"),
    ("#### $\\left( 1, 2 \\right)$", "(1,2)"),
    ("#### 2x + 3", "2x+3"),
    ("#### 18\n#### Step 2: check", "18"),  # a Markdown heading after the answer
    ("#### 18\n#### 2. Verification", "18"),  # a numbered heading is a heading too
    ("#### 1) Set up the equation\nx = 4\n#### 4", "4"),
    ("#### 50%", "50"),
    ("#### Step 1: add\n3 + 4 = 7", None),  # a heading is no marker, the last number no answer
    ("#### **Answer:** 18", None),
    ("####\n18", None),  # the value belongs on the marker's line
    ("\\boxed{5} and then\n#### 7", "7"),  # the last marker wins, whichever kind
    ("#### 7\nso the answer is \\boxed{5}", "5"),
    ("#### 7\n\\boxed{5}\n#### Check", "5"),
    ("#### 7\nso \\boxed{5", None),  # cut off inside the last marker: no answer
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{$\\left( 1, 2 \\right)$}", "(1,2)"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_all_gsm8k_test_answers_are_read_right():
    records = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    assert len(records) == 1319
    for record in records:  # every GSM8K final answer is an integer, some with thousands commas
        final = record["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_answer(record["answer"]) == final, record["answer"]


def test_is_correct_normalises_numbers():
    assert is_correct("#### 1,000", "1000") and is_correct("\\boxed{$5.0}", "5")
    assert not is_correct("#### 17", "18") and not is_correct("I think 18", "18")
    assert normalize_answer(" 18. ") == "18"
    assert is_correct("so \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}")
    assert is_correct("#### $\\tfrac{1}{2}$", "$\\frac{1}{2}$") and is_correct("#### 3/4", "3/4")
    assert not is_correct("#### 3/4", "\\frac{3}{4}")  # a fraction and its LaTeX stay apart
    assert normalize_answer("\\left[ 0, 1 \\right)") == "[0,1)" and normalize_answer("(1, 2)") == "(1,2)"
    assert normalize_answer("x \\rightarrow y") == "x\\rightarrowy"


def test_other_field_names_and_short_answer_field(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps(
        {"problem": "What is 1+1?", "solution": "1+1 is \\boxed{2}", "Answer": "2"}) + "\n" + json.dumps(
        {"question": "q", "answer": "long reasoning", "final_answer": "$3"}) + "\n")
    examples = load_examples(path, "all")
    assert [e["answer"] for e in examples] == ["2", "3"]
    assert examples[0]["question"] == "What is 1+1?"


def test_json_list_file(tmp_path):
    path = write(tmp_path / "d.json", json.dumps([{"question": "q", "answer": "#### 4"}]))
    assert load_examples(path, "all")[0]["answer"] == "4"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "empty file"),
    ('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": \n', "d.jsonl:2: bad JSON"),
    ('{"question": "q", "answer": "#### 1"}\n\n{"answer": "#### 2"}\n', "d.jsonl:3: missing field 'question'"),
    ('{"question": "q"}\n', "d.jsonl:1: missing field 'answer'"),
    ('{"question": "q", "answer": "no final"}\n', "d.jsonl:1: no final answer"),
    ('[1, 2]\n', "d.jsonl:1: expected a JSON object"),
])
def test_bad_input_gives_one_clear_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as error:
        load_examples(str(path), "train")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_input_exits_with_one_line_from_the_script(tmp_path):
    import subprocess
    import sys
    path = write(tmp_path / "d.jsonl", '{"question": "q", "answer": "#### 1"}\n{oops}\n')
    result = subprocess.run([sys.executable, str(common.REPO / "sft.py"), "--data", path, "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {path}:2: bad JSON (Expecting property name enclosed in double quotes)"
    assert "Traceback" not in result.stderr


def test_unknown_model_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as error:
        common.load_model("no-such-org/no-such-model")
    assert str(error.value).startswith("cannot load model 'no-such-org/no-such-model'")
    assert "\n" not in str(error.value)


def test_held_out_slice_is_fixed_and_disjoint(tmp_path):
    lines = "".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(50))
    path = write(tmp_path / "d.jsonl", lines)
    train, test = load_examples(path, "train"), load_examples(path, "test")
    assert len(test) == 5 and len(train) == 45
    assert not {e["question"] for e in train} & {e["question"] for e in test}
    assert test == load_examples(path, "test")


def test_prompts_keep_the_solution_out_of_the_student_prompt(toy):
    _, tokenizer = toy
    example = load_examples("toy", "test")[0]
    student = common.chat_prompt(tokenizer, common.student_prompt(example["question"]))
    teacher = common.chat_prompt(tokenizer, common.solution_prompt(example["question"], example["solution"]))
    assert example["question"] in student and example["solution"] not in student
    assert example["solution"] in teacher and "reference solution" in teacher
    assert student.startswith("<|im_start|>user\n") and student.endswith("<|im_start|>assistant\n")


def test_plain_prompt_without_chat_template(toy):
    _, tokenizer = toy
    import copy
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert common.chat_prompt(plain, "What is 2+2?").startswith("Problem: What is 2+2?")


def test_batch_indices_are_a_function_of_position():
    first = common.batch_indices(10, 7, 0, seed=3) + common.batch_indices(10, 7, 7, seed=3)
    assert first == common.batch_indices(10, 14, 0, seed=3)
    assert sorted(first[:10]) == list(range(10))  # one epoch is a permutation
    assert first != common.batch_indices(10, 14, 0, seed=4)
