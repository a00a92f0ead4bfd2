"""The consistency forms (pace_llm/core/consistency.py) against their definitions, in fp32, alone
and inside the objectives; the calibration signal consistency_grad_ratio."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, perturb_adapters

from pace_llm import OutputCache, PaceConfig, PaceObjective, TokenOutputs, apply_pace, cache_dim
from pace_llm.assets.tiny import tiny_model
from pace_llm.core.consistency import FORMS, get_form
from pace_llm.core.objectives import consistency_grad_ratio
from pace_llm.core.packing import pack


def logits(n=5, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * 3, torch.randn(
        n, v, generator=g, dtype=torch.float64
    ) * 3


def test_raw_sum_is_the_squared_difference_summed_over_the_vocabulary():
    f1, f2 = logits()
    expected = ((f1 - f2) ** 2).sum(-1)
    torch.testing.assert_close(get_form("raw_sum")(f1, f2), expected.float())


def test_centred_mse_is_the_squared_difference_per_logit_after_removing_the_mean():
    f1, f2 = logits()
    c1, c2 = f1 - f1.mean(-1, keepdim=True), f2 - f2.mean(-1, keepdim=True)
    expected = ((c1 - c2) ** 2).mean(-1)
    torch.testing.assert_close(get_form("centred_mse")(f1, f2), expected.float())


def test_centred_mse_ignores_a_constant_added_to_every_logit():
    f1, f2 = logits()
    shift = torch.linspace(-40, 40, len(f1), dtype=f1.dtype)[:, None]  # a different constant per output
    form = get_form("centred_mse")
    torch.testing.assert_close(form(f1 + shift, f2), form(f1, f2), rtol=1e-5, atol=1e-6)
    assert (get_form("raw_sum")(f1 + shift, f2) - get_form("raw_sum")(f1, f2)).abs().max() > 1  # the raw sum does not


def test_symmetric_kl_is_half_the_sum_of_both_kls_and_zero_for_identical_views():
    f1, f2 = logits()
    p1, p2 = f1.softmax(-1), f2.softmax(-1)
    kl12 = (p1 * (p1.log() - p2.log())).sum(-1)
    kl21 = (p2 * (p2.log() - p1.log())).sum(-1)
    form = get_form("kl")
    torch.testing.assert_close(form(f1, f2), (0.5 * (kl12 + kl21)).float())
    assert form(f1, f1).abs().max() < 1e-6
    torch.testing.assert_close(form(f1 + 7.0, f1), torch.zeros(len(f1)), atol=1e-5, rtol=0)  # same distribution


@pytest.mark.parametrize("name", ["raw_sum", "centred_mse"])
def test_the_gram_form_equals_the_term_through_the_head(name):
    """PACE_fast's cached target is a hidden state h_o; through the frozen head W the term is
    d(W h, W h_o) = δhᵀ M δh with M = form.gram(W), exactly (here to fp32 rounding)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 16, generator=g)  # V = 300 > d = 16
    h, h_o = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    form = get_form(name)
    m = form.gram(w)
    assert m.shape == (16, 16) and m.dtype == torch.float32
    delta = h - h_o
    through_gram = ((delta @ m) * delta).sum(-1)
    torch.testing.assert_close(through_gram, form(h @ w.T, h_o @ w.T), rtol=1e-4, atol=1e-4)


def test_kl_has_no_gram_form_and_unknown_names_are_named():
    assert not get_form("kl").quadratic and get_form("kl").gram(torch.ones(3, 2)) is None
    with pytest.raises(ValueError, match="consistency must be one of .*raw_sum.*centred_mse.*kl.*got 'l2'"):
        get_form("l2")
    assert set(FORMS) == {"raw_sum", "centred_mse", "kl"}


# --- the forms inside the objectives (tiny Llama and Phi-3, fp32, padded and packed) ---------

FORM_NAMES = sorted(FORMS)


def adapted(kind):
    model = apply_pace(tiny_model(kind, seed=0), PaceConfig(sigma=1.0, rank=4))
    perturb_adapters(model, seed=1)
    return model.train()


def lm_batch(kind, packed):
    batch = make_batch(kind, batch=4, seq=12)
    if not packed:
        return batch
    samples = [
        {
            "input_ids": batch["input_ids"][i, : 6 + i].tolist(),
            "labels": batch["labels"][i, : 6 + i].tolist(),
            "sample_id": i,
        }
        for i in range(4)
    ]
    return pack(samples, capacity=20, pad_id=0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["llama", "phi3"])
@pytest.mark.parametrize("name", FORM_NAMES)
def test_full_pace_logs_the_form_of_its_two_views(name, kind, packed):
    """Full PACE's term is mean_outputs d(f1, f2) of the two halves of the paired forward: the
    same noise (same seed), read by hand through TokenOutputs, gives the same value."""
    model, batch = adapted(kind), lm_batch(kind, packed)
    objective = PaceObjective("full", lam=1.0, consistency=name)
    torch.manual_seed(5)
    logged = objective(model, batch).consistency_loss
    torch.manual_seed(5)
    with objective.scope(0, batch):
        doubled = objective.forward_batch(batch, 0)
        out = TokenOutputs().forward(model, doubled)
    n = len(batch["sample_id"])
    f1, f2 = out.first(n).f, out.last(n).f
    torch.testing.assert_close(logged, get_form(name)(f1, f2).mean())
    assert logged > 0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["llama", "phi3"])
@pytest.mark.parametrize("name", FORM_NAMES)
def test_fast_pace_uses_the_cached_hidden_states_through_the_frozen_head(name, kind, packed):
    """PACE_fast's term is mean_outputs d(f, W h_o), h_o the hidden state cached last epoch:
    through the Gram form (raw_sum, centred_mse) or the head itself (kl), equal to the
    definition computed from the cache by hand."""
    model, batch = adapted(kind), lm_batch(kind, packed)
    counts = TokenOutputs().forward(model, batch).counts  # outputs per sample, in batch order
    ids = batch["sample_id"]
    cache = OutputCache([int(c) for c in counts[ids.argsort()]], cache_dim(model))
    objective = PaceObjective("fast", lam=1.0, cache=cache, consistency=name)
    torch.manual_seed(1)
    assert objective(model, batch).consistency_loss == 0  # no target yet: the cache is filled
    stored, has = cache.read(ids)
    assert has.all()
    torch.manual_seed(2)  # another noise draw
    logged = objective(model, batch).consistency_loss
    torch.manual_seed(2)
    with objective.scope(0, batch):
        out = TokenOutputs().forward(model, batch)
    head = model.get_output_embeddings()
    expected = get_form(name)(out.f, head(stored.float())).mean()
    torch.testing.assert_close(logged, expected, rtol=2e-4, atol=1e-6)
    assert logged > 0


def test_defaults_centred_mse_for_language_models_and_the_papers_sum_for_classifiers():
    from pace_llm.core.outputs import SampleOutputs

    assert TokenOutputs.default_consistency == "centred_mse"
    assert SampleOutputs.default_consistency == "raw_sum"
    assert PaceObjective.from_config(PaceConfig(consistency="kl")).form.name == "kl"


@pytest.mark.parametrize("consistency, lam", [("auto", 3.0), ("centred_mse", 3.0), ("kl", 20.0), ("raw_sum", 0.1)])
def test_an_unset_lambda_is_the_forms_default(consistency, lam):
    """λ = None follows the form in use: a raw_sum run never gets centred_mse's λ of 3 (which
    would make the vocabulary-summed term dominate); a λ that is set is kept."""
    model = apply_pace(tiny_model("llama"), PaceConfig(sigma=0.5, rank=4))
    perturb_adapters(model)
    objective = PaceObjective.from_config(PaceConfig(consistency=consistency))
    out = objective(model, make_batch("llama"))
    assert objective.lam == lam and out.loss.item() == pytest.approx(
        out.task_loss.item() + lam * out.consistency_loss.item(), rel=1e-5
    )
    assert PaceObjective("full", lam=0.5, consistency=consistency).lam == 0.5


@pytest.mark.parametrize("mode", ["full", "fast", "lazy_half"])
def test_the_gradient_ratio_scales_with_lambda_and_leaves_training_as_it_was(mode):
    """consistency_grad_ratio = ‖∇(λ·consistency)‖ / ‖∇task‖: linear in λ, finite on a tiny
    model, and a measurement only: no .grad, the cache unwritten, the RNG where it was."""
    model, batch = adapted("llama"), lm_batch("llama", False)
    counts = TokenOutputs().forward(model, batch).counts
    ratios = []
    for lam in (0.5, 1.0):
        cache = OutputCache(counts.tolist(), cache_dim(model)) if mode == "fast" else None
        objective = PaceObjective(mode, lam=lam, cache=cache, consistency="centred_mse")
        if mode == "fast":  # a target for every sample, from another noise draw
            torch.manual_seed(0)
            objective(model, batch)
            before = cache.read(batch["sample_id"])[0].clone()
        torch.manual_seed(3)
        ratios.append(consistency_grad_ratio(objective, model, batch, step=1))
        if mode == "fast":
            assert torch.equal(cache.read(batch["sample_id"])[0], before)
        assert all(p.grad is None for p in model.parameters())
    assert all(r is not None and 0 < r < float("inf") for r in ratios)
    assert ratios[1] == pytest.approx(2 * ratios[0], rel=1e-5)
    assert consistency_grad_ratio(PaceObjective("noise"), model, batch, step=1) is None


def test_the_gradient_ratio_restores_the_rng():
    model, batch = adapted("llama"), lm_batch("llama", False)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    consistency_grad_ratio(PaceObjective("full", lam=1.0), model, batch, step=0)
    assert torch.equal(torch.rand(3), expected)
