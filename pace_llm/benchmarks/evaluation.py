"""What every evaluation entry point shares: the result files, and classification
prediction (a model with its task head; batched logits in example order).

    write_results("out/eval.json", summary, samples)      # + out/eval.samples.jsonl
    model = load_classifier(AutoModelForImageClassification, "base", adapter="out/adapter")
    logits = predict_logits(model, batches, total=len(examples))

eval/gsm8k.py, eval/glue.py, eval/vision.py and launch/demo.py write through
`write_results`; GLUE (pace_llm.benchmarks.glue.predict) and vision (`predict_images`) predict
through `predict_logits`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from pace_llm.core.adapters import HEAD_NAMES


class ModelError(ValueError):
    """The model does not fit the evaluation (label count, no trained head)."""


def write_results(path, summary: dict, samples: Iterable[dict] | None = None, kind: str = "samples") -> Path | None:
    """FILE.json (the summary) and, with samples, FILE.<kind>.jsonl (one record a line);
    returns the JSONL's path, or None without samples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    if samples is None:
        return None
    samples_path = path.with_name(f"{path.stem}.{kind}.jsonl")
    with samples_path.open("w") as f:
        for record in samples:
            f.write(json.dumps(record) + "\n")
    return samples_path


# --------------------------------------------------------------------------- classifiers


def adapter_head_shape(adapter_dir) -> tuple[int, ...] | None:
    """(num_labels, inputs) of the task head (HEAD_NAMES) saved in an adapter folder: of its
    2-D weights the one with the fewest outputs, the head's last layer (ViT: its only layer;
    RoBERTa: out_proj after the hidden-sized dense); None when the folder holds no head."""
    from safetensors import safe_open

    shapes = []
    for name in ("pace_adapter.safetensors", "adapter_model.safetensors"):
        file = Path(adapter_dir, name)
        if file.exists():
            with safe_open(str(file), "pt") as fh:
                shapes += [
                    tuple(fh.get_slice(key).get_shape())
                    for key in fh.keys()
                    if key.endswith("weight") and any(h in key for h in HEAD_NAMES)
                ]
    return min((s for s in shapes if len(s) == 2), default=None)


def load_classifier(
    auto_class,
    model,
    adapter=None,
    num_labels: int | None = None,
    dtype: str = "float32",
    device: str | None = None,
    require_head: bool = True,
):
    """A classifier in eval mode on `device` (default: cuda when available, else cpu).

    model: a merged/saved classifier folder, whose label count must be `num_labels` when
    given; or, with `adapter` (pace_llm.save_adapter), the base model, built with
    `num_labels` outputs (default: the adapter's head's) and the adapter applied by
    pace_llm.load_adapter. The trained head comes from the adapter; an adapter without one
    is a ModelError when require_head, else a warning (the base's head is used).
    """
    import torch

    from pace_llm.export import load_adapter

    dtype = getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if adapter:
        shape = adapter_head_shape(adapter)
        if shape is None:
            message = (
                f"{adapter} carries no classification head ({'/'.join(HEAD_NAMES)} weights): "
                f"the base model's head is untrained (save adapters with the head: pace.train_head)"
            )
            if require_head:
                raise ModelError(message)
            warnings.warn(message + "; using it anyway", stacklevel=2)
        sizes = {"num_labels": num_labels or shape[0]} if num_labels or shape else {}
        # The base's own head, if any, may have another label count: it is replaced by the adapter's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = auto_class.from_pretrained(model, dtype=torch.float32, ignore_mismatched_sizes=True, **sizes)
        classifier = load_adapter(base, adapter).to(dtype)
    else:
        classifier = auto_class.from_pretrained(model, dtype=dtype)
        if num_labels is not None and classifier.config.num_labels != num_labels:
            raise ModelError(f"{model} has {classifier.config.num_labels} labels, the task needs {num_labels}")
    return classifier.eval().to(device)


def predict_logits(model, batches: Iterable[dict], total: int | None = None, desc: str | None = None) -> np.ndarray:
    """The model's logits for each batch of inputs (a dict of tensors, moved to the model's
    device), in order, as fp32 numpy [N, num_labels]; a progress bar over `total` examples
    when `desc` is given."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()
    outputs = []
    with torch.inference_mode(), tqdm(total=total, desc=desc, unit="ex", disable=desc is None) as bar:
        for inputs in batches:
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
            outputs.append(logits.float().cpu().numpy())
            bar.update(len(logits))
    return np.concatenate(outputs) if outputs else np.zeros((0, model.config.num_labels), np.float32)


def predict_images(
    model, examples, image_field: str, image_size: int, batch_size: int, augment: str = "none"
) -> np.ndarray:
    """Logits of an image classifier over `examples` (a datasets.Dataset), preprocessed as
    training's held-out batches (tasks.images.image_pixels: resize, plus the centre crop
    when the model was trained with `augment`), batch by batch."""
    import torch

    from pace_llm.tasks.images import image_pixels

    def batches():
        for start in range(0, len(examples), batch_size):
            images = examples[start : start + batch_size][image_field]
            yield {"pixel_values": torch.from_numpy(np.stack([image_pixels(im, image_size, augment) for im in images]))}

    return predict_logits(model, batches(), total=len(examples))


def top1_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """{"top1", "nll" (mean negative log-likelihood of the labels), "per_class" (top-1 per label)}."""
    preds = logits.argmax(-1)
    log_probs = logits - np.logaddexp.reduce(logits.astype(np.float64), axis=-1, keepdims=True)
    return {
        "top1": float(np.mean(preds == labels)),
        "nll": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "per_class": {int(c): float(np.mean(preds[labels == c] == c)) for c in np.unique(labels)},
    }
