"""MFU's parts against their definitions: the peak table's lookup and LoRA's 4N FLOPs per token
(a GPU run reports the result: bench/gpu_check.sh)."""

import pytest
import torch

from pace_llm.assets.tiny import tiny_model
from pace_llm.training.mfu import lora_flops_per_token, mfu, peak_flops


@pytest.mark.parametrize(
    "name, dtype, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989),
        ("NVIDIA A10G", torch.float16, 70),  # not the A10's 125
        ("NVIDIA A100-SXM4-40GB", torch.bfloat16, 312),
        ("NVIDIA H100 80GB HBM3", torch.float32, None),  # fp32: TF32 or not, no single peak
        ("Some Future GPU", torch.bfloat16, None),
        ("", torch.bfloat16, None),  # CPU
    ],
)
def test_peak_flops_by_device_name(name, dtype, tflops):
    assert peak_flops(name, dtype) == (None if tflops is None else tflops * 1e12)


def test_lora_flops_per_token_is_four_times_the_linear_weights():
    import pace_llm

    model = tiny_model("llama")
    config = model.config
    d, f, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f  # q, o; k, v; gate, up, down
    expected = 4 * (layers * per_layer + vocab * d)  # + the output head; embeddings are lookups
    assert lora_flops_per_token(model) == expected
    adapted = pace_llm.apply_pace(model, pace_llm.PaceConfig(rank=4))
    assert expected < lora_flops_per_token(adapted) < 1.15 * expected  # adapters: 9% at d 64 r 4, <1% at 2048 r 16
    assert mfu(1000.0, expected, 1e12, world=2, forwards_per_token=2) == pytest.approx(1000 * expected * 2 / 2e12)
