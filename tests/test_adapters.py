"""PACE-LoRA injection, merge and export on tiny Phi-3, Llama, RoBERTa and ViT models."""

import peft
import pytest
import torch
import transformers
from conftest import make_batch, model_inputs, perturb_adapters

import pace_llm
from pace_llm.assets.tiny import tiny_model

ADAPTERS = ["lora_add", "lora_mul_vpt"]


def eval_logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def train_steps(model, kind, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    objective = pace_llm.PaceObjective("full", lam=0.1)
    model.train()
    for step in range(steps):
        out = objective(model, make_batch(kind, seed=step), step)
        out.loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_init_equals_base_and_merge_equals_unmerged(kind, adapter):
    base = tiny_model(kind)
    keys = set(base.state_dict())
    model = pace_llm.apply_pace(tiny_model(kind), pace_llm.PaceConfig(adapter=adapter, sigma=0.5))
    batch = make_batch(kind, seed=9)
    assert torch.equal(eval_logits(model, batch), eval_logits(base, batch))

    train_steps(model, kind)
    trained = eval_logits(model, batch)
    assert (trained - eval_logits(base, batch)).abs().max() > 1e-4  # training changed it
    merged = pace_llm.merge_pace(model)
    assert type(merged) is type(base)
    assert set(merged.state_dict()) == keys
    assert not any("lora" in n or "pace_" in n for n, _ in merged.named_modules())
    assert (eval_logits(merged, batch) - trained).abs().max() <= 1e-5


def test_bf16_merge_is_done_in_fp32():
    model = pace_llm.apply_pace(tiny_model("llama"), pace_llm.PaceConfig(rank=4))
    perturb_adapters(model, scale=0.02)
    model.to(torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.detach().clone()
    delta = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * layer.scaling["default"]
    exact = (w0.float() + delta).bfloat16()
    naive = w0 + delta.bfloat16()  # rounding the delta first, then a bf16 add
    assert not torch.equal(naive, exact)  # the two roundings differ somewhere
    merged = pace_llm.merge_pace(model)
    weight = merged.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, exact)


@pytest.mark.parametrize("kind", ["phi3", "roberta"])
def test_peft_export_reloads_with_peft(kind, tmp_path):
    model = pace_llm.apply_pace(tiny_model(kind), pace_llm.PaceConfig(rank=4, sigma=1.0))
    train_steps(model, kind, steps=2)
    batch = make_batch(kind, seed=5)
    expected = eval_logits(model, batch)
    pace_llm.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path / "adapter")
    assert (eval_logits(reloaded, batch) - expected).abs().max() <= 1e-6  # the head came back too
    again = pace_llm.load_adapter(tiny_model(kind), tmp_path / "adapter")
    assert (eval_logits(again, batch) - expected).abs().max() <= 1e-6


def test_mul_vpt_adapter_round_trip(tmp_path):
    model = pace_llm.apply_pace(tiny_model("vit"), pace_llm.PaceConfig(adapter="lora_mul_vpt", rank=4))
    perturb_adapters(model)
    batch = make_batch("vit")
    pace_llm.save_adapter(model, tmp_path / "adapter")
    again = pace_llm.load_adapter(tiny_model("vit"), tmp_path / "adapter")
    assert torch.equal(eval_logits(again, batch), eval_logits(model, batch))


def test_merged_folder_loads_with_plain_transformers(tmp_path):
    model = pace_llm.apply_pace(tiny_model("phi3"), pace_llm.PaceConfig(rank=4))
    perturb_adapters(model)
    batch = make_batch("phi3")
    expected = eval_logits(model, batch)
    pace_llm.save_merged(model, tmp_path / "merged")
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(loaded).__name__ == "Phi3ForCausalLM"
    assert (eval_logits(loaded, batch) - expected).abs().max() <= 1e-5


def test_only_adapters_and_head_train(kind):
    model = pace_llm.apply_pace(tiny_model(kind), pace_llm.PaceConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert "lora_" in name or "classifier" in name, name
    if kind in ("roberta", "vit"):
        assert any("classifier" in n for n in trainable)


def test_default_targets_per_architecture():
    phi3 = pace_llm.resolve_targets(tiny_model("phi3"), None)
    assert {n.rsplit(".", 1)[1] for n in phi3} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    vit = pace_llm.resolve_targets(tiny_model("vit"), None)
    assert {n.rsplit(".", 1)[1] for n in vit} == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    assert len(vit) == 12  # 6 per block, 2 blocks, not the head
    roberta = pace_llm.resolve_targets(tiny_model("roberta"), None)
    assert {n.rsplit(".", 1)[1] for n in roberta} == {"query", "value"}
    everything = pace_llm.resolve_targets(tiny_model("llama"), "all-linear")
    assert len(everything) == 14 and not any("lm_head" in n for n in everything)
    regex = pace_llm.resolve_targets(tiny_model("llama"), r".*layers\.1\.self_attn\.(q|v)_proj")
    assert regex == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_pattern_matching_nothing_lists_linear_modules():
    with pytest.raises(ValueError) as err:
        pace_llm.apply_pace(tiny_model("llama"), pace_llm.PaceConfig(target_modules=["qkv"]))
    message = str(err.value)
    assert "matched no linear module" in message and "['qkv']" in message
    assert "model.layers.N.self_attn.q_proj" in message and "model.layers.N.mlp.down_proj" in message


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="adapter must be one of"):
        pace_llm.PaceConfig(adapter="dora")
    with pytest.raises(ValueError, match="sigma_schedule"):
        pace_llm.PaceConfig(sigma_schedule="increasing")
