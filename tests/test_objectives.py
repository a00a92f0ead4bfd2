"""The PACE objectives (off, full, fast, lazy_half) against their definitions (eq. 12, App. C),
with hand computations from the models' own full outputs."""

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TORCH_DROPOUT, make_batch, model_inputs, perturb_adapters

import pace_llm
from pace_llm.assets.tiny import tiny_model
from pace_llm.core.pace import paired_dropout

NO_DROPOUT = {"roberta": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


@pytest.fixture(autouse=True)
def _unpaired():
    yield
    assert F.dropout is TORCH_DROPOUT  # no test leaves PACE's paired dropout in place


def adapted(kind, sigma=1.0, adapter="lora_add", seed=0, **overrides):
    model = pace_llm.apply_pace(
        tiny_model(kind, seed=seed, **overrides), pace_llm.PaceConfig(adapter=adapter, sigma=sigma, rank=4)
    )
    perturb_adapters(model, seed=seed + 1)
    model.train()
    return model


def lm_batch(batch=4, seq=10, seed=0):
    """A causal-LM batch whose samples have different numbers of supervised tokens."""
    b = make_batch("llama", batch=batch, seq=seq, seed=seed)
    labels = b["input_ids"].clone()
    for i in range(batch):
        labels[i, : 3 + i] = -100  # sample i: seq − 3 − i supervised next-token positions
    b["labels"] = labels
    return b


def subset(batch, idx):
    idx = torch.as_tensor(idx)
    return {k: v[idx] for k, v in batch.items()}


def duplicated(batch):
    return {k: torch.cat([v, v]) for k, v in batch.items()}


def rows_by_hand(model, batch, paired=False):
    """f from model(...)'s full outputs: classifier logits, or the LM's next-token logits at
    the supervised positions (labels[:, 1:] != -100), row-major."""
    with paired_dropout(paired):
        logits = model(**model_inputs(batch)).logits
    labels = batch["labels"]
    if labels.dim() == 1:
        return logits
    return logits[:, :-1][labels[:, 1:] != -100]


def sq_dist(a, b):
    return (a.double() - b.double()).square().sum(-1).mean().item()


# --- full ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("roberta", {}),  # hidden 0.1 + attention-probability 0.1
        ("roberta", {"hidden_dropout_prob": 0.0}),  # attention-probability dropout alone
        ("phi3", {"resid_pdrop": 0.1, "attention_dropout": 0.1}),
    ],
)
def test_full_sigma_zero_has_zero_consistency_under_dropout(kind, overrides, caplog):
    model = adapted(kind, sigma=0.0, **overrides)
    batch = make_batch(kind, batch=4)
    with torch.no_grad():  # dropout is really active: unpaired halves of [x; x] differ
        f = rows_by_hand(model, duplicated(batch))
        n = len(f) // 2
        assert (f[:n] - f[n:]).abs().max() > 1e-4
    with caplog.at_level(logging.WARNING, logger="pace_llm.core.objectives"):
        out = pace_llm.PaceObjective("full", lam=1.0)(model, batch)
    assert out.consistency_loss.item() <= 1e-10
    base = model.base_model.model
    if base.config._attn_implementation != "eager":  # only eager attention exposes its dropout
        pytest.fail(f"paired forward ran under {base.config._attn_implementation!r} attention")
    assert "eager attention" in caplog.text
    out.loss.backward()

    for hook in pace_llm.noise_layers(model).values():  # σ > 0: the views differ
        hook.sigma = 0.5
    out = pace_llm.PaceObjective("full", lam=1.0)(model, batch)
    assert out.consistency_loss.item() > 1e-4


@pytest.mark.parametrize("adapter", ["lora_add", "lora_mul_vpt"])
def test_gradients_reach_adapters_and_head_only(kind, adapter):
    base = tiny_model(kind)
    with torch.no_grad():  # HF initialises biases to 0, which would make LoRA_mul's b0 ⊙ δb dead
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model = pace_llm.apply_pace(base, pace_llm.PaceConfig(adapter=adapter, sigma=1.0, rank=4))
    perturb_adapters(model)
    model.train()
    out = pace_llm.PaceObjective("full", lam=0.5)(model, make_batch(kind))
    out.loss.backward()
    adapter_like = ("lora_", "pace_", "modules_to_save")
    n_adapter = 0
    for name, p in model.named_parameters():
        trainable = any(s in name for s in adapter_like) or (
            adapter == "lora_mul_vpt" and name.startswith("classifier.")
        )
        assert p.requires_grad == trainable, name
        if trainable:
            n_adapter += 1
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name
    assert n_adapter > 0


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_full_task_loss_equals_off_without_noise_or_dropout(kind):
    model = adapted(kind, sigma=0.0, **NO_DROPOUT.get(kind, {}))
    batch = lm_batch() if kind == "llama" else make_batch(kind)
    full = pace_llm.PaceObjective("full", lam=0.3)(model, batch)
    off = pace_llm.PaceObjective("off")(model, batch)
    assert full.task_loss.item() == pytest.approx(off.task_loss.item(), rel=1e-5, abs=1e-7)
    assert full.n_outputs == off.n_outputs
    assert off.consistency_loss.item() == 0.0 and off.loss is off.task_loss
    expected_rows = int((batch["labels"][:, 1:] != -100).sum()) if kind == "llama" else len(batch["labels"])
    assert full.n_outputs == expected_rows


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_full_consistency_and_task_loss_by_hand(kind):
    """σ > 0 (RoBERTa: with dropout): same seed → same noise and masks as the objective."""
    model = adapted(kind, sigma=1.0)
    batch = lm_batch() if kind == "llama" else make_batch(kind)
    lam = 0.3
    objective = pace_llm.PaceObjective("full", lam=lam, consistency="raw_sum")  # the paper's definition, by hand
    objective(model, batch)  # first call: may switch attention to eager (RoBERTa)
    torch.manual_seed(7)
    out = objective(model, batch)
    torch.manual_seed(7)
    with torch.no_grad():
        f = rows_by_hand(model, duplicated(batch), paired=True)
    n = len(f) // 2
    f1, f2 = f[:n], f[n:]
    labels = batch["labels"] if kind == "roberta" else batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    cons = sq_dist(f1, f2)  # mean over rows of Σ_classes / Σ_vocabulary (f1 − f2)²
    assert cons > 1e-3
    assert out.consistency_loss.item() == pytest.approx(cons, rel=1e-4)
    assert out.task_loss.item() == pytest.approx(F.cross_entropy(f1, labels).item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.task_loss.item() + lam * cons, rel=1e-5)
    assert out.n_outputs == len(labels)


# --- fast ------------------------------------------------------------------------------


def test_fast_classifier_uses_last_epoch_logits():
    model = adapted("roberta", sigma=1.0)
    batch = make_batch("roberta", batch=4)
    dim = pace_llm.cache_dim(model)
    assert dim == 3  # num_labels
    cache = pace_llm.OutputCache([1] * 4, dim)
    objective = pace_llm.PaceObjective("fast", lam=0.5, cache=cache)

    torch.manual_seed(10)
    out0 = objective(model, batch, 0)  # epoch 0: nothing stored yet
    torch.manual_seed(10)
    with torch.no_grad():
        logits0 = rows_by_hand(model, batch)
    assert logits0.square().sum(-1).mean() > 1e-3  # a zero target would give a nonzero term
    assert out0.consistency_loss.item() == 0.0
    assert out0.loss.item() == out0.task_loss.item()
    stored, has = cache.read(batch["sample_id"])
    assert has.all()
    assert torch.equal(stored, logits0.to(torch.bfloat16))

    torch.manual_seed(11)
    out1 = objective(model, batch, 1)
    torch.manual_seed(11)
    with torch.no_grad():
        logits1 = rows_by_hand(model, batch)
    expected = sq_dist(logits1, stored.float())
    assert out1.consistency_loss.item() == pytest.approx(expected, rel=1e-5)
    assert out1.loss.item() == pytest.approx(out1.task_loss.item() + 0.5 * expected, rel=1e-5)
    assert torch.equal(cache.read(batch["sample_id"])[0], logits1.to(torch.bfloat16))  # o ← f
    out1.loss.backward()  # the stored target is a constant: backward works, grads on adapters
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fast_causal_lm_caches_hidden_states():
    model = adapted("llama", sigma=1.0)
    base = model.base_model.model
    hidden, vocab = base.config.hidden_size, base.config.vocab_size
    assert pace_llm.cache_dim(model) == hidden != vocab
    batch = lm_batch()
    counts = pace_llm.supervised_counts(batch["labels"])
    assert counts.tolist() == [7, 6, 5, 4]
    cache = pace_llm.OutputCache(counts.tolist(), pace_llm.cache_dim(model))
    assert cache.nbytes == int(counts.sum()) * hidden * 2
    objective = pace_llm.PaceObjective("fast", lam=0.1, cache=cache, consistency="raw_sum")

    torch.manual_seed(20)
    out0 = objective(model, batch, 0)
    assert out0.consistency_loss.item() == 0.0
    torch.manual_seed(20)
    with torch.no_grad():
        logits0 = rows_by_hand(model, batch)
    h0, has = cache.read(batch["sample_id"])
    assert has.all() and h0.shape == (int(counts.sum()), hidden)
    head = base.get_output_embeddings()
    with torch.no_grad():  # the stored rows are the hidden states behind those logits
        err = (head(h0.float()) - logits0).abs().max()
    assert err <= 2e-2 * logits0.abs().max(), err

    torch.manual_seed(21)
    out1 = objective(model, batch, 1)
    torch.manual_seed(21)
    with torch.no_grad():
        logits1 = rows_by_hand(model, batch)
        expected = sq_dist(logits1, head(h0.float()))  # logit space, bf16-rounded h
    assert expected > 1e-3
    assert out1.consistency_loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_fast_samples_without_a_stored_output_get_no_term(kind):
    model = adapted(kind, sigma=1.0)
    batch = lm_batch() if kind == "llama" else make_batch(kind)
    counts = pace_llm.supervised_counts(batch["labels"]).tolist()
    cache = pace_llm.OutputCache(counts, pace_llm.cache_dim(model))
    objective = pace_llm.PaceObjective("fast", lam=1.0, cache=cache, consistency="raw_sum")
    some = subset(batch, [2, 0])
    assert objective(model, some, 0).consistency_loss.item() == 0.0
    stored, has = cache.read(batch["sample_id"])
    rows_of = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    assert torch.equal(has, (rows_of == 0) | (rows_of == 2))

    torch.manual_seed(30)
    out = objective(model, batch, 1)
    torch.manual_seed(30)
    with torch.no_grad():
        f = rows_by_hand(model, batch)
        prev = stored.float()
        if kind == "llama":
            prev = model.base_model.model.get_output_embeddings()(prev)
    expected = sq_dist(f[has], prev[has])  # mean over the rows of samples 0 and 2 only
    with_zero_targets = sq_dist(f, torch.where(has[:, None], prev, torch.zeros_like(prev)))
    assert abs(expected - with_zero_targets) > 1e-2 * expected
    assert out.consistency_loss.item() == pytest.approx(expected, rel=1e-4)
    assert cache.read(batch["sample_id"])[1].all()


# --- lazy_half -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_lazy_half_alternates_paired_half_and_plain_steps(kind):
    model = adapted(kind, sigma=1.0, **NO_DROPOUT.get(kind, {}))
    batch = lm_batch() if kind == "llama" else make_batch(kind)
    lazy = pace_llm.PaceObjective("lazy_half", lam=0.4, lazy_every=2)
    full = pace_llm.PaceObjective("full", lam=0.4)
    off = pace_llm.PaceObjective("off")
    first = subset(batch, [0, 1])

    for step in (0, 1, 2, 3):
        torch.manual_seed(40 + step)
        got = lazy(model, batch, step)
        torch.manual_seed(40 + step)
        want = full(model, first) if step % 2 == 0 else off(model, batch)
        assert got.task_loss.item() == pytest.approx(want.task_loss.item(), rel=1e-6)
        assert got.consistency_loss.item() == pytest.approx(want.consistency_loss.item(), rel=1e-6)
        assert got.n_outputs == want.n_outputs
        if step % 2 == 0:  # paired half batch: consistency reported, task loss on the half
            assert got.consistency_loss.item() > 1e-4
            assert got.n_outputs == int(pace_llm.supervised_counts(first["labels"]).sum())
        else:  # plain step on the whole batch
            assert got.consistency_loss.item() == 0.0
            assert got.n_outputs == int(pace_llm.supervised_counts(batch["labels"]).sum())
        got.loss.backward()


# --- paired dropout stays inside a PACE step ---------------------------------------------


def test_importing_pace_llm_leaves_torch_dropout_untouched():
    code = (
        "import torch.nn.functional as F; before = F.dropout; import pace_llm, pace_llm.training, "
        "pace_llm.tasks; assert F.dropout is before, F.dropout"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dropout_is_unpaired_again_after_a_full_step():
    model = adapted("phi3", resid_pdrop=0.1)
    objective = pace_llm.PaceObjective("full", lam=1.0)
    with objective.scope(0):
        y = torch.nn.Dropout(0.5).train()(torch.ones(4, 64))
        assert torch.equal(y[:2], y[2:])  # inside the step the halves of [x; x] share a mask
        objective(model, make_batch("phi3"), 0).loss.backward()
    assert F.dropout is TORCH_DROPOUT
    y = torch.nn.Dropout(0.5).train()(torch.ones(4, 64))
    assert not torch.equal(y[:2], y[2:])  # independent masks for the two halves


def test_pace_fast_warns_in_runs_too_short_for_its_target():
    """One epoch: no step has a target (the run is noise-only); a few: the term is mostly the model's
    movement between epochs; long runs: nothing to say."""
    from pace_llm.core.objectives import FAST_MIN_EPOCHS, fast_epochs_warning

    assert "noise-only" in fast_epochs_warning(1) and "pace.mode=full" in fast_epochs_warning(1)
    assert "moved in an epoch" in fast_epochs_warning(3)
    assert fast_epochs_warning(FAST_MIN_EPOCHS) is None


@pytest.mark.parametrize("mode", ["off", "full"])
def test_compiled_blocks_share_one_graph_across_layers(mode):
    """train.compile traces a block once for every layer: no per-layer state (a KV cache entry
    per layer made dynamo recompile each block, and past its limit of 8 run eagerly)."""
    import torch._dynamo

    from pace_llm.training.compile import compile_blocks, compile_report

    model = pace_llm.apply_pace(tiny_model("llama", num_hidden_layers=12), pace_llm.PaceConfig(rank=4, sigma=1.0))
    assert compile_blocks(model, backend="eager") == 12
    model.train()
    objective = pace_llm.PaceObjective(mode, lam=1.0)
    for step in range(2):
        with objective.scope(step):
            objective(model, make_batch("llama", batch=4), step).loss.backward()
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] <= 2, compile_report()  # one per dropout variant at most
    assert not counters["graph_break"], compile_report()
