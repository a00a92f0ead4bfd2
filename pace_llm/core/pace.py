"""The PACE math, in one place (Ni, Zhang, Koniusz, NeurIPS 2024, eq. 10-12, App. C).

Noise (eq. 10-11). An adapted linear layer computes

    h(x) = h0(x) + Z ⊙ Δh(x),      Z ~ N(1, σ_l²),  Z of shape (B, d_out)

with one draw per sample and output channel, broadcast over the sample's tokens,
independent across samples and layers, in training mode only. σ = 0 is plain LoRA.
In packed rows (several samples per row) the draw is per packed sample: noise_segments().

Depth schedule (the authors' code, Vision/train.py). With L blocks plus the task head
as the last id, N = L + 1 ids, and noise starting at block s:

    σ_b = σ · (N − b) / (N − s)   for b ≥ s,      σ_b = 0 for b < s.

So the first noisy block gets σ and the deepest block 2σ/(N − s); a module outside
the blocks (after them) gets the head's id, b = L. ViT-B (L=12, s=1) gives block 1 σ,
block 11 σ/6; an LLM with s=0 gives layer 0 σ, layer L−1 2σ/(L+1). "constant" is σ
everywhere (a worse ablation in the paper's Table 8, kept for comparison).

Consistency (eq. 12). f1, f2 are the outputs of two noisy views of the same input
(one forward on [x; x]); the regulariser is a distance d(f1, f2) per output, averaged
over outputs:

    consistency = mean_outputs d(f1, f2),    d = ‖f1 − f2‖² in the paper (raw_sum)

An output is a sample for classifiers (f = logits) and a supervised token for causal LMs
(f = that position's next-token logits): averaging over tokens, like the token-mean
cross-entropy, keeps the term's scale independent of answer length and batch size. The
forms of d, and why an LM wants another than the paper's sum over its vocabulary, are in
pace_llm/core/consistency.py.

Shared dropout. In a paired forward on [x; x] every dropout draws its mask for the
first half and reuses it for the second (the authors' sharable drop-path), so f1 and
f2 differ only by the adapter noise. This holds only inside `paired_dropout()`, which
the objective opens around a paired step's forward and backward (a checkpointed
recomputation runs during backward and must pair too); outside it torch is untouched.
Both the noise and the masks come from torch's global RNG, which activation
checkpointing restores for the recomputed forward: the recomputation sees the same draws.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from pace_llm.core.pace_config import SCHEDULES


def sigma_for_block(
    sigma: float, block: int, num_blocks: int, schedule: str = "linear", first_noisy_block: int = 0
) -> float:
    """σ for block `block` (0-based; `num_blocks` means the head, after the last block)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"sigma_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if block < first_noisy_block:
        return 0.0
    if schedule == "constant":
        return float(sigma)
    n_ids = num_blocks + 1  # blocks plus the head, as the authors count
    return float(sigma) * (n_ids - block) / (n_ids - first_noisy_block)


# Packed rows (pace_llm/core/packing.py) hold several samples each: inside `noise_segments(index)`
# the noise draws one Z per sample and channel and gives each token its sample's Z through the
# per-token segment index [R, T] (-1 on a row's unused tail). Outside it, nothing changes.
_segments: Optional[tuple[torch.Tensor, int]] = None  # (index, samples)


@contextlib.contextmanager
def noise_segments(index: Optional[torch.Tensor]):
    """Noise per packed sample while the block lasts (None: per row, as without packing).
    It must span a checkpointed backward too: the recomputed forward draws again."""
    global _segments
    previous = _segments
    _segments = None if index is None else (index, int(index.max()) + 1)  # one host sync per step
    try:
        yield
    finally:
        _segments = previous


def draw_noise(delta: torch.Tensor, sigma: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Z ~ N(1, σ²) for `delta`, in fp32, and the per-token index that spreads it (or None).

    Unpacked: Z of shape (B, 1, ..., 1, d_out), one draw per sample and channel, index None.
    Inside noise_segments(), a delta of the packed batch's shape [R, T, d_out]: Z of shape
    (S, d_out), one draw per packed sample and channel, and the segment index [R, T] that gives
    each token its sample's row (the unused tail gets sample 0's: it meets no loss)."""
    if _segments is not None and delta.dim() == 3 and tuple(delta.shape[:2]) == tuple(_segments[0].shape):
        z = torch.randn((_segments[1], delta.shape[-1]), device=delta.device, dtype=torch.float32)
        return z.mul_(sigma).add_(1.0), _segments[0].to(delta.device).clamp(min=0)
    shape = (delta.shape[0],) + (1,) * (delta.dim() - 2) + (delta.shape[-1],)
    return torch.randn(shape, device=delta.device, dtype=torch.float32).mul_(sigma).add_(1.0), None


class _ScaleByIndex(torch.autograd.Function):
    """delta ⊙ factor[index], keeping only factor and index for backward (not the
    [R, T, d_out] gathered copy that a plain `delta * factor[index]` would keep)."""

    @staticmethod
    def forward(ctx, delta, factor, index):
        ctx.save_for_backward(factor, index)
        return delta * factor[index]

    @staticmethod
    def backward(ctx, grad):
        factor, index = ctx.saved_tensors
        return grad * factor[index], None, None


def scale_by(delta: torch.Tensor, factor: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """delta ⊙ factor (broadcast), or delta ⊙ factor[index] for packed rows; factor carries no
    gradient (it is Z, or Z times LoRA's scaling)."""
    factor = factor.to(delta.dtype)
    return delta * factor if index is None else _ScaleByIndex.apply(delta, factor, index)


def multiplicative_noise(delta: torch.Tensor, sigma: float) -> torch.Tensor:
    """Z ⊙ Δh, Z from draw_noise()."""
    return scale_by(delta, *draw_noise(delta, sigma))


class NoiseHook:
    """A layer's σ, and the forward hook that multiplies an output by Z where the noise is not
    fused into the adapter (core/noisy_lora.py): task heads, LoRA_mul+VPT_add, LoRA layers
    PEFT cannot give a variant to (embeddings, DoRA, quantisers other than bitsandbytes)."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, module, inputs, output):
        if module.training and self.sigma > 0:
            return multiplicative_noise(output, self.sigma)
        return output


def reduce_outputs(per_row: torch.Tensor, denominator: Optional[float] = None) -> torch.Tensor:
    """The mean of per-row values, or their sum / denominator: a denominator counting more
    rows than these (the trainer's train.loss_normalization=step) makes them a share of a
    larger mean."""
    return per_row.mean() if denominator is None else per_row.sum() / denominator


def mean_squared_norm(diff: torch.Tensor, denominator: Optional[float] = None) -> torch.Tensor:
    """mean over rows of ‖diff‖² (summed over the last dimension), in fp32; 0 for no rows.
    With a denominator: the sum over rows / denominator (reduce_outputs)."""
    if diff.numel() == 0:
        return diff.new_zeros((), dtype=torch.float32)
    return reduce_outputs(diff.float().square().sum(-1), denominator)


# --- Shared dropout masks for paired batches -------------------------------------------
# nn.Dropout and transformers' eager attention look up torch.nn.functional.dropout at call
# time, so replacing that one attribute for the duration of a paired step covers both, and
# costs nothing per op (a TorchFunctionMode would route every op of the forward through Python).
_torch_dropout = F.dropout
_depth = 0  # nested paired_dropout() blocks


def _paired_dropout(input, p=0.5, training=True, inplace=False):
    if not (training and p > 0 and input.dim() > 0 and input.shape[0] % 2 == 0):
        return _torch_dropout(input, p, training, inplace)
    half = input.shape[0] // 2
    keep = torch.empty_like(input[:half]).bernoulli_(1 - p).div_(1 - p)
    return input * torch.cat([keep, keep])


@contextlib.contextmanager
def paired_dropout(enabled: bool = True):
    """Inside the block every dropout on a batch [x; x] reuses the first half's mask for
    the second half; on leaving it, torch's own dropout is back. `enabled=False` is a no-op,
    so callers need no branch."""
    global _depth
    if not enabled:
        yield
        return
    _depth += 1
    F.dropout = _paired_dropout
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            F.dropout = _torch_dropout
