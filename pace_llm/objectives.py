"""The training objectives the trainer calls on a batch: off, full, fast, lazy_half.

    objective = PaceObjective("full", lam=0.1)
    out = objective(model, batch, step)      # out.loss.backward() / engine.backward(out.loss)

A batch holds the model inputs, `labels` and `sample_id`. What PACE regularises, f:
  - classifiers (labels of shape [B]): the head's logits, one row per sample;
    one output (num_labels=1) is regression with an MSE task loss (STS-B);
  - causal LMs (labels [B, T], -100 where not supervised): the next-token logits at
    the supervised positions, one row per answer token. They are computed from the
    decoder's final hidden states at those positions only, so the full [B, T, V] logits
    are never built.
Reductions (pace.py): task loss = mean over rows; consistency = mean over rows of the
squared L2 distance summed over classes / vocabulary.

  off        task loss only (plain LoRA when σ = 0).
  full       one forward on [x; x] with shared dropout masks; task loss on the first
             half; λ·consistency(f1, f2). Both halves get gradients (as the authors).
  fast       one forward; λ·consistency(f, o) with o this sample's output stored in
             the previous epoch (OutputCache), a constant target; samples without a
             stored output get no consistency term; then o ← f.
  lazy_half  every `lazy_every`-th step, `full` on the first half of the batch;
             the other steps `off` on the whole batch (noise stays on).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from .adapters import base_model
from .cache import OutputCache
from .pace import consistency_loss, mean_squared_norm, set_paired_batch

MODES = ("off", "full", "fast", "lazy_half")
log = logging.getLogger(__name__)


@dataclasses.dataclass
class Rows:
    """A forward pass's outputs, one row per sample (classifier) or supervised token (LM)."""
    f: torch.Tensor          # [N, C] logits PACE regularises
    stored: torch.Tensor     # [N, D] what the PACE_fast cache keeps (hidden states or logits)
    target: torch.Tensor     # [N] labels
    counts: torch.Tensor     # [B] rows per sample

    def first(self, n_samples: int) -> "Rows":
        n = int(self.counts[:n_samples].sum())
        return Rows(self.f[:n], self.stored[:n], self.target[:n], self.counts[:n_samples])

    def last(self, n_samples: int) -> "Rows":
        n = int(self.counts[-n_samples:].sum())
        return Rows(self.f[-n:], self.stored[-n:], self.target[-n:], self.counts[-n_samples:])


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor
    task_loss: torch.Tensor
    consistency_loss: torch.Tensor
    supervised_rows: int


def is_causal_lm(model) -> bool:
    model = base_model(model)
    return hasattr(model, "get_decoder") and type(model).__name__.endswith("ForCausalLM")


def lm_head_trainable(model) -> bool:
    return any(p.requires_grad for p in base_model(model).get_output_embeddings().parameters())


def cache_dim(model) -> int:
    """Width of a PACE_fast cache row: hidden size for an LM with a frozen head, else logits."""
    base = base_model(model)
    if not is_causal_lm(base):
        return base.config.num_labels
    head = base.get_output_embeddings()
    if lm_head_trainable(base):
        log.warning("lm_head is trainable: the PACE_fast cache stores full logits "
                    "(%d per token) instead of hidden states", head.out_features)
        return head.out_features
    return head.in_features


def supervised_counts(labels: torch.Tensor) -> torch.Tensor:
    """Rows per sample: supervised next-token positions for LM labels [B, T], 1 for [B]."""
    if labels.dim() == 1:
        return torch.ones(len(labels), dtype=torch.long)
    return (labels[:, 1:] != -100).sum(1)


def zero3_start_of_forward(model) -> None:
    """What DeepSpeed ZeRO-3's pre-hook on the engine's root module does at each forward:
    reset the parameter coordinator's step. A forward through `get_decoder()` bypasses that
    hook, so the coordinator never completes a trace and fetches every module's parameters on
    demand, without prefetching (measured: ~1.9x the all-gathers and ~1.35x the step time of
    `engine(**inputs)` on a tiny Llama, 2 gloo ranks; bench/train_overhead.py --deepspeed 3)."""
    offload = getattr(getattr(model, "optimizer", None), "parameter_offload", None)
    if offload is not None:
        offload.get_param_coordinator().reset_step()


def forward_rows(model, batch: dict) -> Rows:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_id")}
    labels = batch["labels"]
    base = base_model(model)
    if labels.dim() == 2 and is_causal_lm(base):
        zero3_start_of_forward(model)
        hidden = base.get_decoder()(**inputs).last_hidden_state
        mask = labels[:, 1:] != -100
        h = hidden[:, :-1][mask]
        head = base.get_output_embeddings()
        logits = head(h)
        stored = logits if lm_head_trainable(base) else h
        return Rows(logits, stored, labels[:, 1:][mask], mask.sum(1))
    logits = model(**inputs).logits
    return Rows(logits, logits, labels, torch.ones(len(labels), dtype=torch.long, device=labels.device))


def task_loss(rows: Rows, reduction: str = "mean") -> torch.Tensor:
    if rows.f.shape[-1] == 1:  # regression head (STS-B)
        return F.mse_loss(rows.f.squeeze(-1).float(), rows.target.float(), reduction=reduction)
    return F.cross_entropy(rows.f.float(), rows.target, reduction=reduction)


# Config keys that hold an attention-probability dropout rate, across architectures.
_ATTN_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def share_attention_dropout(model) -> None:
    """Make attention-probability dropout share its mask across the paired halves.

    pace.py's shared-mask wrapper patches torch.nn.functional.dropout, which eager attention
    calls; sdpa / flash attention draw that dropout inside a fused kernel instead, so f1 and
    f2 would get different attention masks (RoBERTa: 0.1) and the consistency would measure
    dropout, not just the adapter noise. Such a model is switched to eager attention.
    """
    base = base_model(model)
    config = getattr(base, "config", None)
    rate = max((float(getattr(config, k, 0.0) or 0.0) for k in _ATTN_DROPOUT_KEYS), default=0.0)
    impl = getattr(config, "_attn_implementation", None)
    if rate > 0 and base.training and impl not in (None, "eager"):
        log.warning("attention dropout %.3g under %r attention cannot share its mask between "
                    "the two PACE views: switching %s to eager attention", rate, impl,
                    type(base).__name__)
        base.set_attn_implementation("eager")


def _duplicate(batch: dict, n: Optional[int] = None) -> dict:
    return {k: torch.cat([v[:n], v[:n]]) if torch.is_tensor(v) else v for k, v in batch.items()}


class PaceObjective:
    def __init__(self, mode: str = "full", lam: float = 1.0, lazy_every: int = 2,
                 cache: Optional[OutputCache] = None):
        if mode not in MODES:
            raise ValueError(f"pace.mode must be one of {MODES}, got {mode!r}")
        if mode == "fast" and cache is None:
            raise ValueError("pace.mode=fast needs an OutputCache")
        if lazy_every < 1:
            raise ValueError(f"lazy_every must be >= 1, got {lazy_every}")
        self.mode, self.lam, self.lazy_every, self.cache = mode, lam, lazy_every, cache
        self._gram = None  # (lm_head, WᵀW): PACE_fast's consistency from cached hidden states

    def __call__(self, model, batch: dict, step: int = 0) -> LossOutput:
        if self.mode == "full" or (self.mode == "lazy_half" and step % self.lazy_every == 0):
            half = None if self.mode == "full" else max(1, len(batch["labels"]) // 2)
            return self._paired(model, _duplicate(batch, half))
        set_paired_batch(False)
        rows = forward_rows(model, batch)
        task = task_loss(rows)
        if self.mode != "fast":
            zero = task.new_zeros(())
            return LossOutput(task, task, zero, len(rows.target))
        return self._fast(model, batch, rows, task)

    def _paired(self, model, batch2: dict) -> LossOutput:
        share_attention_dropout(model)
        set_paired_batch(True)  # stays on through backward: checkpoint recomputation pairs too
        rows = forward_rows(model, batch2)
        n = len(batch2["labels"]) // 2
        r1, r2 = rows.first(n), rows.last(n)
        task = task_loss(r1)
        cons = consistency_loss(r1.f, r2.f)
        return LossOutput(task + self.lam * cons, task, cons, len(r1.target))

    def _fast(self, model, batch: dict, rows: Rows, task: torch.Tensor) -> LossOutput:
        ids = batch["sample_id"]
        stored, has = self.cache.read(ids)
        stored, has = stored.to(rows.stored.device), has.to(rows.stored.device)
        cons = task.new_zeros(())
        head = gram = None
        if rows.stored is not rows.f:
            head = base_model(model).get_output_embeddings()
            gram = self._head_gram(head)  # before has.any(): under ZeRO-3 every rank gathers
        if has.any():
            prev = stored[has].to(rows.stored.dtype)
            if rows.stored is rows.f:  # cached logits
                cons = consistency_loss(rows.f[has], prev)
            elif gram is not None:  # ‖W(h − h_o)‖² = (h − h_o)ᵀ WᵀW (h − h_o)
                diff = rows.stored[has].float() - stored[has].float()
                cons = ((diff @ gram) * diff).sum(-1).mean()
            elif head.bias is None:  # cached hidden states: f − o = W(h − h_o)
                cons = mean_squared_norm(head(rows.stored[has] - prev))
            else:
                cons = consistency_loss(rows.f[has], head(prev))
        self.cache.write(ids.cpu(), rows.stored.detach())
        return LossOutput(task + self.lam * cons, task, cons, len(rows.target))

    def _head_gram(self, head) -> Optional[torch.Tensor]:
        """WᵀW in fp32 (d×d) of a frozen, bias-free, unquantized lm_head W, computed once.

        PACE_fast's consistency for a cached hidden state h_o is ‖W(h − h_o)‖²; as
        (h − h_o)ᵀ WᵀW (h − h_o) it costs d² per row, forward and backward, instead of d·V
        and never builds a [rows, V] tensor: 10x fewer FLOPs for Phi-3 (3,072 vs 32,064),
        85x for SmolLM2 (576 vs 49,152). Measured on SmolLM2 (CPU): PACE_fast's step went from
        1.16x to 1.04x that of `off` (the noise alone: 1.05x), its peak memory from 1.075x to
        0.99x that of plain PEFT LoRA (bench/train_overhead.py, BENCHMARKS.md).
        None (use W itself) when the head has a bias, is quantized or is not wider than d.
        """
        if self._gram is not None and self._gram[0] is head:
            return self._gram[1]
        w = head.weight
        if head.bias is not None or w.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
                or hasattr(w, "quant_state") or head.in_features >= head.out_features:
            self._gram = (head, None)
            return None
        gather = contextlib.nullcontext()
        if hasattr(w, "ds_id"):  # ZeRO-3 partitions the weight: gather it once, on every rank
            import deepspeed
            gather = deepspeed.zero.GatheredParameters([w], modifier_rank=None)
        with gather, torch.no_grad():
            gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float32, device=w.device)
            for chunk in w.split(4096):  # fp32 copies of 4,096 vocabulary rows at a time
                chunk = chunk.float()
                gram.addmm_(chunk.t(), chunk)
        self._gram = (head, gram)
        return gram
