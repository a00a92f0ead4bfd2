"""The interface every task kind implements, and what they share.

A task kind says how a recipe's examples (raw records) become training samples and batches,
which transformers Auto class builds the model, and what PACE regularises (its `outputs`:
pace_llm/core/outputs.py). The trainer, the objectives and the cache only call these methods,
and the recipe checks (config.validate) read its capability flags, so a new task is one
module with a subclass, a line in tasks/__init__.py and a recipe.
"""

from __future__ import annotations

import math
from typing import ClassVar

import datasets
import numpy as np
import torch

from pace_llm.config import DataSource
from pace_llm.data import DataError, load_examples
from pace_llm.models import load_base


class Task:
    name: ClassVar[str]
    auto_class: ClassVar[type]  # e.g. transformers.AutoModelForCausalLM
    # capabilities, read by the trainer and the recipe checks instead of tests of the kind's name
    uses_tokenizer: ClassVar[bool] = True  # False: the model takes no text (no tokenizer is loaded)
    supports_packing: ClassVar[bool] = False  # data.packing may be set (collate packs samples into rows)
    needs_num_labels: ClassVar[bool] = False  # model.num_labels is required (a classification head)

    def __init__(self, recipe, tokenizer=None):
        self.model_section, self.data, self.seed = recipe.model, recipe.data, recipe.train.seed
        self.tokenizer = tokenizer  # None for kinds that use none (images)
        self.sources_by_id: list[tuple[int, int, str]] = []  # (first id, end, source): source_of

    # --- what each kind defines ------------------------------------------------------
    outputs = None  # TokenOutputs() or SampleOutputs(...): f, the task loss, the cache row width

    def encode(self, examples: datasets.Dataset, source: str, data=None) -> datasets.Dataset:
        """Raw examples (with `sample_id`) -> encoded samples, fields checked by name; `data`:
        the recipe's data section with this source's own keys (default: self.data)."""
        raise NotImplementedError

    def collate(self, samples: list[dict], train: bool = False) -> dict:
        """Encoded samples -> a batch: model inputs, `labels`, `sample_id`. `train`: a
        training batch (the loader's), which may be augmented; held-out batches are not."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of each epoch (augmentations vary by epoch)."""

    def count_tokens(self, batch: dict) -> int:
        """What tokens/s counts in a batch (input tokens; images count one each)."""
        return len(batch["labels"])

    def model_kwargs(self) -> dict:
        return {}

    # --- shared ----------------------------------------------------------------------
    def load_model(self, source) -> torch.nn.Module:
        return load_base(self.model_section, source, self.auto_class, **self.model_kwargs())

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else pad

    def sample_field(self, data) -> str | None:
        """The column `data.sample` draws equally from (classifiers: the label), or None."""
        return None

    def load(self, source: DataSource, sample: int | None = None) -> tuple[datasets.Dataset, int]:
        """One source's encoded samples (`sample` examples of it, drawn with train.seed), and how
        many raw examples it had (its id block: a drawn example keeps its index as sample id)."""
        data = self.data.for_source(source)
        examples = load_examples(source.path, source.split, data.hub_config, source.limit, seed=self.seed)
        n_examples = len(examples)
        if sample is not None:
            examples = examples.select(
                sample_indices(examples, sample, self.seed, self.sample_field(data), source.path)
            )
        return self.encode(examples, source.path, data), n_examples

    def load_mixture(self, which: str) -> datasets.Dataset | None:
        """`data.train` / `data.eval` (one source or a weighted list) as one dataset.

        Each source gets its own block of sample ids: copy c of raw example i of source s is
        offset_s + c * examples_s + i, so ids are unique across sources and copies, and stable
        across epochs, ranks and resumes (the PACE_fast cache key); a single source (one
        copy) keeps the example's index. Weight w repeats a source floor(w) times per epoch plus
        a fraction of its samples drawn with train.seed."""
        sources = self.data.sources(which)
        if not sources:
            return None
        parts, offset = [], 0
        for index, source in enumerate(sources):
            samples, n_examples = self.load(source, self.data.sample if which == "train" else None)
            whole, fraction = int(source.weight), source.weight - int(source.weight)
            extra = round(fraction * len(samples))
            drawn = sorted(np.random.default_rng([self.seed, index]).choice(len(samples), extra, replace=False))
            copies = [list(range(len(samples)))] * whole + ([drawn] if extra else [])
            if not copies:
                raise DataError(
                    f"data.{which}[{index}].weight={source.weight:g} takes {source.weight:g} x {len(samples)} "
                    f"samples of {source.path}, which rounds to none: raise the weight or drop the source"
                )
            for c, picked in enumerate(copies):
                part = samples.select(picked) if len(picked) < len(samples) else samples
                if offset or c:
                    shift = offset + c * n_examples
                    part = part.map(lambda s: {"sample_id": s["sample_id"] + shift}, desc="sample ids")  # noqa: B023 (runs now)
                parts.append(part)
            self.sources_by_id.append((offset, offset + len(copies) * n_examples, source.path))
            offset += math.ceil(source.weight) * n_examples
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def source_of(self, sample_id: int) -> str:
        return next(path for lo, hi, path in self.sources_by_id if lo <= sample_id < hi)

    def datasets(self) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """(train, eval or None) from the recipe's data section."""
        self.sources_by_id = []
        train = self.load_mixture("train")
        if len(train) == 0:
            raise DataError(
                f"no training samples left in {self.data.train} (all answers truncated by "
                f"data.max_length={self.data.max_length}?)"
            )
        return train, self.load_mixture("eval")


def sample_indices(examples: datasets.Dataset, n: int, seed: int, by: str | None = None, source: str = "") -> list[int]:
    """`n` example indices drawn without replacement with `seed` (sorted); with `by`, n / k
    examples from each of the k values of that column (a class-balanced few-shot set)."""
    rng = np.random.default_rng(seed)
    if by is None:
        if n > len(examples):
            raise DataError(f"data.sample={n} is more than the {len(examples)} rows of {source}")
        return sorted(rng.choice(len(examples), n, replace=False).tolist())
    require_fields(examples, [by], source)
    labels = np.asarray(examples[by])
    classes = np.unique(labels)
    per, left = divmod(n, len(classes))
    if left:
        raise DataError(
            f"data.sample={n} does not split evenly over the {len(classes)} classes of "
            f"{by!r} in {source}: use a multiple of {len(classes)}"
        )
    picked = []
    for c in classes:
        of_class = np.flatnonzero(labels == c)
        if per > len(of_class):
            raise DataError(f"data.sample={n} needs {per} rows of class {c} in {source}, which has {len(of_class)}")
        picked += rng.choice(of_class, per, replace=False).tolist()
    return sorted(picked)


def require_fields(examples: datasets.Dataset, fields, source: str) -> None:
    missing = [f for f in fields if f not in examples.column_names]
    if missing:
        raise DataError(
            f"field {missing[0]!r} is missing from the data {source} (it has: {', '.join(examples.column_names)})"
        )


def encoded_columns(examples: datasets.Dataset) -> list[str]:
    """The raw columns an encoding drops: everything but the sample id."""
    return [c for c in examples.column_names if c != "sample_id"]


def pad_tokens(samples: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids, their attention mask and the sample ids."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
        mask[i, : len(s["input_ids"])] = 1
    return {"sample_id": torch.tensor([s["sample_id"] for s in samples]), "input_ids": ids, "attention_mask": mask}
