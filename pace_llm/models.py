"""Loading the base model and tokenizer a recipe names: a hub id, a local folder, or
`tiny:{phi3,llama,roberta,vit}` (a deterministic tiny model for smoke runs and tests)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from pace_llm.core import segment_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def materialize_tiny(name: str, folder: Path, num_labels=None) -> Path:
    """`tiny:phi3` etc.: a deterministic tiny model (+ tokenizer) saved once by rank 0, so
    every path after this (ZeRO-3 partitioned loading, QLoRA, export) is from_pretrained."""
    from pace_llm.assets.tiny import tiny_model, tiny_tokenizer
    from pace_llm.files import atomic_dir

    if dist.get_rank() == 0 and not (folder / "config.json").exists():
        kind = name.split(":", 1)[1]
        overrides = {"num_labels": num_labels} if num_labels else {}
        tokenizer = None if kind == "vit" else tiny_tokenizer()
        if kind in ("phi3", "llama"):  # generated ids must decode; eos must be the tokenizer's
            overrides.update(
                vocab_size=len(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        elif kind == "roberta":  # position ids skip the padding id: it must be the tokenizer's
            overrides.update(pad_token_id=tokenizer.pad_token_id)
        with atomic_dir(folder) as tmp:
            tiny_model(kind, **overrides).save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    dist.barrier()
    return folder


def model_source(model_section, out: Path) -> str | Path:
    """Where from_pretrained reads the base: the recipe's name, or the tiny model's folder."""
    name = model_section.name
    if name.startswith("tiny:"):
        return materialize_tiny(name, out / "tiny-base", model_section.num_labels)
    return name


@contextlib.contextmanager
def named_source(source, what: str):
    """Turns transformers' OSError for a missing folder or an unreachable hub id into a
    RecipeError that names model.name (exit 2, no traceback)."""
    from pace_llm.config import RecipeError

    if str(source).startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
        raise RecipeError(f"model.name={str(source)!r}: no such folder")
    try:
        yield
    except OSError as err:
        raise RecipeError(f"model.name={str(source)!r}: cannot load its {what}: {err}") from None


def load_tokenizer(source):
    with named_source(source, "tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_section, source, auto_class, **task_kwargs) -> torch.nn.Module:
    """`auto_class.from_pretrained` with the recipe's dtype, attention and quantization."""
    m = model_section
    kwargs = {"dtype": DTYPES[m.dtype], **task_kwargs}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.attn_implementation == segment_attention.NAME:
        segment_attention.register()
    if m.quantization:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=m.quantization == "nf4",
            load_in_8bit=m.quantization == "int8",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=DTYPES[m.dtype],
        )
    with named_source(source, "weights"):
        return auto_class.from_pretrained(source, **kwargs)
