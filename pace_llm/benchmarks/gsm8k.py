"""GSM-8K: the paper's prompt (Appendix G), answer extraction and scoring, as a
generation task (`GSM8K`, pace_llm.benchmarks.generation_task), and `evaluate_gsm8k(model_dir, examples,
backend=...)`, the in-process evaluation `eval/gsm8k.py` and launch/demo.py run.

Scoring follows lm-evaluation-harness: "strict" reads only `#### N`; "flexible" reads
`#### N` when present, else the last number in the completion. Numbers are normalized
(commas, `$`, a trailing `.` and trailing decimal zeros dropped) before comparison.
"""

from __future__ import annotations

import re

from pace_llm.benchmarks.generation_task import GenerationTask, generate_and_score, score_all

INSTRUCTION = "Answer below question. First think step-by-step and then answer the final number:\n\n"

# A number: optional sign and `$`, thousands separators only in groups of three, decimals.
# The sign counts only when it does not follow a word character ("3-4" is 3 and 4).
_NUMBER = r"(?<![\w.])(-)?(?:\$\s?)?(-)?((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RE = re.compile(r"####\s*" + _NUMBER.replace(r"(?<![\w.])", ""))


def prompt_text(question: str) -> str:
    """The user message for one question (before the chat template)."""
    return INSTRUCTION + question.strip()


def normalize_number(text: str) -> str:
    """'1,234.00' -> '1234', '$-0.50' -> '-0.5', '007' -> '7'."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    negative = s.startswith("-")
    s = s.lstrip("-")
    whole, _, frac = s.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return "-" + out if negative and out != "0" else out


def _from_match(match: re.Match) -> str:
    sign = "-" if (match.group(1) or match.group(2)) else ""
    return normalize_number(sign + match.group(3))


def extract_answer_strict(text: str) -> str | None:
    """The number after the first `#### ` (lm-evaluation-harness strict-match), else None."""
    match = _STRICT_RE.search(text or "")
    return _from_match(match) if match else None


def extract_answer(text: str) -> str | None:
    """`#### N` when present, else the last number in the text (flexible-extract); None
    when the text holds no number."""
    strict = extract_answer_strict(text)
    if strict is not None:
        return strict
    matches = list(_NUMBER_RE.finditer(text or ""))
    return _from_match(matches[-1]) if matches else None


def reference_answer(answer_field: str) -> str:
    """The normalized final number of a GSM-8K `answer` field (after its last `####`)."""
    if "####" not in answer_field:
        raise ValueError(f"GSM-8K answer without '####': {answer_field[-80:]!r}")
    tail = answer_field.rsplit("####", 1)[1]
    number = extract_answer_strict("#### " + tail.strip())
    if number is None:
        raise ValueError(f"GSM-8K answer without a number after '####': {tail!r}")
    return number


def load_problems(data: str, limit: int | None = None) -> list[dict]:
    """Rows with `question` and `answer` (other columns dropped): a local .jsonl / .json
    file, or a hub dataset id (`openai/gsm8k`, config "main", split "test"), through
    pace_llm.data.load_examples."""
    from pace_llm.data import DataError
    from pace_llm.data import load_examples as load

    rows = [{"question": r["question"], "answer": r["answer"]} for r in load(data, "test", "main", limit)]
    for number, row in enumerate(rows, 1):  # checked now, not after the whole generation
        try:
            reference_answer(row["answer"])
        except ValueError as err:
            raise DataError(f"data {data}, row {number}, field 'answer': {err}") from None
    return rows


class GSM8K(GenerationTask):
    """The paper's prompt; flexible and strict accuracy, and strict_format_rate: the share of
    completions that state a final answer as `#### N` at all (what a short fine-tune changes first)."""

    name = "gsm8k"

    def prompt(self, example: dict) -> str:
        return prompt_text(example["question"])

    def score(self, completion: str, example: dict) -> dict:
        reference = reference_answer(example["answer"])
        flexible, strict = extract_answer(completion), extract_answer_strict(completion)
        return {
            "question": example["question"],
            "completion": completion,
            "extracted": flexible,
            "extracted_strict": strict,
            "reference": reference,
            "correct": flexible == reference,
            "correct_strict": strict == reference,
        }

    def summarize(self, records: list[dict]) -> dict:
        n = max(len(records), 1)  # no records: 0.0 everywhere
        return {
            "accuracy": sum(r["correct"] for r in records) / n,
            "accuracy_strict": sum(r["correct_strict"] for r in records) / n,
            "strict_format_rate": sum(r["extracted_strict"] is not None for r in records) / n,
            "n": len(records),
        }

    def settings(self) -> dict:
        return {"instruction": INSTRUCTION}

    def describe(self, summary: dict) -> str:
        return (
            f"accuracy {summary['accuracy']:.4f} (strict {summary['accuracy_strict']:.4f}; "
            f"{summary['strict_format_rate']:.0%} end with '#### N')"
        )


TASK = GSM8K()


def score(examples: list[dict], completions: list[str]) -> tuple[list[dict], dict]:
    """Per-sample records and {"accuracy", "accuracy_strict", "strict_format_rate", "n"}."""
    return score_all(TASK, examples, completions)


def evaluate_gsm8k(model_dir, examples: list[dict], backend: str | None = None, **options) -> dict:
    """Greedy GSM-8K evaluation of a merged folder (or base + adapter, or a server); options
    as pace_llm.benchmarks.generation_task.evaluate (adapter, base_url, max_new_tokens, batch_size, ...).

    Returns {"accuracy", "accuracy_strict", "strict_format_rate", "n", "settings", "timing", "samples"}.
    """
    return generate_and_score(TASK, model_dir, examples, backend=backend, **options)
