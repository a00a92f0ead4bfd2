"""GSM-8K prompt, reference parsing and answer extraction on real completion styles."""

import json

import pytest

from pace_llm.benchmarks.generation_task import GenerationTask
from pace_llm.benchmarks.gsm8k import (
    INSTRUCTION,
    TASK,
    extract_answer,
    extract_answer_strict,
    load_problems,
    normalize_number,
    prompt_text,
    reference_answer,
    score,
)


def test_prompt_is_the_papers_appendix_g_instruction():
    assert INSTRUCTION == ("Answer below question. First think step-by-step and then answer the final number:\n\n")
    assert prompt_text("  How many legs do 3 cats have?\n") == INSTRUCTION + "How many legs do 3 cats have?"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1234", "1234"),
        ("1,234", "1234"),
        ("1,234.00", "1234"),
        ("$1234", "1234"),
        ("$1,234.50", "1234.5"),
        ("18.", "18"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("007", "7"),
        ("-3", "-3"),
        ("-0.0", "0"),
        ("-$5", "-5"),
        ("1,000,000", "1000000"),
        ("10.250", "10.25"),
        ("100", "100"),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_equal_after_normalization():
    assert extract_answer("#### 1,234.00") == extract_answer("The answer is $1234") == extract_answer("1234")


@pytest.mark.parametrize(
    "completion, expected",
    [
        # GSM-8K's own format: the reasoning, then "#### N"
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("She earns 12/60 = $0.2 per minute, so 0.2 x 50 = $10.\n#### 10", "10"),
        ("#### -5", "-5"),
        ("####-5", "-5"),
        ("#### $1,250", "1250"),
        ("#### 3.50", "3.5"),
        ("#### 18.", "18"),
        ("So the total is 5 + 7 = 12\n\n#### 12\n\nQuestion: Tom has 3 apples", "12"),
        # "The answer is N." (chain-of-thought few-shot style)
        ("Roger started with 5 balls. 2 cans of 3 is 6. 5 + 6 = 11. The answer is 11.", "11"),
        ("The answer is: 42", "42"),
        ("Final answer: 1,200 dollars.", "1200"),
        # LaTeX
        (r"Thus $48 + 24 = 72$ clips, so the answer is $\boxed{72}$.", "72"),
        (r"\[ \boxed{1,234} \]", "1234"),
        (r"The profit is \boxed{\$1,500.00}", "1500"),
        (r"**Answer:** \(\boxed{-3}\)", "-3"),
        # money, percentages, units, decimals, negatives
        ("He spends $3.50 + $1.50 = $5.00 in total.", "5"),
        ("The shirt is 25% off, so she pays 75% of $40 = $30.", "30"),
        ("That leaves a discount of 25%.", "25"),
        ("The increase was 12.5%", "12.5"),
        ("It is 1,000,000 grains.", "1000000"),
        ("The temperature dropped to -7 degrees.", "-7"),
        ("He owes -$20 now.", "-20"),
        ("The ratio is 0.75.", "0.75"),
        ("It takes 3 hours and 30 minutes", "30"),
        ("Each box weighs 2.5 kg, so 4 boxes weigh 10.0 kg.", "10"),
        # a hyphen between words or numbers is not a minus sign
        ("Children aged 3-4 pay nothing, so 10 - 4", "4"),
        ("a 20-minute walk", "20"),
        ("He is 3rd in line with 2nd place at 15", "15"),
    ],
)
def test_extract_answer_flexible(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "I don't know.",
        "The answer is unknown.",
        "#### ",
        "Let me think step-by-step.",
        None,
    ],
)
def test_extract_answer_without_a_number(completion):
    assert extract_answer(completion) is None
    assert extract_answer_strict(completion) is None


@pytest.mark.parametrize(
    "completion, strict, flexible",
    [
        ("3 + 4 = 7\n#### 7", "7", "7"),
        ("3 + 4 = 7. The answer is 7.", None, "7"),  # strict needs "####"
        (r"\boxed{7}", None, "7"),
        ("#### 7\nQuestion: what is 8 + 9? 8 + 9 = 17\n#### 17", "7", "7"),  # the first "####" wins
        ("#### 7 apples, 9 pears", "7", "7"),  # "####" beats the last number
        ("The answer is 7 #### seven", None, "7"),  # no number after "####": flexible fallback
    ],
)
def test_strict_versus_flexible(completion, strict, flexible):
    assert extract_answer_strict(completion) == strict
    assert extract_answer(completion) == flexible


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10", "10"),
        ("The loss is ...\n#### -4", "-4"),
        ("... #### 1,000", "1000"),
        ("... \n#### 0.5", "0.5"),
        ("Step 1 #### 3\n#### 5", "5"),  # the last "####" of a reference is the answer
    ],
)
def test_reference_answer(answer, expected):
    assert reference_answer(answer) == expected


@pytest.mark.parametrize("bad", ["no marker 12", "#### twelve"])
def test_reference_answer_rejects_malformed(bad):
    with pytest.raises(ValueError):
        reference_answer(bad)


def test_score_counts_flexible_and_strict():
    rows = [
        {"question": "q1", "answer": "#### 72"},
        {"question": "q2", "answer": "#### 1,000"},
        {"question": "q3", "answer": "#### 5"},
        {"question": "q4", "answer": "#### 3"},
    ]
    completions = ["48 + 24 = 72\n#### 72", "The answer is $1,000.00.", "I am not sure.", "#### 4, then 3"]
    records, metrics = score(rows, completions)
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert [r["correct_strict"] for r in records] == [True, False, False, False]
    assert [r["extracted"] for r in records] == ["72", "1000", None, "4"]
    assert metrics == {"accuracy": 0.5, "accuracy_strict": 0.25, "strict_format_rate": 0.5, "n": 4}
    with pytest.raises(ValueError):
        score(rows, completions[:2])


def test_load_problems_from_jsonl(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": f"q{i}", "answer": f"#### {i}", "extra": 1} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert load_problems(str(path)) == [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
    assert len(load_problems(str(path), limit=2)) == 2


def test_load_problems_from_a_json_list(tmp_path):
    path = tmp_path / "gsm.json"
    path.write_text(json.dumps([{"question": "q0", "answer": "#### 0"}, {"question": "q1", "answer": "#### 1"}]))
    assert load_problems(str(path)) == [{"question": "q0", "answer": "#### 0"}, {"question": "q1", "answer": "#### 1"}]


def test_gsm8k_as_a_generation_task():
    rows = [
        {"question": " What is 3 plus 4?\n", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "Tom has 5 apples and eats 2.", "answer": "#### 3"},
    ]
    assert isinstance(TASK, GenerationTask) and TASK.name == "gsm8k"
    assert TASK.prompt(rows[0]) == INSTRUCTION + "What is 3 plus 4?"
    first = TASK.score("3 + 4 = 7\n#### 7", rows[0])
    assert first == {
        "question": rows[0]["question"],
        "completion": "3 + 4 = 7\n#### 7",
        "extracted": "7",
        "extracted_strict": "7",
        "reference": "7",
        "correct": True,
        "correct_strict": True,
    }
    second = TASK.score("He has 3 left.", rows[1])
    assert (second["extracted"], second["extracted_strict"], second["correct"], second["correct_strict"]) == (
        "3",
        None,
        True,
        False,
    )
    assert TASK.summarize([first, second]) == {
        "accuracy": 1.0,
        "accuracy_strict": 0.5,
        "strict_format_rate": 0.5,
        "n": 2,
    }
    assert TASK.summarize([])["accuracy"] == 0.0
    assert TASK.settings() == {"instruction": INSTRUCTION}
