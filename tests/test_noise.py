"""PACE noise (eq. 10-11) measured through real adapted layers, the depth schedule,
σ = 0 as plain LoRA, and activation checkpointing replaying the same noise."""

import math
import re

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import TORCH_DROPOUT, make_batch, model_inputs, perturb_adapters

import pace_llm
from pace_llm.assets.tiny import tiny_model
from pace_llm.core.adapters import add_lora_noise
from pace_llm.core.noisy_lora import is_fused
from pace_llm.core.pace import multiplicative_noise, noise_segments, sigma_for_block

BLOCK = re.compile(r"\.layers?\.(\d+)\.")  # llama/phi3/vit "layers.N.", roberta "layer.N."


@pytest.fixture(autouse=True)
def _unpaired():
    yield
    assert F.dropout is TORCH_DROPOUT  # no test leaves PACE's paired dropout in place


def adapted(kind, adapter="lora_add", sigma=1.0, seed=0, **cfg):
    model = pace_llm.apply_pace(tiny_model(kind, seed=seed), pace_llm.PaceConfig(adapter=adapter, sigma=sigma, **cfg))
    perturb_adapters(model, seed=seed + 1)
    return model


def layer_of_block(model, block, suffix):
    """(module, its NoiseHook) of the adapted layer `suffix` in block `block`."""
    for name, hook in pace_llm.noise_layers(model).items():
        if re.search(rf"layers\.{block}\.", name) and name.endswith(suffix):
            return model.get_submodule(name), hook
    raise LookupError(f"no adapted {suffix} in block {block}")


def measured_z(module, x):
    """Z = (train output − base output) / (eval output − base output), elementwise, in fp64.

    Returns (z [B, T, d_out] with NaN where Δh is too small to divide by,
             z_ref [B, d_out]: Z read at each (sample, channel)'s largest |Δh| token)."""
    with torch.no_grad():
        base = module.base_layer(x)
        module.eval()
        d_eval = module(x) - base
        module.train()
        d_train = module(x) - base
    keep = d_eval.abs() > 1e-6
    assert keep.float().mean() > 0.999  # the adapter is nonzero almost everywhere
    z = torch.where(keep, d_train / d_eval, torch.full_like(d_eval, float("nan")))
    ref_tok = d_eval.abs().argmax(1, keepdim=True)
    return z, z.gather(1, ref_tok).squeeze(1)


# (model kind, adapter, layer suffix): LoRA_add on a bias-free LLaMA layer; LoRA_mul on it;
# LoRA_mul + VPT_add on a ViT layer with a bias (the VPT term Δb = W0·P is noised too).
NOISE_CASES = [("llama", "lora_add", "q_proj"), ("llama", "lora_mul_vpt", "q_proj"), ("vit", "lora_mul_vpt", "fc1")]


@pytest.mark.parametrize("kind,adapter,suffix", NOISE_CASES)
def test_noise_statistics_through_an_adapted_layer(kind, adapter, suffix):
    sigma = 0.8
    model = adapted(kind, adapter, sigma=sigma).double()  # fp64: exact ratios
    for name, p in model.named_parameters():
        if "pace_" in name:  # LoraMulVptLinear computes Δ from fp32 factors (w0.float() @ ...)
            p.data = p.data.float()
    n_samples, n_tokens = 3000, 3
    for block, expected_sigma in ((0, sigma), (1, 2 * sigma / 3)):  # N = 3 ids: σ·3/3, σ·2/3
        module, hook = layer_of_block(model, block, suffix)
        assert hook.sigma == pytest.approx(expected_sigma)
        d_in = module.base_layer.in_features
        x = torch.randn(n_samples, n_tokens, d_in, generator=torch.Generator().manual_seed(block), dtype=torch.float64)
        torch.manual_seed(100 + block)
        z, z_ref = measured_z(module, x)

        # one draw per (sample, channel), shared by all the sample's tokens
        spread = (z - z_ref[:, None, :]).abs().nan_to_num(0.0)
        assert spread.max() < 1e-8, spread.max()
        # different draws for different samples (and channels)
        assert (z_ref[1:] - z_ref[:-1]).abs().amax(-1).min() > 1e-3
        assert (z_ref[:, 1:] - z_ref[:, :-1]).abs().amax(0).min() > 1e-3

        # Z ~ N(1, σ_l²): tolerances from the number of draws
        n = z_ref.numel()
        assert abs(z_ref.mean().item() - 1.0) < 6 * expected_sigma / math.sqrt(n)
        assert abs(z_ref.std().item() - expected_sigma) < 6 * expected_sigma / math.sqrt(2 * n)
        # independent across samples and across channels: correlations ≈ 0
        c = (z_ref - 1.0) / expected_sigma
        m = c.shape[0] * (c.shape[1] - 1)
        assert abs((c[:, 1:] * c[:, :-1]).mean().item()) < 6 / math.sqrt(m)
        assert abs((c[1:] * c[:-1]).mean().item()) < 6 / math.sqrt(m)


def test_noise_is_independent_across_layers_in_one_forward():
    """Two adapted layers of the same forward draw different Z (captured by hooks)."""
    model = adapted("llama", sigma=1.0).double()
    q, _ = layer_of_block(model, 0, "q_proj")
    k, _ = layer_of_block(model, 0, "k_proj")
    captured = {}

    def grab(name):
        def hook(mod, inp, out):
            captured[name] = (inp[0], out)

        return hook

    hooks = [q.register_forward_hook(grab("q")), k.register_forward_hook(grab("k"))]
    model.train()
    with torch.no_grad():
        model(**model_inputs(make_batch("llama", batch=8)))
    for h in hooks:
        h.remove()
    zs = []
    for name, module in (("q", q), ("k", k)):
        x, out_train = captured[name]
        with torch.no_grad():
            base = module.base_layer(x)
            module.eval()
            d_eval = module(x) - base
            module.train()
        zs.append(((out_train - base) / d_eval)[:, 0])  # token 0, [B, d_out]
    assert (zs[0] - zs[1]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kind,adapter", [("llama", "lora_add"), ("llama", "lora_mul_vpt"), ("vit", "lora_mul_vpt"), ("phi3", "lora_add")]
)
def test_no_noise_in_eval_mode(kind, adapter):
    model = adapted(kind, adapter, sigma=1.5)
    inputs = model_inputs(make_batch(kind))
    with torch.no_grad():
        model.eval()
        first, second = model(**inputs).logits, model(**inputs).logits
        model.train()
        noisy = model(**inputs).logits
        for hook in [*pace_llm.noise_layers(model).values(), *pace_llm.head_noise(model).values()]:
            hook.sigma = 0.0
        silent = model(**inputs).logits
    assert torch.equal(first, second)
    assert (noisy - first).abs().max() > 1e-3  # training mode is noisy with σ > 0
    assert torch.equal(silent, first)  # eval = training with σ = 0 (no dropout here)


def _expected_sigma(name, sigma, num_blocks, s, schedule="linear"):
    block = int(BLOCK.search(name).group(1))
    if block < s:
        return 0.0
    if schedule == "constant":
        return sigma
    n_ids = num_blocks + 1
    return sigma * (n_ids - block) / (n_ids - s)


@pytest.mark.parametrize(
    "kind,adapter", [("llama", "lora_add"), ("phi3", "lora_add"), ("roberta", "lora_add"), ("vit", "lora_mul_vpt")]
)
def test_depth_schedule_of_every_noisy_layer(kind, adapter):
    sigma = 1.2
    for s, schedule, by_block in (
        (0, "linear", {0: sigma, 1: 2 * sigma / 3}),
        (1, "linear", {0: 0.0, 1: sigma}),
        (0, "constant", {0: sigma, 1: sigma}),
    ):
        model = pace_llm.apply_pace(
            tiny_model(kind),
            pace_llm.PaceConfig(adapter=adapter, sigma=sigma, sigma_schedule=schedule, first_noisy_block=s),
        )
        layers = pace_llm.noise_layers(model)
        assert len(layers) == len(pace_llm.resolve_targets(tiny_model(kind), None))
        seen = set()
        for name, hook in layers.items():
            block = int(BLOCK.search(name).group(1))
            seen.add(block)
            assert hook.sigma == pytest.approx(by_block[block]), (name, s, schedule)
            assert hook.sigma == pytest.approx(_expected_sigma(name, sigma, 2, s, schedule))
        assert seen == {0, 1}


def test_sigma_for_block_vit_b():
    sigma = 1.2
    vals = [sigma_for_block(sigma, b, 12, first_noisy_block=1) for b in range(13)]
    assert vals[0] == 0.0
    assert vals[1] == pytest.approx(sigma)
    assert vals[11] == pytest.approx(sigma / 6)
    assert vals[12] == pytest.approx(sigma / 12)  # the head: smallest nonzero σ
    assert all(a > b for a, b in zip(vals[1:], vals[2:]))  # strictly decreasing with depth
    assert sigma_for_block(sigma, 0, 12, "constant", 1) == 0.0
    assert sigma_for_block(sigma, 7, 12, "constant", 1) == sigma
    # LLM with s = 0: layer 0 gets σ, the last layer 2σ/(L+1)
    assert sigma_for_block(sigma, 0, 32) == pytest.approx(sigma)
    assert sigma_for_block(sigma, 31, 32) == pytest.approx(2 * sigma / 33)


@pytest.mark.parametrize("kind", ["llama", "roberta"])
def test_sigma_zero_is_plain_lora(kind):
    """Train-mode logits of PACE with σ = 0 equal those of PEFT LoRA with the same weights
    (RoBERTa: with its dropout active, same seed → same masks: σ = 0 draws no noise)."""
    pace = adapted(kind, sigma=0.0, rank=4, alpha=8.0)
    targets = {
        "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "roberta": ["query", "value"],
    }[kind]
    plain = peft.get_peft_model(
        tiny_model(kind),
        peft.LoraConfig(
            r=4,
            lora_alpha=8.0,
            target_modules=targets,
            lora_dropout=0.0,
            modules_to_save=["classifier"] if kind == "roberta" else None,
        ),
    )
    missing, unexpected = plain.load_state_dict(pace.state_dict(), strict=True)
    assert not missing and not unexpected
    inputs = model_inputs(make_batch(kind))
    pace.train(), plain.train()
    torch.manual_seed(3)
    a = pace(**inputs).logits
    torch.manual_seed(3)
    b = plain(**inputs).logits
    assert torch.equal(a, b)
    plain.eval()
    assert (plain(**inputs).logits - a).abs().max() > 1e-4 or kind == "llama"  # dropout was on


def _grads(kind, seed, checkpointing, mode, **overrides):
    model = pace_llm.apply_pace(tiny_model(kind, **overrides), pace_llm.PaceConfig(rank=4, sigma=1.0))
    perturb_adapters(model, scale=0.1)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lora_b = next(
        m
        for n, m in model.named_modules()
        if n.endswith(
            ("layer.0.attention.self.query" if kind == "roberta" else "layers.0.self_attn.o_proj") + ".lora_B.default"
        )
    )
    calls = []
    handle = lora_b.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(seed)
    objective = pace_llm.PaceObjective(mode, lam=1.0)
    with objective.scope(0):  # the checkpointed recomputation runs in backward: it must pair too
        objective(model, make_batch(kind, batch=4), 0).loss.backward()
    handle.remove()
    assert len(calls) == (2 if checkpointing else 1)  # the checkpointed layer was recomputed
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "kind,mode,overrides",
    [
        ("llama", "off", {}),
        ("phi3", "off", {}),
        ("phi3", "full", {"resid_pdrop": 0.1}),
        ("roberta", "full", {}),  # hidden and attention dropout 0.1, shared masks, pairing flag
    ],
)
def test_gradient_checkpointing_replays_the_same_noise(kind, mode, overrides):
    plain = _grads(kind, 0, False, mode, **overrides)
    ckpt = _grads(kind, 0, True, mode, **overrides)
    other = _grads(kind, 1, False, mode, **overrides)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], rtol=1e-5, atol=1e-7), name
    worst = max(((plain[n] - other[n]).abs().max() / plain[n].abs().max()).item() for n in plain)
    assert worst > 1e-2  # another seed, other noise: the comparison above can fail


# --- head noise (the authors' HeadLinear) ------------------------------------------------
NO_DROPOUT = {"roberta": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


@pytest.mark.parametrize("kind,adapter", [("roberta", "lora_add"), ("vit", "lora_mul_vpt"), ("vit", "lora_add")])
def test_head_noise_multiplies_each_sample_and_class_by_z(kind, adapter):
    sigma = 1.2
    model = pace_llm.apply_pace(
        tiny_model(kind, **NO_DROPOUT.get(kind, {})), pace_llm.PaceConfig(adapter=adapter, sigma=sigma, rank=4)
    )
    ((name, hook),) = pace_llm.head_noise(model).items()
    layers = model.config.num_hidden_layers
    assert hook.sigma == pytest.approx(sigma_for_block(sigma, layers, layers)) and hook.sigma > 0
    batch = model_inputs(make_batch(kind, batch=64))
    with torch.no_grad():  # every adapter factor still zero: only the head's noise acts
        model.eval()
        clean = model(**batch).logits
        assert torch.equal(clean, model(**batch).logits)  # eval: deterministic
        model.train()
        ratio = model(**batch).logits / clean
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.15)
    assert ratio.std().item() == pytest.approx(hook.sigma, rel=0.15)
    assert (ratio[0] - ratio[0, 0]).abs().max() > 1e-3  # one draw per class ...
    assert (ratio[:, 0] - ratio[0, 0]).abs().max() > 1e-3  # ... and per sample


@pytest.mark.parametrize("adapter", ["lora_add", "lora_mul_vpt"])
def test_head_noise_off_is_todays_model_and_merge_ignores_it(adapter):
    kind, batch = "vit", model_inputs(make_batch("vit", batch=8))
    torch.manual_seed(0)
    plain = pace_llm.apply_pace(
        tiny_model(kind), pace_llm.PaceConfig(adapter=adapter, sigma=1.0, rank=4, noise_head=False)
    )
    assert pace_llm.head_noise(plain) == {}
    with torch.no_grad():
        plain.eval()
        clean = plain(**batch).logits
        plain.train()
        assert torch.equal(plain(**batch).logits, clean)  # adapters at zero, no head noise: exact
    noisy = pace_llm.apply_pace(tiny_model(kind), pace_llm.PaceConfig(adapter=adapter, sigma=1.0, rank=4))
    perturb_adapters(noisy)
    with torch.no_grad():
        noisy.eval()
        unmerged = noisy(**batch).logits
        merged = pace_llm.merge_pace(noisy)
        merged.train()  # no noise is left in the merged model, even in training mode
        assert pace_llm.head_noise(merged) == {}
        assert (merged(**batch).logits - unmerged).abs().max() <= 1e-5


def test_noise_mode_is_noisy_without_a_consistency_term():
    model = pace_llm.apply_pace(tiny_model("llama"), pace_llm.PaceConfig(mode="noise", sigma=1.0, rank=4))
    perturb_adapters(model)
    model.train()
    objective = pace_llm.PaceObjective.from_config(model.pace_config)
    batch = make_batch("llama")
    torch.manual_seed(0)
    first = objective(model, batch, 0)
    torch.manual_seed(1)
    second = objective(model, batch, 0)
    assert first.consistency_loss.item() == 0.0 and first.loss is first.task_loss
    assert abs(first.loss.item() - second.loss.item()) > 1e-4  # another draw, another loss: noise is on


def _hooked_output(module, x, sigma):
    """What the forward hook on lora_B computed before the fused variant: base + (Δh ⊙ Z) · s."""
    delta = module.lora_B["default"](module.lora_A["default"](module.lora_dropout["default"](x)))
    return module.base_layer(x) + multiplicative_noise(delta, sigma) * module.scaling["default"]


@pytest.mark.parametrize("packed", [False, True])
def test_fused_noise_draws_the_hooks_z(packed):
    """The noise inside PEFT's LoRA forward (NoisyLora) gives, for one seed, the output the
    lora_B hook gave: same Z, the product rounded in another order."""
    model = adapted("llama", sigma=0.7, dropout=0.1)
    module, hook = layer_of_block(model, 0, "q_proj")
    assert is_fused(module) and not module.lora_B["default"]._forward_hooks
    x = torch.randn(4, 6, module.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]] * 2 + [[2, 3, 3, 4, 5, 5]] * 2) if packed else None
    module.train()
    with noise_segments(segments):
        torch.manual_seed(7)
        fused = module(x)
        torch.manual_seed(7)
        hooked = _hooked_output(module, x, hook.sigma)
        torch.manual_seed(8)
        other = module(x)
    torch.testing.assert_close(fused, hooked, rtol=1e-6, atol=1e-6)
    assert (fused - other).abs().max() > 1e-3  # another seed, another draw


def _saved_numel(model, batch) -> int:
    """Elements autograd keeps for backward during one training forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**model_inputs(batch))
    return total


@pytest.mark.parametrize("packed", [False, True])
def test_fused_noise_keeps_only_z_for_backward(packed):
    """σ > 0 keeps, beyond σ = 0 (PEFT's LoRA), one factor per sample and channel per layer:
    no per-token copy of Δh or Z (a hook kept a [B, T, d_out] tensor per layer when packed)."""
    batch = make_batch("llama", batch=4, seq=12)
    # packed: rows of 3 samples of 4 tokens each (the noise reads only the index's shape)
    segments = torch.arange(12).repeat_interleave(4).view(4, 12) if packed else None
    kept = {}
    for sigma in (0.0, 0.5):
        model = adapted("llama", sigma=sigma)
        model.train()
        with noise_segments(segments):
            kept[sigma] = _saved_numel(model, batch)
    layers = [m for m in pace_llm.noise_layers(model) if pace_llm.noise_layers(model)[m].sigma > 0]
    draws = int(segments.max()) + 1 if packed else 4
    per_draw = sum(model.get_submodule(n).base_layer.out_features for n in layers)
    index = segments.numel() * len(layers) if packed else 0  # the segment index, one reference per layer
    assert kept[0.5] - kept[0.0] == draws * per_draw + index


def test_a_lora_layer_without_a_variant_slot_keeps_the_hook():
    """DoRA holds PEFT's variant slot: PACE's noise falls back to the lora_B hook, still noisy."""
    model = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    )
    add_lora_noise(model, pace_llm.PaceConfig(sigma=1.0, rank=4))
    perturb_adapters(model)
    module, _ = layer_of_block(model, 0, "q_proj")
    assert not is_fused(module) and module.lora_B["default"]._forward_hooks
    model.train()
    inputs = model_inputs(make_batch("llama"))
    torch.manual_seed(0)
    first = model(**inputs).logits
    torch.manual_seed(1)
    assert (model(**inputs).logits - first).abs().max() > 1e-4
