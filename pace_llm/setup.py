"""Building the pieces a run needs from its recipe: tokenizer, base model, datasets."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from .data import DataError, load_rows, prepare_images, tokenize_classification, tokenize_sft

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_CLASSES = {"causal_lm": transformers.AutoModelForCausalLM,
                "seq_cls": transformers.AutoModelForSequenceClassification,
                "image_cls": transformers.AutoModelForImageClassification}


def materialize_tiny(name: str, folder: Path, num_labels=None) -> Path:
    """`tiny:phi3` etc.: a deterministic tiny model (+ tokenizer) saved once by rank 0, so
    every path after this (ZeRO-3 partitioned loading, QLoRA, export) is from_pretrained."""
    from .export import atomic_dir
    from .tiny import tiny_model, tiny_tokenizer
    if dist.get_rank() == 0 and not (folder / "config.json").exists():
        kind = name.split(":", 1)[1]
        overrides = {"num_labels": num_labels} if num_labels else {}
        tokenizer = None if kind == "vit" else tiny_tokenizer()
        if kind in ("phi3", "llama"):  # generated ids must decode; eos must be the tokenizer's
            overrides.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        elif kind == "roberta":  # position ids skip the padding id: it must be the tokenizer's
            overrides.update(pad_token_id=tokenizer.pad_token_id)
        with atomic_dir(folder) as tmp:
            tiny_model(kind, **overrides).save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    dist.barrier()
    return folder


def load_base(recipe, source) -> torch.nn.Module:
    m = recipe.model
    kwargs = {"dtype": DTYPES[m.dtype]}
    if m.task != "causal_lm":
        kwargs.update(num_labels=m.num_labels, ignore_mismatched_sizes=True)
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.quantization:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=m.quantization == "nf4", load_in_8bit=m.quantization == "int8",
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[m.dtype])
    return AUTO_CLASSES[m.task].from_pretrained(source, **kwargs)


def build_model(recipe, out: Path):
    """(tokenizer or None, base model, the source folder/hub id the base came from)."""
    source = recipe.model.name
    if source.startswith("tiny:"):
        source = materialize_tiny(source, out / "tiny-base", recipe.model.num_labels)
    tokenizer = None
    if recipe.model.task != "image_cls":
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, load_base(recipe, source), source


def build_datasets(recipe, tokenizer):
    """(train, eval or None), tokenized for the recipe's task; fields checked by name."""
    d, task = recipe.data, recipe.model.task

    def prepare(source, split, limit):
        rows = load_rows(source, split, d.hub_config, limit, seed=recipe.train.seed)
        if task == "causal_lm":
            return tokenize_sft(rows, tokenizer, d.prompt_template, d.answer_field, d.max_length, source)
        if task == "seq_cls":
            return tokenize_classification(rows, tokenizer, d.text_fields, d.label_field, d.max_length, source)
        return prepare_images(rows, d.image_field, d.label_field, d.image_size, source)

    train = prepare(d.train, d.train_split, d.limit)
    if len(train) == 0:
        raise DataError(f"no training samples left in {d.train} (all answers truncated by "
                        f"data.max_length={d.max_length}?)")
    return train, prepare(d.eval, d.eval_split, d.eval_limit) if d.eval else None
