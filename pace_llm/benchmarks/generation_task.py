"""The interface of a task evaluated by generating answers, and the one evaluation over it.

A task (pace_llm.benchmarks.gsm8k.GSM8K is one) says three things:

    prompt(example) -> str                 the user message, before the model's chat template
    score(completion, example) -> dict     one sample's record (a line of FILE.samples.jsonl)
    summarize(records) -> dict         the metrics over all records (accuracy, n, ...)

`generate_and_score(task, model_dir, examples, backend=...)` renders the prompts with the chat template
training uses, decodes greedily with any pace_llm.generation backend (vllm, hf, openai),
scores, and returns the summary with settings, timing and the per-sample records.
"""

from __future__ import annotations

import time


class GenerationTask:
    """Subclass and implement prompt, score and summarize; settings and describe are optional."""

    name = "generation"  # the prefix of log lines

    def prompt(self, example: dict) -> str:
        raise NotImplementedError

    def score(self, completion: str, example: dict) -> dict:
        raise NotImplementedError

    def summarize(self, records: list[dict]) -> dict:
        raise NotImplementedError

    def settings(self) -> dict:
        """Task settings recorded in the result (e.g. the instruction)."""
        return {}

    def describe(self, summary: dict) -> str:
        """The metrics part of the log line after an evaluation."""
        return ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float))


def score_all(task: GenerationTask, examples, completions: list[str]) -> tuple[list[dict], dict]:
    """Per-sample records and their summary."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    records = [task.score(completion, example) for example, completion in zip(examples, completions)]
    return records, task.summarize(records)


def generate_and_score(
    task: GenerationTask,
    model_dir,
    examples,
    backend: str | None = None,
    adapter=None,
    base_url: str | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    served_model: str | None = None,
    dtype: str | None = None,
    verbose: bool = True,
) -> dict:
    """Greedy evaluation of a merged folder (or base + adapter, or a server) on `examples`.

    Returns {**task.summarize(...), "settings", "timing", "samples", "finished_at"}; each
    sample is task.score's record plus its rendered "prompt" and "completion_tokens".
    """
    from pace_llm import generation

    backend = backend or generation.default_backend()
    with generation.Generator(
        model_dir,
        backend=backend,
        adapter=adapter,
        base_url=base_url,
        batch_size=batch_size,
        served_model=served_model,
        dtype=dtype,
    ) as gen:
        prompts = gen.render([task.prompt(example) for example in examples])
        result = gen.generate(prompts, max_new_tokens=max_new_tokens, progress=verbose)
    records, summary = score_all(task, examples, result.texts)
    for record, prompt, n_tokens in zip(records, prompts, result.num_tokens):
        record["prompt"] = prompt
        record["completion_tokens"] = n_tokens
    timing = {
        "load_s": round(gen.load_s, 3),
        "generate_s": round(result.seconds, 3),
        "prompts_per_s": round(len(prompts) / max(result.seconds, 1e-9), 3),
        "generated_tokens": sum(result.num_tokens),
        "tokens_per_s": round(sum(result.num_tokens) / max(result.seconds, 1e-9), 3),
    }
    if verbose:
        print(
            f"[{task.name}] {backend}: {len(records)} prompts in {timing['generate_s']:.2f}s "
            f"({timing['prompts_per_s']:.2f} prompts/s, {timing['tokens_per_s']:.1f} generated tokens/s); "
            f"{task.describe(summary)}",
            flush=True,
        )
    settings = {
        "model": str(model_dir) if model_dir is not None else gen.model_name,
        "adapter": str(adapter) if adapter else None,
        "backend": backend,
        "base_url": base_url,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size if backend == "hf" else None,
        "dtype": gen.dtype,
        "stop_token_ids": gen.stop_token_ids,
        "decoding": "greedy",
        **task.settings(),
    }
    return {
        **summary,
        "settings": settings,
        "timing": timing,
        "samples": records,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
