"""Merge and export: a merged Hugging Face folder and a PEFT-format adapter folder.

Both are written to a temporary sibling folder and renamed into place, so a crash never
leaves a half-written export under the final name. The merged folder loads with plain
transformers and vLLM; the adapter folder with `peft.PeftModel.from_pretrained` and
vLLM's LoRA support (lora_add only; lora_mul_vpt has no PEFT equivalent and is saved
as pace_adapter.safetensors + pace_config.json).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pace_llm.core.adapters import PaceConfig, apply_pace, merge_pace
from pace_llm.files import atomic_dir

PACE_CONFIG = "pace_config.json"
PACE_WEIGHTS = "pace_adapter.safetensors"


def save_adapter(model, out_dir) -> Path:
    """The trained adapter (and task head): PEFT format for lora_add."""
    import peft

    config: PaceConfig = model.pace_config
    with atomic_dir(out_dir) as tmp:
        if isinstance(model, peft.PeftModel):
            model.save_pretrained(tmp)
        else:
            weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
            save_file(weights, tmp / PACE_WEIGHTS)
        (tmp / PACE_CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return Path(out_dir)


def load_adapter(model, adapter_dir, is_trainable: bool = False):
    """Rebuild the adapted model from `save_adapter`'s folder (either adapter kind)."""
    import peft

    adapter_dir = Path(adapter_dir)
    config = PaceConfig(**json.loads((adapter_dir / PACE_CONFIG).read_text()))
    if config.adapter == "lora_add":
        model = apply_pace(model, config)  # same injection + noise hooks as in training
        peft.set_peft_model_state_dict(model, peft.load_peft_weights(str(adapter_dir)))
    else:
        model = apply_pace(model, config)
        missing = model.load_state_dict(load_file(adapter_dir / PACE_WEIGHTS), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{adapter_dir}: unexpected keys {missing.unexpected_keys[:5]}")
    if not is_trainable:
        model.requires_grad_(False)
    return model


def save_merged(model, out_dir, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Merge (fp32 arithmetic) and save config, safetensors, tokenizer and generation config.
    Merging is in place: save the adapter first if you want it too."""
    merged = merge_pace(model) if hasattr(model, "pace_config") else model
    if dtype is not None:
        merged = merged.to(dtype)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(merged, "generation_config", None) is not None and merged.can_generate():
            merged.generation_config.save_pretrained(tmp)
    return Path(out_dir)


def export_merged(base, adapter_dir, merged_dir, tokenizer=None, quantized: bool = False):
    """A fresh, unpartitioned base (dequantized first when `quantized`: QLoRA) +
    the saved adapter, merged in fp32 and saved to merged_dir; returns the merged model.
    Merging from the saved adapter, not the live training engine, is the one path that
    works for ZeRO-3 (PEFT cannot merge partitioned weights) and for QLoRA."""
    if quantized:
        base = dequantize(base)
    merged = merge_pace(load_adapter(base, adapter_dir))
    save_merged(merged, merged_dir, tokenizer)
    return merged


def dequantize(model):
    """Replace bitsandbytes 4-bit / 8-bit linear layers by plain nn.Linear with the
    dequantized weights (what a QLoRA adapter was trained against), for merging."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    for name, module in list(model.named_modules()):
        if isinstance(module, quantized):
            state = getattr(module.weight, "quant_state", None) or getattr(module, "state", None)
            weight = dequantize_bnb_weight(module.weight, state=state)
            dtype = getattr(module, "compute_dtype", None) or torch.float32
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(weight.to(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias.to(dtype))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model
