"""Examples (raw records) for training and evaluation: one loader (`load_examples`, through
`datasets`), the prompt rendering training and generation share, and image pixels. How
examples become samples and batches is each task kind's (pace_llm/tasks/).

Sources: a local .jsonl/.json/.csv/.parquet file, a hub id (with `data.hub_config`), or
`tiny:arithmetic|sentences|images` (generated examples for smoke runs). A sample's id is its
example's index (a file's row) in the source, so it is stable across shuffling, ranks and
resumes (the PACE_fast cache key).
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


COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # datasets reads these compressed files as they are


def file_format(source: str) -> str | None:
    """The datasets builder of a local data file by its suffix (any case, compressed too:
    train.JSONL, train.jsonl.gz), or None for a hub id."""
    suffixes = [s.lower() for s in Path(source).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _FILE_FORMATS.get(suffixes[-1]) if suffixes else None


class DataError(ValueError):
    pass


def render_prompt(tokenizer, user_text: str) -> str:
    """The text a model sees before its answer: the chat template with the generation
    prompt when the tokenizer has one (Phi-3, SmolLM2, ...), else the plain text.
    Training and evaluation both call this, so they cannot drift apart."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text


def load_examples(
    source: str, split: str = "train", hub_config: Optional[str] = None, limit: Optional[int] = None, seed: int = 0
) -> datasets.Dataset:
    """Examples of a local .jsonl/.json/.csv/.tsv/.parquet file, a hub dataset (`split`,
    `hub_config`) or `tiny:*` (generated from `seed`), each with its `sample_id`; the first
    `limit` only when given. Training and every eval/*.py entry point load through this."""
    if source.startswith("tiny:"):
        from pace_llm.assets import tiny

        generators = {
            "tiny:arithmetic": tiny.tiny_arithmetic,
            "tiny:sentences": tiny.tiny_sentences,
            "tiny:images": tiny.tiny_images,
        }
        if source not in generators:
            raise DataError(f"unknown generated data {source!r}; available: {', '.join(generators)}")
        examples = datasets.Dataset.from_list(
            generators[source](64 if split == "train" else 16, seed=seed + (split != "train"))
        )
    elif builder := file_format(source):
        if not Path(source).exists():
            raise DataError(f"data file {source} does not exist")
        options = {"delimiter": "\t"} if ".tsv" in [s.lower() for s in Path(source).suffixes] else {}
        try:
            examples = datasets.load_dataset(builder, data_files=source, split="train", **options)
        except (datasets.exceptions.DatasetGenerationError, ValueError) as err:  # ValueError: pyarrow's
            if builder == "json" and Path(source).suffix.lower() in (".json", ".jsonl"):
                check_json_lines(source)  # names the line; datasets' error does not
            cause = err.__cause__ or err  # e.g. a column whose type changes between rows
            raise DataError(f"data file {source} could not be read as {builder}: {cause}") from None
    else:
        try:
            examples = datasets.load_dataset(source, hub_config, split=split)
        except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
            raise DataError(
                f"data {source!r} is neither a local file (.jsonl, .json, .csv, .tsv, .parquet, optionally "
                f"{'/'.join(COMPRESSIONS)}) nor a hub dataset that can be loaded here: {err}"
            ) from None
    if "sample_id" in examples.column_names:
        raise DataError(
            f"data {source} has a column 'sample_id', the name pace-llm gives each example's index "
            "(the PACE_fast cache key): rename that column"
        )
    examples = examples.add_column("sample_id", list(range(len(examples))))
    return examples.select(range(min(limit, len(examples)))) if limit else examples


def check_json_lines(path: str) -> None:
    """A DataError naming the first line of a JSON-lines file that is not a JSON object."""
    import json

    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON list, not lines
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"data file {path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
            ) from None
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"data file {path}, line {number}: not valid JSON ({err.msg}, column {err.colno})"
            ) from None
        if not isinstance(value, dict):
            raise DataError(
                f"data file {path}, line {number}: expected a JSON object (one row), got {type(value).__name__}"
            )


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def pixel_values(image, image_size: int) -> np.ndarray:
    """One image (PIL, or uint8 array [H, W] / [H, W, C]) -> float32 [3, size, size]: resized
    (bilinear), scaled to [-1, 1] (ViT's 0.5/0.5 normalisation). Training and eval/vision.py
    both call this, so they cannot drift apart."""
    if hasattr(image, "convert") and getattr(image, "mode", "RGB") not in ("RGB", "L"):
        image = image.convert("RGB")  # palette / RGBA / CMYK PIL images: not their raw bands
    x = torch.from_numpy(np.array(image, dtype=np.float32))  # a writable copy
    x = x.unsqueeze(-1) if x.dim() == 2 else x  # H, W, C
    x = x[..., :3] if x.shape[-1] == 4 else x  # RGBA arrays: the colour, not the alpha band
    x = x.permute(2, 0, 1).unsqueeze(0).expand(1, 3, -1, -1) if x.shape[-1] == 1 else x.permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x / 255.0, size=(image_size, image_size), mode="bilinear", align_corners=False)[
        0
    ]
    return ((x - 0.5) / 0.5).numpy()
