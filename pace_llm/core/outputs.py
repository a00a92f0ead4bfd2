"""What PACE regularises: the outputs f of a forward pass, per model family.

  TokenOutputs   causal LMs (labels [B, T], -100 where not supervised): the next-token logits
                 at the supervised positions, one output per answer token, counted per sample
                 (also in packed rows: pace_llm/core/packing.py). They are computed from
                 the decoder's final hidden states at those positions only, so the full
                 [B, T, V] logits are never built. Task loss: token-mean cross-entropy.
  SampleOutputs  classifiers (labels [B]): the head's logits, one output per sample. Task loss:
                 cross-entropy, or MSE for a one-output regression head (STS-B).

A task kind (pace_llm/tasks/) says which one it uses; the objectives and the trainer
only call `forward`, `loss`, `output_count` and `cache_dim`. `outputs_for_model` picks one
from a model's class for callers of the bare library API who pass no task.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pace_llm.core import hooks
from pace_llm.core.adapters import base_model
from pace_llm.core.packing import NOT_MODEL_INPUTS, is_packed

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outputs:
    """A forward pass's outputs, one per sample (classifier) or supervised token (LM): row i of each tensor."""

    f: torch.Tensor  # [N, C] logits PACE regularises
    stored: torch.Tensor  # [N, D] what the PACE_fast cache keeps (hidden states or logits)
    target: torch.Tensor  # [N] labels
    counts: torch.Tensor  # [B] outputs per sample
    head: Optional[nn.Module] = None  # maps `stored` to `f` when they differ (a frozen lm_head)

    def first(self, n_samples: int) -> Outputs:
        n = int(self.counts[:n_samples].sum())
        return Outputs(self.f[:n], self.stored[:n], self.target[:n], self.counts[:n_samples], self.head)

    def last(self, n_samples: int) -> Outputs:
        n = int(self.counts[-n_samples:].sum())
        return Outputs(self.f[-n:], self.stored[-n:], self.target[-n:], self.counts[-n_samples:], self.head)


def model_inputs(batch: dict) -> dict:
    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    if is_packed(batch):  # transformers reads packed position_ids as separate samples only without a cache
        inputs["use_cache"] = False
    return inputs


def supervised_counts(labels: torch.Tensor) -> torch.Tensor:
    """Outputs per sample: supervised next-token positions for LM labels [B, T], 1 for class
    labels [B] (a convenience for sizing an OutputCache by hand)."""
    if labels.dim() == 1:
        return torch.ones(len(labels), dtype=torch.long)
    return (labels[:, 1:] != -100).sum(1)


def lm_head_trainable(model) -> bool:
    return any(p.requires_grad for p in base_model(model).get_output_embeddings().parameters())


class TokenOutputs:
    """Causal LM: f = next-token logits at the supervised positions."""

    # per logit and centred, so λ means the same on every vocabulary (issue #23, BENCHMARKS §8);
    # the paper's raw sum stays available as pace.consistency=raw_sum
    default_consistency = "centred_mse"

    def forward(self, model, batch: dict) -> Outputs:
        base = base_model(model)
        hooks.start_of_forward(model)  # the decoder is called directly, not the wrapped model
        # no KV cache: a loss forward never reuses one, and its per-layer state would make
        # torch.compile (train.compile) recompile each block for its layer's cache entry
        hidden = base.get_decoder()(**{**model_inputs(batch), "use_cache": False}).last_hidden_state
        labels = batch["labels"]
        mask = labels[:, 1:] != -100
        h = hidden[:, :-1][mask]
        head = base.get_output_embeddings()
        logits = head(h)
        counts = mask.sum(1)
        if is_packed(batch):  # outputs come grouped by sample (packing.py): count them per sample
            counts = torch.bincount(
                batch["segment_index"][:, 1:].to(mask.device)[mask], minlength=len(batch["sample_id"])
            )
        if lm_head_trainable(base):
            return Outputs(logits, logits, labels[:, 1:][mask], counts)
        return Outputs(logits, h, labels[:, 1:][mask], counts, head)

    def loss(self, out: Outputs, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(out.f.float(), out.target, reduction=reduction)

    def output_count(self, example: dict) -> int:
        """Outputs one encoded example gives: its supervised next-token positions."""
        return sum(1 for x in example["labels"][1:] if x != -100)

    def cache_dim(self, model) -> int:
        """A PACE_fast cache row (one per output): the hidden state when the lm_head is frozen, else logits."""
        head = base_model(model).get_output_embeddings()
        if lm_head_trainable(model):
            log.warning(
                "lm_head is trainable: the PACE_fast cache stores full logits (%d per token) instead of hidden states",
                head.out_features,
            )
            return head.out_features
        return head.in_features


class SampleOutputs:
    """Classifier: f = the head's logits; a one-output head is regression (MSE)."""

    default_consistency = "raw_sum"  # the paper's definition, summed over classes

    def __init__(self, regression: bool = False):
        self.regression = regression

    def forward(self, model, batch: dict) -> Outputs:
        logits = model(**model_inputs(batch)).logits
        labels = batch["labels"]
        return Outputs(logits, logits, labels, torch.ones(len(labels), dtype=torch.long, device=labels.device))

    def loss(self, out: Outputs, reduction: str = "mean") -> torch.Tensor:
        if self.regression:
            return F.mse_loss(out.f.squeeze(-1).float(), out.target.float(), reduction=reduction)
        return F.cross_entropy(out.f.float(), out.target, reduction=reduction)

    def output_count(self, example: dict) -> int:
        return 1

    def cache_dim(self, model) -> int:
        return base_model(model).config.num_labels


def outputs_for_model(model):
    """TokenOutputs for a *ForCausalLM, else SampleOutputs (regression when num_labels == 1)."""
    base = base_model(model)
    if hasattr(base, "get_decoder") and type(base).__name__.endswith("ForCausalLM"):
        return TokenOutputs()
    return SampleOutputs(regression=getattr(base.config, "num_labels", 2) == 1)


def forward_outputs(model, batch: dict) -> Outputs:
    """The outputs f of `model` on `batch`, read the way its model family is (outputs_for_model)."""
    return outputs_for_model(model).forward(model, batch)


def cache_dim(model) -> int:
    """Width of a PACE_fast cache row for `model`."""
    return outputs_for_model(model).cache_dim(model)
