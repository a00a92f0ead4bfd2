"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training.

    e ← e + U(−m, m),   m = α / sqrt(L · d)

with L the sample's length in tokens and d the embedding width, drawn anew at every forward
in training mode. It is the one-flag noise regulariser users know from transformers, TRL,
LLaMA-Factory and axolotl (`neftune_noise_alpha`), and the baseline PACE is measured against.

L is per sample: a padded row's L is its attention mask's count, and in a packed row
(pace_llm/core/packing.py) each token gets its own sample's L. transformers' hook takes the
row's width for every token, so padding and packing change the noise a sample gets; here
they do not. Inside `sample_lengths(lengths)` the hook reads each token's L from `lengths`
[B, T]; outside it (or for a batch of another shape) every token gets the row's width.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

_lengths: Optional[torch.Tensor] = None  # [B, T]: each token's sample length


@contextlib.contextmanager
def sample_lengths(lengths: Optional[torch.Tensor]):
    """Per-token sample lengths for the forwards inside the block (None: the row's width)."""
    global _lengths
    previous, _lengths = _lengths, lengths
    try:
        yield
    finally:
        _lengths = previous


def token_lengths(batch: dict) -> Optional[torch.Tensor]:
    """Each token's sample length [B, T]: from `segment_index` in a packed batch (-1 on a row's
    unused tail, which gets length 1: no loss reads it), else from `attention_mask`; None
    without either."""
    if "segment_index" in batch:
        index = batch["segment_index"]
        per_sample = torch.bincount(index[index >= 0].flatten())
        return torch.where(index >= 0, per_sample[index.clamp(min=0)], torch.ones_like(index))
    mask = batch.get("attention_mask")
    if mask is None:
        return None
    return mask.sum(1, keepdim=True).expand_as(mask)


class NEFTuneHook:
    """Forward hook on the input embedding module: adds NEFTune's noise in training mode."""

    def __init__(self, alpha: float):
        self.alpha = float(alpha)

    def __call__(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.alpha <= 0:
            return output
        rows, width, dim = output.shape
        if _lengths is not None and tuple(_lengths.shape) == (rows, width):
            length = _lengths.to(output.device, torch.float32).clamp(min=1).unsqueeze(-1)
        else:
            length = torch.full((rows, width, 1), float(width), device=output.device)
        magnitude = self.alpha / torch.sqrt(length * dim)
        noise = torch.rand(output.shape, device=output.device, dtype=torch.float32).mul_(2).sub_(1)
        return output + (noise * magnitude).to(output.dtype)


def add_neftune(model, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Hook NEFTune onto `model`'s input embeddings; remove it with the returned handle."""
    return model.get_input_embeddings().register_forward_hook(NEFTuneHook(alpha))
