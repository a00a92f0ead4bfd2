"""PACE's noise fused into PEFT's LoRA forward, as a PEFT LoRA variant (the way DoRA plugs in).

    h(x) = W0 x + Δh(x) ⊙ (s · Z),     Δh(x) = B A dropout(x),   s = α / r,   Z ~ N(1, σ²)

PEFT's own LoRA computes W0 x + Δh(x) · s: one elementwise pass over the [B, T, d_out]
update. A forward hook on lora_B multiplying by Z (NoiseHook) adds a second pass, and its
backward a third. Here s and Z are one factor of shape (B, 1, d_out): the noise costs a draw of
B × d_out numbers and a multiply of that size; per token the layer does what plain LoRA does,
and autograd keeps only the factor for backward (Δh · factor needs the factor, not Δh). In
packed rows the factor is (S, d_out), one row per packed sample, gathered to the tokens inside
one autograd function that keeps the factor and the segment index (pace.scale_by).

Z comes from the same torch.randn call as the hook's, in the same order, so a seed gives the
same draws; the product rounds as Δh · (s·Z) instead of (Δh · Z) · s (last-bit differences
in fp32). σ = 0, or eval mode, is PEFT's LoRA exactly. Merging is plain LoRA's: Z is 1 at eval.
"""

from __future__ import annotations

import torch
from peft.tuners import lora
from peft.tuners.lora.layer import LoraVariant

from pace_llm.core.pace import NoiseHook, draw_noise, scale_by

# LoRA layer classes whose forward calls a variant's (PEFT's Linear and its bitsandbytes
# versions); any other LoRA layer (embeddings, GPTQ, ...) keeps the forward hook.
_FUSABLE = tuple(t for t in (getattr(lora, n, None) for n in ("Linear", "Linear8bitLt", "Linear4bit")) if t is not None)


class NoisyLora(LoraVariant):
    """PEFT LoRA whose update is multiplied by s·Z in training mode; `module.pace_noise.sigma`
    holds the layer's σ (noise_layers() reads and changes it)."""

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        dropout = module.lora_dropout[active_adapter]
        delta = module.lora_B[active_adapter](module.lora_A[active_adapter](dropout(x)))
        scaling = module.scaling[active_adapter]
        sigma = module.pace_noise.sigma
        if module.training and sigma > 0:
            z, index = draw_noise(delta, sigma)
            return result + scale_by(delta, z * scaling, index)
        return result + delta * scaling

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


def add_noise(module, sigma: float, fused: bool = True) -> None:
    """Give a PEFT LoRA layer PACE's noise of σ: fused (NoisyLora) where its class calls
    variants and no other variant (DoRA, ...) holds it, else (or with fused=False, as
    bench/train_overhead.py's before-and-after does) a forward hook on each lora_B."""
    module.pace_noise = NoiseHook(sigma)
    if fused and type(module) in _FUSABLE and not module.lora_variant:
        for adapter in module.lora_A:
            module.lora_variant[adapter] = NoisyLora()
        return
    for lora_b in module.lora_B.values():
        lora_b.register_forward_hook(module.pace_noise)


def is_fused(module) -> bool:
    return any(isinstance(v, NoisyLora) for v in getattr(module, "lora_variant", {}).values())
