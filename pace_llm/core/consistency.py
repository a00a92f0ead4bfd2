"""The forms of PACE's consistency term d(f1, f2), one value per output, behind one interface.

f1, f2 are a pair of outputs of the same input (two noisy views, or the output and its
PACE_fast target from the last epoch): the logits of one sample (classifier) or of one
supervised token over the vocabulary (causal LM). The objective averages d over outputs,
like the task loss.

  raw_sum      ‖f1 − f2‖², summed over the C classes / V vocabulary entries: the paper's
               eq. 12 and the authors' code. For a causal LM its size grows with V and the
               head's norm, and most of it lies along the mean embedding, which shifts every
               logit equally and changes no probability: λ does not carry across models.
  centred_mse  mean_v (d_v − mean_u d_u)², d = f1 − f2: the squared difference per logit
               after removing each output's mean over the vocabulary. Unchanged by a constant
               added to all logits, independent of V in scale: λ means the same on any LM.
  kl           ½ (KL(p1 ‖ p2) + KL(p2 ‖ p1)), p = softmax(f): symmetric KL between the two
               next-token distributions (R-Drop's form), in nats like the task loss.

PACE_fast with a frozen, bias-free lm_head W caches the final hidden state h instead of the
logits (f = W h). For a quadratic form of d alone (raw_sum, centred_mse), d = W δh with
δh = h − h_o, so the term is δhᵀ M δh with a d×d matrix M computed once (`gram`):

  raw_sum      M = WᵀW
  centred_mse  M = (WᵀW − s sᵀ / V) / V,   s = Wᵀ1 (the sum of W's rows)

exact, and V / d times cheaper than building the [outputs, V] logits. kl is not a function
of d alone: its cached target goes through the head, o = W h_o.

A form is one class with `name`, `__call__(f1, f2)`, `default_lam` and, when `quadratic`,
`of_difference` and `gram`; `FORMS` maps the recipe's `pace.consistency` to it.

`default_lam`, the λ a run gets when it sets none: raw_sum 0.1 (the paper's grid, for its
classifier heads); centred_mse 3 (BENCHMARKS.md §5: in the SmolLM2 study λ 3 and 30 both
lowered the held-out loss, 30 more on 12 training problems; 3 keeps the gradient at 0.2-0.5x
the task's, safer on larger data); kl 20 (the same pull as centred_mse's 3 by the calibration of
BENCHMARKS.md §8, where kl's gradient per unit λ is ~1/6 of centred_mse's).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class ConsistencyForm:
    name: str = ""
    default_lam: float = 1.0
    quadratic: bool = True  # a quadratic form of f1 − f2 alone: `of_difference` and `gram` apply

    def __call__(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """d per output, [N] in fp32, for outputs f1, f2 of shape [N, C]."""
        return self.of_difference(f1.float() - f2.float())

    def of_difference(self, diff: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.of_difference")

    def gram(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """M (d×d, fp32) with d(W h, W h_o) = δhᵀ M δh for a head weight W [V, d]; None if the
        form has none."""
        return None


def _gram_and_row_sum(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """WᵀW and Wᵀ1 in fp32, from fp32 copies of `chunk_rows` vocabulary rows at a time."""
    d = weight.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float32, device=weight.device)
    row_sum = torch.zeros(d, dtype=torch.float32, device=weight.device)
    for chunk in weight.split(chunk_rows):
        chunk = chunk.float()
        gram.addmm_(chunk.t(), chunk)
        row_sum += chunk.sum(0)
    return gram, row_sum


class RawSum(ConsistencyForm):
    name = "raw_sum"
    default_lam = 0.1

    def of_difference(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.float().square().sum(-1)

    def gram(self, weight: torch.Tensor) -> torch.Tensor:
        return _gram_and_row_sum(weight)[0]


class CentredMSE(ConsistencyForm):
    name = "centred_mse"
    default_lam = 3.0

    def of_difference(self, diff: torch.Tensor) -> torch.Tensor:
        diff = diff.float()
        return (diff - diff.mean(-1, keepdim=True)).square().mean(-1)

    def gram(self, weight: torch.Tensor) -> torch.Tensor:
        gram, row_sum = _gram_and_row_sum(weight)
        vocab = weight.shape[0]
        return (gram - torch.outer(row_sum, row_sum) / vocab) / vocab


class SymmetricKL(ConsistencyForm):
    name = "kl"
    default_lam = 20.0
    quadratic = False

    def __call__(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        log_p1, log_p2 = F.log_softmax(f1.float(), -1), F.log_softmax(f2.float(), -1)
        # KL(p1‖p2) + KL(p2‖p1) = Σ (p1 − p2)(log p1 − log p2)
        return 0.5 * ((log_p1.exp() - log_p2.exp()) * (log_p1 - log_p2)).sum(-1)


FORMS: dict[str, type[ConsistencyForm]] = {form.name: form for form in (RawSum, CentredMSE, SymmetricKL)}


def get_form(name: str) -> ConsistencyForm:
    if name not in FORMS:
        raise ValueError(f"consistency must be one of {list(FORMS)}, got {name!r}")
    return FORMS[name]()
