"""Image classification (ViT): an image (`data.image_field`) resized to
`data.image_size`² and a label; PACE regularises the head's logits (SampleRows)."""
from __future__ import annotations

import datasets
import numpy as np
import torch
import transformers

from ..data import pixel_values
from ..rows import SampleRows
from .base import Task, encoded_columns, require_fields


def prepare_images(rows: datasets.Dataset, image_field: str, label_field: str, image_size: int,
                   source: str = "") -> datasets.Dataset:
    """pixel_values: resized to image_size², scaled to [-1, 1] (ViT's 0.5/0.5 normalisation)."""
    require_fields(rows, [image_field, label_field], source)

    def encode(batch):
        return {"pixel_values": [pixel_values(image, image_size) for image in batch[image_field]],
                "labels": batch[label_field]}

    return rows.map(encode, batched=True, remove_columns=encoded_columns(rows), desc="images")


class ImageClassificationTask(Task):
    name = "image_cls"
    auto_class = transformers.AutoModelForImageClassification
    uses_tokenizer = False
    rows = SampleRows()

    def model_kwargs(self):
        return {"num_labels": self.model_section.num_labels, "ignore_mismatched_sizes": True}

    def encode(self, rows, source, data=None):
        d = data or self.data
        return prepare_images(rows, d.image_field, d.label_field, d.image_size, source)

    def collate(self, samples):
        return {"sample_id": torch.tensor([s["sample_id"] for s in samples]),
                "pixel_values": torch.tensor(np.stack([s["pixel_values"] for s in samples])),
                "labels": torch.tensor([s["labels"] for s in samples])}
