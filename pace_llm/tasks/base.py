"""The interface every task kind implements, and what they share.

A task kind says how a recipe's rows become training samples and batches, which
transformers Auto class builds the model, and what PACE regularises (its `rows`:
pace_llm/rows.py). The trainer, the objectives and the cache only call these methods,
so a new task is one module with a subclass, a line in tasks/__init__.py and a recipe.
"""
from __future__ import annotations

from typing import ClassVar

import datasets
import torch

from ..data import DataError, load_rows
from ..models import load_base


class Task:
    name: ClassVar[str]
    auto_class: ClassVar[type]           # e.g. transformers.AutoModelForCausalLM
    uses_tokenizer: ClassVar[bool] = True

    def __init__(self, recipe, tokenizer=None):
        self.model_section, self.data, self.seed = recipe.model, recipe.data, recipe.train.seed
        self.tokenizer = tokenizer  # None for kinds that use none (images)

    # --- what each kind defines ------------------------------------------------------
    rows = None  # TokenRows() or SampleRows(...): f, the task loss, cache rows

    def encode(self, rows: datasets.Dataset, source: str) -> datasets.Dataset:
        """Raw rows (with `sample_id`) -> encoded samples, fields checked by name."""
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        """Encoded samples -> a batch: model inputs, `labels`, `sample_id`."""
        raise NotImplementedError

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

    def load(self, source: str, split: str, limit=None) -> datasets.Dataset:
        rows = load_rows(source, split, self.data.hub_config, limit, seed=self.seed)
        return self.encode(rows, source)

    def datasets(self) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """(train, eval or None) from the recipe's data section."""
        d = self.data
        train = self.load(d.train, d.train_split, d.limit)
        if len(train) == 0:
            raise DataError(f"no training samples left in {d.train} (all answers truncated by "
                            f"data.max_length={d.max_length}?)")
        return train, self.load(d.eval, d.eval_split, d.eval_limit) if d.eval else None


def require_fields(rows: datasets.Dataset, fields, source: str) -> None:
    missing = [f for f in fields if f not in rows.column_names]
    if missing:
        raise DataError(f"field {missing[0]!r} is missing from the data {source} "
                        f"(it has: {', '.join(rows.column_names)})")


def encoded_columns(rows: datasets.Dataset) -> list[str]:
    """The raw columns an encoding drops: everything but the sample id."""
    return [c for c in rows.column_names if c != "sample_id"]


def pad_tokens(samples: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids, their attention mask and the sample ids."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
        mask[i, : len(s["input_ids"])] = 1
    return {"sample_id": torch.tensor([s["sample_id"] for s in samples]), "input_ids": ids,
            "attention_mask": mask}
