"""Sequence classification (GLUE-style): one text or a pair (`data.text_fields`) and a
label (`data.label_field`); PACE regularises the head's logits (SampleOutputs). A
one-output head (`model.num_labels: 1`) is regression with an MSE loss (STS-B)."""

from __future__ import annotations

import datasets
import torch
import transformers

from pace_llm.core.outputs import SampleOutputs
from pace_llm.data import DataError
from pace_llm.tasks.base import Task, encoded_columns, pad_tokens, require_fields


def tokenize_classification(
    examples: datasets.Dataset, tokenizer, text_fields: list[str], label_field: str, max_length: int, source: str = ""
) -> datasets.Dataset:
    require_fields(examples, list(text_fields) + [label_field], source)

    def encode(batch):
        enc = tokenizer(*[batch[f] for f in text_fields], truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "labels": batch[label_field]}

    return examples.map(encode, batched=True, remove_columns=encoded_columns(examples), desc="tokenizing")


class SequenceClassificationTask(Task):
    name = "seq_cls"
    auto_class = transformers.AutoModelForSequenceClassification
    needs_num_labels = True

    def __init__(self, recipe, tokenizer=None):
        super().__init__(recipe, tokenizer)
        self.outputs = SampleOutputs(regression=recipe.model.num_labels == 1)

    def model_kwargs(self):
        return {"num_labels": self.model_section.num_labels, "ignore_mismatched_sizes": True}

    def sample_field(self, data):
        return None if self.outputs.regression else data.label_field

    def encode(self, examples, source, data=None):
        d = data or self.data
        require_fields(examples, [d.label_field], source)
        if not self.outputs.regression:  # out of range: a device-side assert on a GPU, garbage on CPU
            n = self.model_section.num_labels
            for row, label in enumerate(examples[d.label_field], 1):
                if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n:
                    raise DataError(
                        f"data {source}, row {row}, field {d.label_field!r}: label {label!r} is not a class "
                        f"index in [0, {n}) (model.num_labels={n})"
                    )
        return tokenize_classification(examples, self.tokenizer, d.text_fields, d.label_field, d.max_length, source)

    def collate(self, samples, train=False):
        return {**pad_tokens(samples, self.pad_id), "labels": torch.tensor([s["labels"] for s in samples])}

    def count_tokens(self, batch):
        return int(batch["attention_mask"].sum())
