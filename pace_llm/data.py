"""Data for the trainer: loading through `datasets`, prompt/answer formatting with the
model's chat template, answer-only labels, padding-aware collation, stable sample ids.

Sources: a local .jsonl/.json/.csv/.parquet file, a hub id (with `data.hub_config`), or
`tiny:arithmetic|sentences|images` (generated rows for smoke runs). A sample's id is its row index in the
source, so it is stable across shuffling, ranks and resumes (the PACE_fast cache key).
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch

# suffix -> datasets builder (a .json file may hold JSON lines or one list of objects)
_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    pass


def render_prompt(tokenizer, user_text: str) -> str:
    """The text a model sees before its answer: the chat template with the generation
    prompt when the tokenizer has one (Phi-3, SmolLM2, ...), else the plain text.
    Training and evaluation both call this, so they cannot drift apart."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                             tokenize=False, add_generation_prompt=True)
    return user_text


def load_rows(source: str, split: str = "train", hub_config: Optional[str] = None,
              limit: Optional[int] = None, seed: int = 0) -> datasets.Dataset:
    """Rows of a local .jsonl/.json/.csv/.tsv/.parquet file, a hub dataset (`split`,
    `hub_config`) or `tiny:*` (generated from `seed`), each with its `sample_id`; the first
    `limit` only when given. Training and every eval/*.py entry point load through this."""
    if source.startswith("tiny:"):
        from . import tiny
        generators = {"tiny:arithmetic": tiny.tiny_arithmetic, "tiny:sentences": tiny.tiny_sentences,
                      "tiny:images": tiny.tiny_images}
        if source not in generators:
            raise DataError(f"unknown generated data {source!r}; available: {', '.join(generators)}")
        rows = datasets.Dataset.from_list(generators[source](64 if split == "train" else 16,
                                                             seed=seed + (split != "train")))
    elif Path(source).suffix in _FILE_FORMATS:
        if not Path(source).exists():
            raise DataError(f"data file {source} does not exist")
        options = {"delimiter": "\t"} if Path(source).suffix == ".tsv" else {}
        rows = datasets.load_dataset(_FILE_FORMATS[Path(source).suffix], data_files=source, split="train",
                                     **options)
    else:
        rows = datasets.load_dataset(source, hub_config, split=split)
    rows = rows.add_column("sample_id", list(range(len(rows))))
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def _require_fields(rows: datasets.Dataset, fields, source: str) -> None:
    missing = [f for f in fields if f not in rows.column_names]
    if missing:
        raise DataError(f"field {missing[0]!r} is missing from the data {source} "
                        f"(it has: {', '.join(rows.column_names)})")


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def tokenize_sft(rows: datasets.Dataset, tokenizer, prompt_template: str, answer_field: str,
                 max_length: int, source: str = "") -> datasets.Dataset:
    """input_ids = prompt + answer; labels = -100 on the prompt (loss on the answer only)."""
    _require_fields(rows, template_fields(prompt_template) + [answer_field], source)
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

    out = rows.map(encode, remove_columns=[c for c in rows.column_names if c != "sample_id"],
                   desc="tokenizing")
    # A sample truncated to its prompt has nothing to learn from; its id is simply unused.
    return out.filter(lambda r: any(x != -100 for x in r["labels"][1:]), desc="dropping empty answers")


def tokenize_classification(rows: datasets.Dataset, tokenizer, text_fields: list[str], label_field: str,
                            max_length: int, source: str = "") -> datasets.Dataset:
    _require_fields(rows, list(text_fields) + [label_field], source)

    def encode(batch):
        enc = tokenizer(*[batch[f] for f in text_fields], truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "labels": batch[label_field]}

    return rows.map(encode, batched=True, remove_columns=[c for c in rows.column_names if c != "sample_id"],
                    desc="tokenizing")


def pixel_values(image, image_size: int) -> np.ndarray:
    """One image (PIL, or uint8 array [H, W] / [H, W, C]) -> float32 [3, size, size]: resized
    (bilinear), scaled to [-1, 1] (ViT's 0.5/0.5 normalisation). Training and eval/vision.py
    both call this, so they cannot drift apart."""
    if hasattr(image, "convert") and getattr(image, "mode", "RGB") not in ("RGB", "L"):
        image = image.convert("RGB")  # palette / RGBA / CMYK PIL images: not their raw bands
    x = torch.from_numpy(np.array(image, dtype=np.float32))  # a writable copy
    x = x.unsqueeze(-1) if x.dim() == 2 else x  # H, W, C
    x = x.permute(2, 0, 1).unsqueeze(0).expand(1, 3, -1, -1) if x.shape[-1] == 1 else x.permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x / 255.0, size=(image_size, image_size), mode="bilinear",
                                        align_corners=False)[0]
    return ((x - 0.5) / 0.5).numpy()


def prepare_images(rows: datasets.Dataset, image_field: str, label_field: str, image_size: int,
                   source: str = "") -> datasets.Dataset:
    """pixel_values: resized to image_size², scaled to [-1, 1] (ViT's 0.5/0.5 normalisation)."""
    _require_fields(rows, [image_field, label_field], source)

    def encode(batch):
        return {"pixel_values": [pixel_values(image, image_size) for image in batch[image_field]],
                "labels": batch[label_field]}

    return rows.map(encode, batched=True, remove_columns=[c for c in rows.column_names if c != "sample_id"],
                    desc="images")


class Collator:
    """Right-pads token rows (labels with -100) and stacks images; keeps sample ids."""

    def __init__(self, pad_token_id: int = 0):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        batch = {"sample_id": torch.tensor([r["sample_id"] for r in rows])}
        if "pixel_values" in rows[0]:
            batch["pixel_values"] = torch.tensor(np.stack([r["pixel_values"] for r in rows]))
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
            return batch
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        batch.update(input_ids=ids, attention_mask=mask)
        if isinstance(rows[0]["labels"], list):
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch
