"""Causal-LM supervised fine-tuning on prompt/answer pairs or conversations (the formats
of tasks/data_formats.py); the loss and PACE's consistency cover the supervised tokens
only (TokenOutputs): by default every assistant turn with its end-of-turn token. With
`data.packing` a micro-batch's samples are packed into rows (pace_llm/core/packing.py) of
data.max_length tokens, or of train.micro_batch_tokens when micro-batches are a token budget
(pace_llm/core/token_batches.py), so that such a micro-batch is about one row."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
import transformers

from pace_llm.core.outputs import TokenOutputs
from pace_llm.core.packing import is_packed, pack
from pace_llm.data import DataError
from pace_llm.tasks.base import Task, pad_tokens
from pace_llm.tasks.data_formats import Conversation, PromptAnswer, choose_format, encode_examples


def tokenize_sft(
    examples: datasets.Dataset, tokenizer, prompt_template: str, answer_field: str, max_length: int, source: str = ""
) -> datasets.Dataset:
    """input_ids = prompt + answer; labels = -100 on the prompt (loss on the answer only)."""
    data = SimpleNamespace(prompt_template=prompt_template, answer_field=answer_field)
    return encode_examples(examples, PromptAnswer(data, tokenizer), max_length, source)[0]


def chat_template_text(value: str) -> str:
    """`data.chat_template`: a Jinja file (or the template itself, when it holds Jinja)."""
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise DataError(f"data.chat_template: the file {value} does not exist")


class CausalLMTask(Task):
    name = "causal_lm"
    auto_class = transformers.AutoModelForCausalLM
    outputs = TokenOutputs()
    supports_packing = True

    def __init__(self, recipe, tokenizer=None):
        super().__init__(recipe, tokenizer)
        self.encode_stats = {}  # source -> data_formats.EncodeStats (launch/inspect_data.py)
        self.row_capacity = recipe.train.micro_batch_tokens or self.data.max_length  # packed rows
        if tokenizer is not None and self.data.chat_template:
            # the exported tokenizer carries it too (save_pretrained), so vLLM serves the same format
            tokenizer.chat_template = chat_template_text(self.data.chat_template)

    def encode(self, examples, source, data=None):
        d = data or self.data
        fmt = choose_format(d, examples.column_names, source)
        if issubclass(fmt, Conversation) and not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                f"data {source}: format {fmt.name} needs a chat template, and the tokenizer of "
                f"{self.model_section.name} has none: set data.chat_template to a Jinja file"
            )
        samples, self.encode_stats[source] = encode_examples(
            examples, fmt(d, self.tokenizer), d.max_length, source, skip_invalid=d.skip_invalid
        )
        return samples

    def collate(self, samples, train=False):
        if self.data.packing:  # rows of up to row_capacity tokens, no padding but their tails
            return pack(samples, self.row_capacity, self.pad_id)
        batch = pad_tokens(samples, self.pad_id)
        labels = torch.full_like(batch["input_ids"], -100)
        for i, s in enumerate(samples):
            labels[i, : len(s["labels"])] = torch.tensor(s["labels"])
        return {**batch, "labels": labels}

    def count_tokens(self, batch):
        if is_packed(batch):
            return int((batch["segment_index"] >= 0).sum())
        return int(batch["attention_mask"].sum())
