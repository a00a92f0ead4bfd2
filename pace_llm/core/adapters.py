"""PACE-LoRA injection into Hugging Face models.

    model = AutoModelForCausalLM.from_pretrained(...)
    model = pace_llm.apply_pace(model, pace_llm.PaceConfig(rank=16, sigma=1.0))
    ...train...
    plain = pace_llm.merge_pace(model)

`lora_add` (the default) is PEFT's LoRA: PEFT injects, initialises, saves and loads it;
PACE gives each LoRA layer a PEFT variant that multiplies Δh by the noise Z together with
LoRA's scaling (noisy_lora.py; a forward hook on `lora_B` where PEFT has no variant slot).
`lora_mul_vpt` is the paper's vision baseline (LoRA_mul + VPT_add, eq. 2), which PEFT
does not have: a small module of our own below, merged by eq. 13.
"""

from __future__ import annotations

import re
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from pace_llm.core.pace import NoiseHook, sigma_for_block
from pace_llm.core.pace_config import PaceConfig

# Per-architecture defaults (config.model_type -> targets), as the paper and PEFT use them.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, Union[str, list[str]]] = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # Phi-3 fuses q/k/v and gate/up
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "roberta": ["query", "value"],
    "bert": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    # every linear layer of the ViT blocks: qkv, attention output, fc1, fc2
    "vit": r".*\.layers\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))",
}
# Task heads trained in full (PEFT's modules_to_save), when the model has one.
HEAD_NAMES = ("classifier", "score")
_BLOCK_RE = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


class TargetError(ValueError):
    """target_modules selected nothing (or no default exists): names the candidates."""


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bitsandbytes' Linear4bit / Linear8bitLt subclass it


def head_names(model: nn.Module) -> list[str]:
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def block_index(name: str) -> Optional[int]:
    match = _BLOCK_RE.search("." + name)
    return int(match.group(1)) if match else None


def resolve_targets(model: nn.Module, spec) -> list[str]:
    """Full names of the linear modules that `spec` selects; an error lists the candidates."""
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise TargetError(
                f"no default target_modules for model_type {model_type!r}; set "
                f"pace.target_modules (names, a regex, or 'all-linear')"
            )
        spec = DEFAULT_TARGETS[model_type]
    excluded = set(head_names(model))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {
        n: m for n, m in model.named_modules() if _is_linear(m) and n.split(".")[0] not in excluded and m is not out_emb
    }
    if spec == "all-linear":
        chosen = list(linears)
    elif isinstance(spec, str):
        chosen = [n for n in linears if re.fullmatch(spec, n)]
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in spec)]
    if not chosen:
        names = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in linears})
        raise TargetError(
            f"target_modules={spec!r} matched no linear module of "
            f"{type(model).__name__}. Its linear modules are: {', '.join(names)}"
        )
    return chosen


def peft_target_spec(model: nn.Module, chosen: list[str]) -> list[str]:
    """The short suffix list when it selects exactly `chosen` (a tidy adapter_config.json
    that vLLM understands), else the full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    linears = [n for n, m in model.named_modules() if _is_linear(m)]
    by_suffix = [n for n in linears if n.rsplit(".", 1)[-1] in suffixes]
    return suffixes if sorted(by_suffix) == sorted(chosen) else chosen


class LoraMulVptLinear(nn.Module):
    """LoRA_mul + VPT_add around a frozen linear layer (paper eq. 2; authors' factorisation).

        Δh(x) = (W0 ⊙ (D·U)) x + W0 (Pd·Pu) + b0 ⊙ δb
        h(x)  = W0 x + b0 + Z ⊙ Δh(x)

    D (d_out×r) and Pd (d_in×r) start at zero, U and Pu are Xavier-initialised, so Δh = 0
    at init. Merged (eq. 13): W = W0 ⊙ (1 + D·U), b = b0 ⊙ (1 + δb) + W0·Pd·Pu.
    A layer without a bias (LLaMA-style) has nowhere to merge the VPT term into without
    changing the architecture: there the adapter is LoRA_mul alone (no Pd, Pu, δb).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, sigma: float):
        super().__init__()
        self.base_layer = base_layer
        d_out, d_in = base_layer.weight.shape
        kw = dict(device=base_layer.weight.device, dtype=torch.float32)
        self.pace_down = nn.Parameter(torch.zeros(d_out, rank, **kw))
        self.pace_up = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, d_in, **kw)))
        if base_layer.bias is not None:
            self.pace_bias = nn.Parameter(torch.zeros(d_out, **kw))
            self.pace_prompt_down = nn.Parameter(torch.zeros(d_in, rank, **kw))
            self.pace_prompt_up = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, 1, **kw)))
        self.pace_noise = NoiseHook(sigma)

    def delta_weight_bias(self):
        w0 = self.base_layer.weight.float()
        dw = w0 * (self.pace_down @ self.pace_up)
        if self.base_layer.bias is None:
            return dw, None
        db = (w0 @ (self.pace_prompt_down @ self.pace_prompt_up)).squeeze(-1)
        return dw, db + self.base_layer.bias.float() * self.pace_bias

    def forward(self, x):
        dw, db = self.delta_weight_bias()
        delta = F.linear(x, dw.to(x.dtype), None if db is None else db.to(x.dtype))
        return self.base_layer(x) + self.pace_noise(self, (x,), delta)

    def merged(self) -> nn.Linear:
        base = self.base_layer
        with torch.no_grad():
            dw, db = self.delta_weight_bias()
            out = nn.Linear(
                base.in_features,
                base.out_features,
                bias=db is not None,
                device=base.weight.device,
                dtype=base.weight.dtype,
            )
            out.weight.copy_(base.weight.float() + dw)
            if db is not None:
                out.bias.copy_(base.bias.float() + db)
        return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def peft_lora_config(model: nn.Module, config: PaceConfig):
    """The peft.LoraConfig apply_pace's lora_add builds: the same targets, rank, alpha,
    dropout and task heads (modules_to_save); plain PEFT LoRA with it is PACE without noise."""
    import peft

    heads = head_names(model) if config.train_head else []
    return peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=peft_target_spec(model, resolve_targets(model, config.target_modules)),
        modules_to_save=heads or None,
        bias="none",
    )


def _sigma_by_name(model: nn.Module, adapted: list[str], config: PaceConfig):
    """name -> σ of that module's noise, by its block's depth (pace.sigma_for_block)."""
    num_blocks = getattr(model.config, "num_hidden_layers", None) or 1 + max((block_index(n) or 0) for n in adapted)

    def sigma_of(name):
        block = block_index(name)
        return sigma_for_block(
            config.noise_sigma,
            num_blocks if block is None else block,
            num_blocks,
            config.sigma_schedule,
            config.first_noisy_block,
        )

    return sigma_of


def add_lora_noise(model, config: PaceConfig):
    """PACE's noise on every LoRA layer of a `peft.PeftModel`, whoever built its LoRA
    (apply_pace, or a user's / TRL's `peft_config`); σ from config's schedule by depth.
    The noise is fused into the LoRA forward where PEFT allows (core/noisy_lora.py)."""
    import peft

    from pace_llm.core.noisy_lora import add_noise

    inner = model.base_model.model
    layers = {n: m for n, m in inner.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    sigma_of = _sigma_by_name(inner, list(layers), config)
    for name, module in layers.items():
        add_noise(module, sigma_of(name))
    model.pace_config = config
    return model


def apply_pace(model: nn.Module, config: PaceConfig) -> nn.Module:
    """Inject PACE adapters; only adapter (and task-head) parameters stay trainable.

    Returns a `peft.PeftModel` for lora_add, the model itself (modified) for lora_mul_vpt.
    """
    chosen = resolve_targets(model, config.target_modules)
    heads = head_names(model) if config.train_head else []
    sigma_of = _sigma_by_name(model, chosen, config)
    if config.adapter == "lora_add":
        import peft

        model = add_lora_noise(peft.get_peft_model(model, peft_lora_config(model, config)), config)
    else:
        model.requires_grad_(False)
        for name in chosen:
            _set_submodule(model, name, LoraMulVptLinear(model.get_submodule(name), config.rank, sigma_of(name)))
        for head in heads:
            getattr(model, head).requires_grad_(True)
    if config.noise_head:
        for head in heads:  # the head's id is the one after the last block
            add_head_noise(getattr(base_model(model), head), sigma_of(head))
    model.pace_config = config
    return model


def add_head_noise(head: nn.Module, sigma: float) -> None:
    """The head's output (logits, bias included) × Z, one draw per sample and class, in
    training mode only: the authors' HeadLinear. A hook, not a weight: merging ignores it."""
    head.pace_head_noise = NoiseHook(sigma)
    head.pace_head_hook = head.register_forward_hook(head.pace_head_noise)


def head_noise(model: nn.Module) -> dict[str, NoiseHook]:
    """Head name -> its noise, for every task head that has head noise."""
    return {
        n: m.pace_head_noise
        for n, m in model.named_modules()
        if isinstance(getattr(m, "pace_head_noise", None), NoiseHook)
    }


def noise_layers(model: nn.Module) -> dict[str, NoiseHook]:
    """Module name -> its noise (read or change `.sigma`), for every adapted layer."""
    return {n: m.pace_noise for n, m in model.named_modules() if isinstance(getattr(m, "pace_noise", None), NoiseHook)}


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under any PEFT / DeepSpeed wrapping."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DeepSpeed engine
            model = model.module
        elif (
            hasattr(model, "base_model")
            and hasattr(model.base_model, "model")
            and type(model).__name__.startswith("Peft")
        ):
            model = model.base_model.model
        else:
            return model


def merge_pace(model: nn.Module) -> nn.Module:
    """A plain model of the original transformers class: adapters merged in fp32, cast back."""
    import peft

    if isinstance(model, peft.PeftModel):
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                base = module.get_base_layer()
                if not isinstance(getattr(base, "weight", None), nn.Parameter) or base.weight.dtype not in (
                    torch.float32,
                    torch.bfloat16,
                    torch.float16,
                ):
                    raise TypeError(
                        f"cannot merge into a quantized {type(base).__name__}: "
                        "dequantize the base first (pace_llm.export.dequantize)"
                    )
                dtype = base.weight.dtype
                module.float()
                module.merge()
                module.to(dtype)
        model = model.unload()  # layers are merged already: this swaps them for their bases
    else:
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraMulVptLinear):
                _set_submodule(model, name, module.merged())
    for module in model.modules():  # lora_mul_vpt keeps its head module: drop the noise hook
        if hasattr(module, "pace_head_hook"):
            module.pace_head_hook.remove()
            del module.pace_head_hook, module.pace_head_noise
    for attr in ("pace_config",):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    def numel(p):  # ZeRO-3 partitions leave p.numel() == 0; ds_numel is the full size
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(numel(p) for p in model.parameters())
