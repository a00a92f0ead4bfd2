"""Image classification (ViT): an image (`data.image_field`) and a label; PACE regularises
the head's logits (SampleOutputs).

Pixels are made at collation, not stored: the dataset keeps the images as they came
(uint8), and each batch is resized to `data.image_size`² and scaled to [-1, 1] (ViT's
0.5/0.5 normalisation). `data.augment: crop_flip` is the authors' few-shot transform:
resize to ⌈size·8/7⌉ (256 for 224), a random size² crop and a horizontal flip with
probability 1/2 in training; resize and the centre crop at evaluation. A training
sample's crop and flip come from (seed, epoch, sample id) alone, so they differ from epoch
to epoch, are the same on any rank and world size, and replay exactly on resume; the two
halves of a paired PACE forward are copies of one batch, so they see the same image.
"""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers

from pace_llm.core.outputs import SampleOutputs
from pace_llm.data import DataError, pixel_values
from pace_llm.tasks.base import Task, require_fields

AUGMENTATIONS = ("none", "crop_flip")


def prepare_images(
    examples: datasets.Dataset, image_field: str, label_field: str, source: str = ""
) -> datasets.Dataset:
    """The images as they are (read as numpy arrays, or files given by path) and their labels,
    fields checked by name and every image checked before training: a missing one, a path that
    does not exist, an array that is not [H, W] or [H, W, 1|3|4] stops with the row named."""
    require_fields(examples, [image_field, label_field], source)
    out = examples.select_columns([image_field, label_field, "sample_id"])
    if image_field != "image":
        out = out.rename_column(image_field, "image")
    if label_field != "labels":
        out = out.rename_column(label_field, "labels")

    def bad(row: int, problem: str) -> DataError:
        return DataError(f"data {source}, row {row}, field {image_field!r}: {problem}")

    feature = out.features["image"]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):  # paths
        for row, path in enumerate(out["image"], 1):
            if path is None or not Path(path).is_file():
                raise bad(row, "no image" if path is None else f"image file {path} does not exist")
        return out.cast_column("image", datasets.Image())
    if isinstance(feature, datasets.Image):
        undecoded = out.cast_column("image", datasets.Image(decode=False))["image"]  # no PIL decode of all
        for row, image in enumerate(undecoded, 1):
            if image is None:
                raise bad(row, "no image (null)")
        return out  # PIL images: pixel_values converts palette / RGBA / CMYK modes itself
    out = out.with_format("numpy", columns=["image"], output_all_columns=True)  # arrays, not nested lists
    for row, example in enumerate(out, 1):
        image = example["image"]
        if image is None or getattr(image, "dtype", np.dtype("O")).kind == "O":
            raise bad(row, "no image (null), or rows of unequal sizes")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))):
            raise bad(row, f"an array of shape {tuple(image.shape)}; expected [H, W] or [H, W, 1|3|4 channels]")
    return out


def image_pixels(image, size: int, augment: str = "none", generator: torch.Generator | None = None) -> np.ndarray:
    """float32 [3, size, size] of one image: resized (augment none), or resized larger and
    cropped, randomly with `generator` (training) or in the centre (evaluation)."""
    if augment == "none":
        return pixel_values(image, size)
    big = math.ceil(size * 8 / 7)
    x = pixel_values(image, big)
    if generator is None:
        top = left = (big - size) // 2
        flip = False
    else:
        top, left = torch.randint(0, big - size + 1, (2,), generator=generator).tolist()
        flip = bool(torch.rand((), generator=generator) < 0.5)
    x = x[:, top : top + size, left : left + size]
    return np.ascontiguousarray(x[:, :, ::-1] if flip else x)


class ImageClassificationTask(Task):
    name = "image_cls"
    auto_class = transformers.AutoModelForImageClassification
    uses_tokenizer = False
    needs_num_labels = True
    outputs = SampleOutputs()

    def __init__(self, recipe, tokenizer=None):
        super().__init__(recipe, tokenizer)
        self.epoch = 0

    def model_kwargs(self):
        return {"num_labels": self.model_section.num_labels, "ignore_mismatched_sizes": True}

    def sample_field(self, data):
        return data.label_field

    def encode(self, examples, source, data=None):
        d = data or self.data
        return prepare_images(examples, d.image_field, d.label_field, source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def collate(self, samples, train: bool = False):
        d = self.data

        def generator(sample_id):  # this sample's draws in this epoch, nothing else's
            return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + int(sample_id))

        pixels = [
            image_pixels(
                s["image"],
                d.image_size,
                d.augment,
                generator(s["sample_id"]) if train and d.augment != "none" else None,
            )
            for s in samples
        ]
        return {
            "sample_id": torch.tensor([int(s["sample_id"]) for s in samples]),
            "pixel_values": torch.from_numpy(np.stack(pixels)),
            "labels": torch.tensor([s["labels"] for s in samples]),
        }
