"""Model FLOPs utilisation (MFU) of LoRA training: the FLOPs the model's matmuls need per
second of training, as a share of the GPUs' peak.

FLOPs per trained token (a linear layer of N weights costs 2N FLOPs per token forward):
  forward                      2 N
  backward, input gradients    2 N   (through the frozen weights too: LoRA sits inside them)
  backward, weight gradients   ~0    (only the adapters' r·(d_in + d_out) per layer, < 1%)
so 4 N for LoRA, where full fine-tuning's usual count is 6 N (PaLM, appendix B; attention's
own FLOPs, which grow with the sequence, left out as there). N counts the weights of every
nn.Linear in the base model, the output head included and the embeddings left out (a lookup,
no matmul). Full PACE forwards every sample twice ([x; x]): twice the FLOPs per token.

Peak: dense (no sparsity) bf16/fp16 tensor-core TFLOPS of each GPU's data sheet, per GPU;
fp32 runs get no MFU (their peak depends on whether TF32 is allowed).
"""

from __future__ import annotations

from typing import Optional

import torch

# NVIDIA data sheets, dense bf16 / fp16 tensor TFLOPS (SXM parts where there are several)
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "V100": 125.0,
}


def peak_flops(device_name: str, dtype: torch.dtype) -> Optional[float]:
    """Peak FLOP/s of one GPU for bf16/fp16 training, or None (fp32, or a GPU not in the table)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    # the longest name that matches first: "A10G" before "A10", "H100" in "NVIDIA H100 80GB HBM3"
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name in device_name:
            return PEAK_TFLOPS[name] * 1e12
    return None


def lora_flops_per_token(model: torch.nn.Module) -> float:
    """4 N: forward and input-gradient matmuls over the weights of every nn.Linear."""
    weights = sum(  # ZeRO-3 builds the model partitioned: its full size is ds_numel
        getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    return 4.0 * weights


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, world: int, forwards_per_token: int = 1) -> float:
    """The share of `world` GPUs' peak that `tokens_per_s` (real tokens, all ranks) uses."""
    return tokens_per_s * flops_per_token * forwards_per_token / (peak * world)
