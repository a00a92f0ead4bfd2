"""GSM-8K: the paper's prompt (Appendix G), answer extraction and scoring, and
`evaluate(model_dir, rows, backend=...)`, the in-process evaluation `eval/gsm8k.py` wraps.

Scoring follows lm-evaluation-harness: "strict" reads only `#### N`; "flexible" reads
`#### N` when present, else the last number in the completion. Numbers are normalized
(commas, `$`, a trailing `.` and trailing decimal zeros dropped) before comparison.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

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


def load_rows(data: str, limit: int | None = None) -> list[dict]:
    """Rows with `question` and `answer`: a local .jsonl / .json file, or a hub dataset id
    (`openai/gsm8k`, config "main", split "test")."""
    path = Path(data)
    if path.is_file():
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import datasets
        rows = list(datasets.load_dataset(data, "main", split="test"))
    rows = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    return rows[:limit] if limit is not None else rows


def score(rows: list[dict], completions: list[str]) -> tuple[list[dict], dict]:
    """Per-sample records, the two accuracies, and strict_format_rate: the share of completions
    that state a final answer as `#### N` at all (what a short fine-tune changes first)."""
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows but {len(completions)} completions")
    records = []
    for row, completion in zip(rows, completions):
        reference = reference_answer(row["answer"])
        flexible, strict = extract_answer(completion), extract_answer_strict(completion)
        records.append({"question": row["question"], "completion": completion,
                        "extracted": flexible, "extracted_strict": strict,
                        "reference": reference, "correct": flexible == reference,
                        "correct_strict": strict == reference})
    n = len(records)
    metrics = {"accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
               "accuracy_strict": sum(r["correct_strict"] for r in records) / n if n else 0.0,
               "strict_format_rate": sum(r["extracted_strict"] is not None for r in records) / n if n else 0.0,
               "n": n}
    return records, metrics


def evaluate(model_dir, rows: list[dict], backend: str | None = None, adapter=None,
             base_url: str | None = None, max_new_tokens: int = 512, batch_size: int = 16,
             served_model: str | None = None, dtype: str | None = None, verbose: bool = True) -> dict:
    """Greedy GSM-8K evaluation of a merged folder (or base + adapter, or a server).

    Returns {"accuracy", "accuracy_strict", "strict_format_rate", "n", "settings", "timing", "samples"}.
    """
    from .. import generation
    backend = backend or generation.default_backend()
    with generation.Generator(model_dir, backend=backend, adapter=adapter, base_url=base_url,
                              batch_size=batch_size, served_model=served_model, dtype=dtype) as gen:
        prompts = gen.render([prompt_text(r["question"]) for r in rows])
        result = gen.generate(prompts, max_new_tokens=max_new_tokens, progress=verbose)
    records, metrics = score(rows, result.texts)
    for record, prompt, n_tokens in zip(records, prompts, result.num_tokens):
        record["prompt"] = prompt
        record["completion_tokens"] = n_tokens
    timing = {"load_s": round(gen.load_s, 3), "generate_s": round(result.seconds, 3),
              "prompts_per_s": round(len(prompts) / max(result.seconds, 1e-9), 3),
              "generated_tokens": sum(result.num_tokens),
              "tokens_per_s": round(sum(result.num_tokens) / max(result.seconds, 1e-9), 3)}
    if verbose:
        print(f"[gsm8k] {backend}: {metrics['n']} prompts in {timing['generate_s']:.2f}s "
              f"({timing['prompts_per_s']:.2f} prompts/s, {timing['tokens_per_s']:.1f} generated tokens/s); "
              f"accuracy {metrics['accuracy']:.4f} (strict {metrics['accuracy_strict']:.4f}; "
              f"{metrics['strict_format_rate']:.0%} end with '#### N')", flush=True)
    settings = {"model": str(model_dir) if model_dir is not None else gen.model_name,
                "adapter": str(adapter) if adapter else None, "backend": backend,
                "base_url": base_url, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size if backend == "hf" else None,
                "dtype": gen.dtype, "stop_token_ids": gen.stop_token_ids,
                "decoding": "greedy", "instruction": INSTRUCTION}
    return {**metrics, "settings": settings, "timing": timing, "samples": records,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
