"""GLUE tasks: field names, label counts, metrics (numpy only) and batched evaluation.

    spec = glue.GLUE_TASKS["stsb"]                  # text_fields, num_labels (1: regression), metric
    glue.compute_metrics("cola", logits_or_labels, references)   # {"mcc": ..., "accuracy": ...}

Metrics follow the GLUE benchmark and the LoRA/VeRA RoBERTa protocol the PACE paper's
GLUE table uses: Matthews correlation for CoLA, Pearson for STS-B (Spearman reported
too), accuracy for the others (MRPC and QQP report binary F1 too). Values are fractions
(accuracy 0.876), not percentages; tables print them x100. Conventions where a metric is
undefined match scikit-learn / scipy: MCC 0.0 and F1 0.0 on a zero denominator, Pearson
and Spearman NaN when either side is constant.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class GlueTask:
    name: str
    text_fields: tuple[str, ...]  # one sentence, or a pair
    num_labels: int  # 1 = regression (STS-B)
    metric: str  # the main metric (paper tables)
    metrics: tuple[str, ...]  # everything compute_metrics reports
    validation_split: str = "validation"
    label_field: str = "label"
    display: str = ""  # column title in tables

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", ("sentence",), 2, "mcc", ("mcc", "accuracy"), display="CoLA"),
        GlueTask("sst2", ("sentence",), 2, "accuracy", ("accuracy",), display="SST-2"),
        GlueTask("mrpc", ("sentence1", "sentence2"), 2, "accuracy", ("accuracy", "f1"), display="MRPC"),
        GlueTask("qqp", ("question1", "question2"), 2, "accuracy", ("accuracy", "f1"), display="QQP"),
        GlueTask("stsb", ("sentence1", "sentence2"), 1, "pearson", ("pearson", "spearman"), display="STS-B"),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            3,
            "accuracy",
            ("accuracy",),
            validation_split="validation_matched",
            display="MNLI",
        ),
        GlueTask("qnli", ("question", "sentence"), 2, "accuracy", ("accuracy",), display="QNLI"),
        GlueTask("rte", ("sentence1", "sentence2"), 2, "accuracy", ("accuracy",), display="RTE"),
    ]
}
# Column order of the paper's Table 5 (the LoRA/VeRA subset first), then the rest.
TABLE_ORDER = ["cola", "stsb", "mrpc", "rte", "qnli", "sst2", "mnli", "qqp"]
METRIC_NAMES = {"mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman", "accuracy": "Acc", "f1": "F1"}


def glue_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


# --------------------------------------------------------------------------- metrics


def _arrays(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape != r.shape:
        raise ValueError(f"predictions {p.shape} and references {r.shape} differ in shape")
    if p.size == 0:
        raise ValueError("no predictions")
    return p, r


def accuracy(predictions, references) -> float:
    p, r = _arrays(predictions, references)
    return float(np.mean(p == r))


def f1_binary(predictions, references, positive=1) -> float:
    """F1 of the positive class: 2·TP / (2·TP + FP + FN); 0.0 when that is 0/0."""
    p, r = _arrays(predictions, references)
    tp = np.sum((p == positive) & (r == positive))
    fp = np.sum((p == positive) & (r != positive))
    fn = np.sum((p != positive) & (r == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(predictions, references) -> float:
    """Matthews correlation (multiclass form, Gorodkin 2004; equals the binary
    (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) for two classes). 0.0 when the
    denominator is 0 (a constant prediction or reference), as scikit-learn does."""
    p, r = _arrays(predictions, references)
    classes, inverse = np.unique(np.concatenate([r, p]), return_inverse=True)
    r_idx, p_idx = inverse[: r.size], inverse[r.size :]
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (r_idx, p_idx), 1)
    t = confusion.sum(axis=1)  # true occurrences per class
    q = confusion.sum(axis=0)  # predicted occurrences per class
    c, s = np.trace(confusion), confusion.sum()
    cov_pr = c * s - t @ q
    cov_pp = s * s - q @ q
    cov_rr = s * s - t @ t
    denom = math.sqrt(cov_pp * cov_rr)
    return float(cov_pr / denom) if denom else 0.0


def pearson(predictions, references) -> float:
    """Pearson's r; NaN when either side is constant (as scipy)."""
    x, y = _arrays(np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64))
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denom) if denom else float("nan")


def rankdata(values) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span (scipy's 'average')."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], len(v)]
    average = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(predictions, references) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    p, r = _arrays(predictions, references)
    return pearson(rankdata(p), rankdata(r))


METRICS = {"accuracy": accuracy, "f1": f1_binary, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def to_predictions(task: str | GlueTask, outputs) -> np.ndarray:
    """Model outputs -> predictions: argmax of [N, C] logits for classification, the
    [N] / [N, 1] scores for regression; 1-D label ids pass through."""
    spec = task if isinstance(task, GlueTask) else glue_task(task)
    out = np.asarray(outputs)
    if spec.is_regression:
        return out.reshape(len(out), -1)[:, 0].astype(np.float64) if out.ndim > 1 else out.astype(np.float64)
    return out.argmax(axis=-1) if out.ndim == 2 else out


def compute_metrics(task: str | GlueTask, predictions, references) -> dict[str, float]:
    """All of the task's metrics, e.g. {"accuracy": 0.9, "f1": 0.93} for MRPC.
    `predictions`: label ids, scores (STS-B) or raw logits (argmax is taken)."""
    spec = task if isinstance(task, GlueTask) else glue_task(task)
    preds = to_predictions(spec, predictions)
    refs = np.asarray(references, dtype=np.float64 if spec.is_regression else None)
    return {name: METRICS[name](preds, refs) for name in spec.metrics}


# --------------------------------------------------------------------------- data


def text_inputs(spec: GlueTask, examples, text_fields: Sequence[str] | None = None):
    """The tokenizer's positional text arguments: ([first texts]) or ([firsts], [seconds])."""
    fields = tuple(text_fields or spec.text_fields)
    columns = examples.column_names if hasattr(examples, "column_names") else list(examples[0]) if len(examples) else []
    missing = [f for f in fields if f not in columns]
    if missing:
        raise ValueError(
            f"{spec.name}: field {missing[0]!r} is not in the data "
            f"(it has: {', '.join(columns)}); set the text fields explicitly"
        )
    if hasattr(examples, "column_names"):  # a datasets.Dataset: column access
        return tuple([str(x) for x in examples[f]] for f in fields)
    return tuple([str(example[f]) for example in examples] for f in fields)


def max_sequence_length(model, tokenizer, requested: int | None = None) -> int:
    """The longest input the model takes: RoBERTa-style position ids start after the
    padding index, so they have max_position_embeddings − 2 positions."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 512
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet"):
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:
        limit = min(limit, tok_limit)
    return min(limit, requested) if requested else min(limit, 512)


def predict(
    model,
    tokenizer,
    spec: GlueTask,
    examples,
    batch_size: int = 32,
    max_length: int | None = None,
    text_fields: Sequence[str] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Raw outputs [N, num_labels] (logits, or scores for regression), in example order, fp32."""
    from pace_llm.benchmarks.evaluation import predict_logits

    texts = text_inputs(spec, examples, text_fields)
    max_length = max_sequence_length(model, tokenizer, max_length)
    # token_type_ids only for models with more than one token type (BERT, not RoBERTa)
    inputs = {"input_ids", "attention_mask"} | (
        {"token_type_ids"} if getattr(model.config, "type_vocab_size", 2) > 1 else set()
    )

    def batches():
        for start in range(0, len(texts[0]), batch_size):
            enc = tokenizer(
                *[t[start : start + batch_size] for t in texts],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            yield {k: v for k, v in enc.items() if k in inputs}

    return predict_logits(model, batches(), total=len(texts[0]), desc=f"glue/{spec.name}" if progress else None)


def references_of(spec: GlueTask, examples, label_field: str | None = None) -> np.ndarray:
    field = label_field or spec.label_field
    columns = examples.column_names if hasattr(examples, "column_names") else list(examples[0]) if len(examples) else []
    if field not in columns:
        raise ValueError(f"{spec.name}: label field {field!r} is not in the data (it has: {', '.join(columns)})")
    values = examples[field] if hasattr(examples, "column_names") else [example[field] for example in examples]
    labels = np.asarray(values, dtype=np.float64 if spec.is_regression else np.int64)
    if not spec.is_regression and (labels < 0).any():
        raise ValueError(
            f"{spec.name}: {int((labels < 0).sum())} examples have label -1 (GLUE test splits "
            f"are unlabeled): evaluate on a validation split"
        )
    return labels


def evaluate_glue(
    model,
    tokenizer,
    task: str | GlueTask,
    examples,
    batch_size: int = 32,
    max_length: int | None = None,
    text_fields: Sequence[str] | None = None,
    label_field: str | None = None,
    progress: bool = False,
) -> dict:
    """{"task", "n", "metrics", "main_metric", "main", "outputs" (np.ndarray), "seconds"}."""
    spec = task if isinstance(task, GlueTask) else glue_task(task)
    refs = references_of(spec, examples, label_field)
    start = time.time()
    outputs = predict(model, tokenizer, spec, examples, batch_size, max_length, text_fields, progress)
    if outputs.shape[-1] != spec.num_labels:
        raise ValueError(
            f"{spec.name} needs {spec.num_labels} output(s) per example, the model "
            f"gives {outputs.shape[-1]} (config.num_labels)"
        )
    metrics = compute_metrics(spec, outputs, refs)
    return {
        "task": spec.name,
        "n": int(len(refs)),
        "metrics": metrics,
        "main_metric": spec.metric,
        "main": metrics[spec.metric],
        "outputs": outputs,
        "seconds": round(time.time() - start, 3),
    }


# --------------------------------------------------------------------------- tables


def format_table(results: Sequence[dict], by_task: bool = False) -> str:
    """A text table of result dicts (eval/glue.py's JSON), values x100 with one decimal.

    Default, as the paper's Table 5: one row per run (`name`), one column per task with
    its main metric, and an Avg column (mean over the tasks in that row). by_task=True
    transposes it: one row per task (and its metric), one column per run, an Avg row.
    """
    runs: dict[str, dict[str, float]] = {}
    for res in results:
        name = res.get("name") or "run"
        runs.setdefault(name, {})[res["task"]] = float(res["main"])
    tasks = [t for t in TABLE_ORDER if any(t in row for row in runs.values())]
    tasks += sorted({t for row in runs.values() for t in row} - set(tasks))

    def cell(value):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"

    def avg(values):
        values = [v for v in values if v is not None and not math.isnan(v)]
        return sum(values) / len(values) if values else None

    def title(task):
        spec = GLUE_TASKS.get(task)
        return f"{spec.display} ({METRIC_NAMES[spec.metric]})" if spec else task

    def avg_cell(row):  # "*": averaged over fewer tasks than the table shows
        return cell(avg([row.get(t) for t in tasks])) + ("*" if any(t not in row for t in tasks) else "")

    if not by_task:
        header = ["Run"] + [title(t) for t in tasks] + ["Avg"]
        body = [[name] + [cell(row.get(t)) for t in tasks] + [avg_cell(row)] for name, row in runs.items()]
    else:
        header = ["Task"] + list(runs)
        body = [[title(t)] + [cell(row.get(t)) for row in runs.values()] for t in tasks]
        body.append(["Avg"] + [avg_cell(row) for row in runs.values()])
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    lines = [
        " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header] + body
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    if any(any(t not in row for t in tasks) for row in runs.values()):
        lines.append("* averaged over the tasks that run has")
    return "\n".join(lines)
