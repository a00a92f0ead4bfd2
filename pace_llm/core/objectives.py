"""The training objectives the trainer calls on a batch: off, full, fast, lazy_half.

    objective = PaceObjective("full", lam=0.1)            # or PaceObjective.from_config(cfg)
    with objective.scope(step, batch):                    # paired dropout spans the backward
        out = objective(model, batch, step)
        out.loss.backward()                               # engine.backward(out.loss)

A batch holds the model inputs, `labels` and `sample_id`. What PACE regularises, f, and the
task loss come from `outputs` (pace_llm/core/outputs.py: TokenOutputs for causal LMs, SampleOutputs for
classifiers), which the task kind passes; without one it is picked from the model's class.
Reductions (pace.py): task loss = mean over rows; consistency = mean over rows of the
squared L2 distance summed over classes / vocabulary. Given a `denominator` (the trainer's
train.loss_normalization=step: the supervised outputs of the whole optimizer step, counted
beforehand with `task_outputs`), both are sums over the batch's outputs / denominator instead, so
the step's micro-batches add up to its mean per row however the samples were batched.

  off        task loss only (plain LoRA when σ = 0).
  noise      the same loss with PACE's noise on (σ > 0): the paper's noise-only ablation.
  full       one forward on [x; x] with shared dropout masks; task loss on the first
             half; λ·consistency(f1, f2). Both halves get gradients (as the authors).
  fast       one forward; λ·consistency(f, o) with o this sample's output stored in
             the previous epoch (OutputCache), a constant target; samples without a
             stored output get no consistency term (with a denominator their outputs
             still count in it); then o ← f.
  lazy_half  every `lazy_every`-th step, `full` on the first half of the batch;
             the other steps `off` on the whole batch (noise stays on).

Packed batches (pace_llm/core/packing.py, `data.packing`) work unchanged: outputs, counts, the
cache and the halves are per sample; `scope(step, batch)` makes the noise one draw per
packed sample, and lazy_half halves by packed rows.

Shared dropout masks hold inside `scope(step)` on paired steps only. A call outside a scope
opens one for its forward alone: enough without activation checkpointing, whose recomputed
forward runs during backward and needs the backward inside the scope too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Optional

import torch

from pace_llm.core import hooks
from pace_llm.core.adapters import base_model
from pace_llm.core.cache import OutputCache
from pace_llm.core.consistency import get_form
from pace_llm.core.neftune import sample_lengths, token_lengths
from pace_llm.core.outputs import Outputs, outputs_for_model, supervised_counts
from pace_llm.core.pace import noise_segments, paired_dropout, reduce_outputs
from pace_llm.core.pace_config import MODES, PaceConfig
from pace_llm.core.packing import duplicate_packed, is_packed, sample_count

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor
    task_loss: torch.Tensor
    consistency_loss: torch.Tensor
    n_outputs: int


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
        log.warning(
            "attention dropout %.3g under %r attention cannot share its mask between "
            "the two PACE views: switching %s to eager attention",
            rate,
            impl,
            type(base).__name__,
        )
        base.set_attn_implementation("eager")


def _duplicate(batch: dict, n: Optional[int] = None) -> dict:
    return {k: torch.cat([v[:n], v[:n]]) if torch.is_tensor(v) else v for k, v in batch.items()}


class PaceObjective:
    def __init__(
        self,
        mode: str = "full",
        lam: Optional[float] = None,
        lazy_every: int = 2,
        cache: Optional[OutputCache] = None,
        outputs=None,
        head_gram: bool = True,
        consistency: str = "auto",
    ):
        """outputs: TokenOutputs / SampleOutputs (None: chosen from the model on the first call).
        consistency: a form of pace_llm.core.consistency.FORMS, or "auto" for the outputs'
        `default_consistency`. lam: None for the form's `default_lam`. head_gram=False computes
        PACE_fast's consistency through the lm_head itself rather than its Gram form (the
        benchmark's before/after comparison)."""
        if mode not in MODES:
            raise ValueError(f"pace.mode must be one of {MODES}, got {mode!r}")
        if mode == "fast" and cache is None:
            raise ValueError("pace.mode=fast needs an OutputCache")
        if lazy_every < 1:
            raise ValueError(f"lazy_every must be >= 1, got {lazy_every}")
        self.consistency = consistency
        self.form = None if consistency == "auto" else get_form(consistency)
        self.mode, self.lam, self.lazy_every, self.cache, self.outputs = mode, lam, lazy_every, cache, outputs
        self.head_gram = head_gram
        self._gram = None  # (lm_head, the form's Gram matrix), computed once

    @classmethod
    def from_config(cls, config: PaceConfig, cache: Optional[OutputCache] = None, outputs=None) -> PaceObjective:
        return cls(config.mode, config.lam, config.lazy_every, cache, outputs, consistency=config.consistency)

    def is_paired(self, step: int) -> bool:
        """Does this step run on [x; x] (full, and lazy_half's every lazy_every-th step)?"""
        return self.mode == "full" or (self.mode == "lazy_half" and step % self.lazy_every == 0)

    @contextlib.contextmanager
    def scope(self, step: int, batch: Optional[dict] = None):
        """Shared dropout masks for this step's forward and backward when it is paired; for a
        packed `batch`, noise per sample of the batch the forward runs on (pace.noise_segments);
        each token's sample length for NEFTune (neftune.sample_lengths)."""
        segments = self.forward_batch(batch, step)["segment_index"] if batch and is_packed(batch) else None
        lengths = token_lengths(batch) if batch else None
        if lengths is not None and self.is_paired(step):  # the rows [x; x] repeats, as forward_batch does
            half = self._task_half(batch, step)
            lengths = torch.cat([lengths[:half], lengths[:half]])
        with paired_dropout(self.is_paired(step)), noise_segments(segments), sample_lengths(lengths):
            yield

    def _task_half(self, batch: dict, step: int) -> Optional[int]:
        """lazy_half's paired steps: the batch rows (packed rows hold several samples) its
        forward doubles and its task loss covers; None: all of them."""
        return max(1, len(batch["labels"]) // 2) if self.mode == "lazy_half" and self.is_paired(step) else None

    def forward_batch(self, batch: dict, step: int) -> dict:
        """What the forward runs on: the batch, or [x; x] on a paired step (lazy_half: the
        first half of the rows; packed rows hold several samples each)."""
        if not self.is_paired(step):
            return batch
        half = self._task_half(batch, step)
        return duplicate_packed(batch, half) if is_packed(batch) else _duplicate(batch, half)

    def task_outputs(self, batch: dict, step: int = 0) -> int:
        """The outputs the task loss of `batch` covers at `step` (LossOutput.n_outputs),
        from its labels, before any forward: what a step's denominator adds up."""
        return int(supervised_counts(batch["labels"][: self._task_half(batch, step)]).sum())

    def __call__(
        self, model, batch: dict, step: int = 0, denominator: Optional[float] = None, write_cache: bool = True
    ) -> LossOutput:
        """denominator: None for means over the batch's outputs, else sums / denominator.
        write_cache=False leaves the PACE_fast cache as it was (a measurement, not a step)."""
        if self.outputs is None:
            self.outputs = outputs_for_model(model)
        if self.form is None:
            self.form = get_form(self.outputs.default_consistency)
        if self.lam is None:
            self.lam = self.form.default_lam
        with self.scope(step, batch):
            if self.is_paired(step):
                return self._paired(model, self.forward_batch(batch, step), denominator)
            out = self.outputs.forward(model, batch)
            task = self._task_loss(out, denominator)
            if self.mode != "fast":  # off, noise, and lazy_half's unpaired steps
                return LossOutput(task, task, task.new_zeros(()), len(out.target))
            return self._fast(batch, out, task, denominator, write_cache)

    def _task_loss(self, out: Outputs, denominator: Optional[float]) -> torch.Tensor:
        if denominator is None:
            return self.outputs.loss(out)
        return self.outputs.loss(out, reduction="sum") / denominator

    def _paired(self, model, batch2: dict, denominator: Optional[float]) -> LossOutput:
        share_attention_dropout(model)
        out = self.outputs.forward(model, batch2)
        n = sample_count(batch2) // 2
        r1, r2 = out.first(n), out.last(n)
        task = self._task_loss(r1, denominator)
        cons = self._reduce(self.form(r1.f, r2.f), denominator)
        return LossOutput(task + self.lam * cons, task, cons, len(r1.target))

    def _fast(
        self, batch: dict, out: Outputs, task: torch.Tensor, denominator: Optional[float], write_cache: bool = True
    ) -> LossOutput:
        ids = batch["sample_id"]
        stored, has = self.cache.read(ids)
        stored, has = stored.to(out.stored.device), has.to(out.stored.device)
        cons = task.new_zeros(())
        head, gram = out.head, None
        if head is not None:
            gram = self._head_gram(head)  # before has.any(): under ZeRO-3 every rank gathers
        if has.any():
            prev = stored[has].to(out.stored.dtype)
            if head is None:  # cached logits
                cons = self._reduce(self.form(out.f[has], prev), denominator)
            elif gram is not None:  # d(W h, W h_o) = (h − h_o)ᵀ M (h − h_o)
                diff = out.stored[has].float() - stored[has].float()
                cons = reduce_outputs(((diff @ gram) * diff).sum(-1), denominator)
            elif self.form.quadratic and head.bias is None:  # cached hidden states: f − o = W(h − h_o)
                cons = self._reduce(self.form.of_difference(head(out.stored[has] - prev)), denominator)
            else:
                cons = self._reduce(self.form(out.f[has], head(prev)), denominator)
        if write_cache:
            self.cache.write(ids.cpu(), out.stored.detach())
        return LossOutput(task + self.lam * cons, task, cons, len(out.target))

    @staticmethod
    def _reduce(per_output: torch.Tensor, denominator: Optional[float]) -> torch.Tensor:
        if per_output.numel() == 0:
            return per_output.new_zeros((), dtype=torch.float32)
        return reduce_outputs(per_output, denominator)

    def _head_gram(self, head) -> Optional[torch.Tensor]:
        """The form's Gram matrix M (d×d, fp32; WᵀW for raw_sum) of a frozen, bias-free,
        unquantized lm_head W, computed once.

        PACE_fast's consistency for a cached hidden state h_o is d(W h, W h_o); for a quadratic
        form as (h − h_o)ᵀ M (h − h_o) it costs d² per output, forward and backward, instead of d·V
        and never builds an [outputs, V] tensor: V / d times fewer FLOPs (10x for Phi-3, 85x for
        SmolLM2; its effect on step time and memory: BENCHMARKS.md §1).
        None (use W itself) when the head has a bias, is quantized or is not wider than d, or
        the form is not quadratic (kl).
        """
        if not self.head_gram or not self.form.quadratic:
            return None
        if self._gram is not None and self._gram[0] is head:
            return self._gram[1]
        w = head.weight
        if (
            head.bias is not None
            or w.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or hasattr(w, "quant_state")
            or head.in_features >= head.out_features
        ):
            self._gram = (head, None)
            return None
        with hooks.gathered([w]), torch.no_grad():  # ZeRO-3: whole on every rank, once
            gram = self.form.gram(w)
        self._gram = (head, gram)
        return gram


FAST_MIN_EPOCHS = 10  # below this PACE_fast's term is mostly the model's own movement (BENCHMARKS §5)


def fast_epochs_warning(epochs: float) -> Optional[str]:
    """What a PACE_fast run of `epochs` epochs should be told, or None.

    Its target is the sample's output from the previous epoch, so the first epoch has none,
    and afterwards the term holds ‖f_e − f_(e−1)‖², how far the model moved in an epoch, on top
    of the noise consistency: in a short run at a fine-tuning learning rate the movement
    dominates and the term anchors the model to where it was an epoch ago."""
    if epochs <= 1:
        return (
            f"pace.mode=fast over {epochs:g} epoch: its consistency target is each sample's output from the "
            "previous epoch, so no step has one and this run is noise-only training (pace.mode=noise); "
            "use pace.mode=full or lazy_half"
        )
    if epochs < FAST_MIN_EPOCHS:
        return (
            f"pace.mode=fast over {epochs:g} epochs: its target is last epoch's output, so its term also "
            "measures how far the model moved in an epoch, and in short runs that movement, not the noise, "
            f"is most of it (an anchor to the previous epoch); below {FAST_MIN_EPOCHS} epochs prefer "
            "pace.mode=full or lazy_half, or select λ for fast on its own (BENCHMARKS.md §5)"
        )
    return None


def consistency_grad_ratio(objective: PaceObjective, model, batch: dict, step: int) -> Optional[float]:
    """‖∇(λ·consistency)‖ / ‖∇task‖ over the trainable parameters, on one batch at `step`.

    Above 1 the consistency, not the task, steers the update; far below it PACE barely
    regularises. A measurement, not a step: no gradient is accumulated, the PACE_fast cache is
    not written and torch's RNG is restored, so training continues as if it had not run
    (lazy_half is measured on its next paired step's batch layout). Every rank must call it
    (the forward and backward are collective under ZeRO-3). None in modes without the term.
    """
    if objective.mode in ("off", "noise"):
        return None
    if objective.mode == "lazy_half":
        step -= step % objective.lazy_every
    params = [p for p in model.parameters() if p.requires_grad]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with objective.scope(step, batch):
            result = objective(model, batch, step, write_cache=False)
            # + 0·task: a graph on every rank, also where no sample had a cached target yet
            consistency = objective.lam * result.consistency_loss + 0 * result.task_loss
            task_grads = torch.autograd.grad(result.task_loss, params, retain_graph=True, allow_unused=True)
            consistency_grads = torch.autograd.grad(consistency, params, allow_unused=True)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    def norm(grads) -> float:
        return float(sum(g.float().square().sum() for g in grads if g is not None)) ** 0.5

    task_norm = norm(task_grads)
    return norm(consistency_grads) / task_norm if task_norm > 0 else None
