"""Tiny models built from configs (no download): for tests, smoke runs and recipes/tiny.yaml.

Head dimension 32 so vLLM's CPU attention accepts the causal LMs.
"""
from __future__ import annotations

import torch
import transformers

_LM = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
_ENC = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=130)


def tiny_config(kind: str, **overrides):
    if kind == "phi3":
        return transformers.Phi3Config(**{**_LM, "pad_token_id": 0, **overrides})
    if kind == "llama":
        return transformers.LlamaConfig(**{**_LM, "pad_token_id": 0, **overrides})
    if kind == "roberta":
        return transformers.RobertaConfig(**{**_ENC, "num_labels": 3, "pad_token_id": 1, **overrides})
    if kind == "vit":
        vit = {k: v for k, v in _ENC.items() if k not in ("vocab_size", "max_position_embeddings")}
        return transformers.ViTConfig(**{**vit, "image_size": 32, "patch_size": 8, "num_channels": 3,
                                         "num_labels": 5, **overrides})
    raise ValueError(f"unknown tiny model kind {kind!r}: phi3, llama, roberta, vit")


def tiny_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(kind, **overrides)
    cls = {"phi3": transformers.Phi3ForCausalLM, "llama": transformers.LlamaForCausalLM,
           "roberta": transformers.RobertaForSequenceClassification,
           "vit": transformers.ViTForImageClassification}[kind]
    return cls(config).float()
