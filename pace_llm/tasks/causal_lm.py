"""Causal-LM supervised fine-tuning: a prompt (the model's chat template around
`data.prompt_template`) and an answer (`data.answer_field`); the loss and PACE's
consistency cover the answer tokens only (TokenRows)."""
from __future__ import annotations

import datasets
import torch
import transformers

from ..data import DataError, render_prompt, template_fields
from ..rows import TokenRows
from .base import Task, encoded_columns, pad_tokens, require_fields


def tokenize_sft(rows: datasets.Dataset, tokenizer, prompt_template: str, answer_field: str,
                 max_length: int, source: str = "") -> datasets.Dataset:
    """input_ids = prompt + answer; labels = -100 on the prompt (loss on the answer only)."""
    require_fields(rows, template_fields(prompt_template) + [answer_field], source)
    chat = bool(getattr(tokenizer, "chat_template", None))

    def encode(row):
        user = prompt_template.format(**row)
        prompt = render_prompt(tokenizer, user)
        if chat:
            full = tokenizer.apply_chat_template(
                [{"role": "user", "content": user}, {"role": "assistant", "content": row[answer_field]}],
                tokenize=False)
            if not full.startswith(prompt):
                raise DataError("the chat template's prompt is not a prefix of prompt+answer; "
                                "cannot mask the prompt tokens")
            answer = full[len(prompt):]
        else:
            answer = row[answer_field] + (tokenizer.eos_token or "")
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's
        # (bos), exactly as generation.encode_prompts does at evaluation time.
        p_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = (p_ids + a_ids)[:max_length]
        labels = ([-100] * len(p_ids) + a_ids)[:max_length]
        return {"input_ids": ids, "labels": labels}

    out = rows.map(encode, remove_columns=encoded_columns(rows), desc="tokenizing")
    # A sample truncated to its prompt has nothing to learn from; its id is simply unused.
    return out.filter(lambda r: any(x != -100 for x in r["labels"][1:]), desc="dropping empty answers")


class CausalLMTask(Task):
    name = "causal_lm"
    auto_class = transformers.AutoModelForCausalLM
    rows = TokenRows()

    def encode(self, rows, source):
        d = self.data
        return tokenize_sft(rows, self.tokenizer, d.prompt_template, d.answer_field, d.max_length, source)

    def collate(self, samples):
        batch = pad_tokens(samples, self.pad_id)
        labels = torch.full_like(batch["input_ids"], -100)
        for i, s in enumerate(samples):
            labels[i, : len(s["labels"])] = torch.tensor(s["labels"])
        return {**batch, "labels": labels}

    def count_tokens(self, batch):
        return int(batch["attention_mask"].sum())
