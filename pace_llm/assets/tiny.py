"""Tiny models built from configs (no download): for tests, smoke runs and recipes/tiny.yaml.

Head dimension 32 so vLLM's CPU attention accepts the causal LMs.
"""

from __future__ import annotations

import torch
import transformers

_LM = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
_ENC = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=130,
)


def tiny_config(kind: str, **overrides):
    if kind == "phi3":
        return transformers.Phi3Config(**{**_LM, "pad_token_id": 0, **overrides})
    if kind == "llama":
        return transformers.LlamaConfig(**{**_LM, "pad_token_id": 0, **overrides})
    if kind == "roberta":
        return transformers.RobertaConfig(**{**_ENC, "num_labels": 3, "pad_token_id": 1, **overrides})
    if kind == "vit":
        vit = {k: v for k, v in _ENC.items() if k not in ("vocab_size", "max_position_embeddings")}
        return transformers.ViTConfig(
            **{**vit, "image_size": 32, "patch_size": 8, "num_channels": 3, "num_labels": 5, **overrides}
        )
    raise ValueError(f"unknown tiny model kind {kind!r}: phi3, llama, roberta, vit")


def tiny_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(kind, **overrides)
    cls = {
        "phi3": transformers.Phi3ForCausalLM,
        "llama": transformers.LlamaForCausalLM,
        "roberta": transformers.RobertaForSequenceClassification,
        "vit": transformers.ViTForImageClassification,
    }[kind]
    return cls(config).float()


TINY_SPECIALS = ["<pad>", "<unk>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Phi-3's chat format, so the tiny models exercise the same template path as the real ones.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True):
    """A character-level tokenizer (printable ASCII + newline + specials, < 128 ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|[a-z]+\|>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    if chat_template:
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_arithmetic(n: int, seed: int = 0) -> list[dict]:
    """GSM-shaped rows: {"question": "What is 12 + 7?", "answer": "12 + 7 = 19\\n#### 19"}."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for a, b in torch.randint(0, 50, (n, 2), generator=g).tolist():
        rows.append({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


_GOOD = ["good", "great", "fine", "nice", "warm", "bright"]
_BAD = ["bad", "poor", "dull", "cold", "dark", "awful"]
_NEUTRAL = ["the", "film", "was", "a", "plot", "and", "very", "cast", "story"]


def tiny_sentences(n: int, seed: int = 0) -> list[dict]:
    """SST-2-shaped rows: {"sentence", "label"}, label 1 when good words outnumber bad ones."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        n_good, n_bad = (int(x) for x in torch.randint(0, 4, (2,), generator=g))
        if n_good == n_bad:
            n_good += 1
        words = [_GOOD[int(i)] for i in torch.randint(0, len(_GOOD), (n_good,), generator=g)]
        words += [_BAD[int(i)] for i in torch.randint(0, len(_BAD), (n_bad,), generator=g)]
        words += [_NEUTRAL[int(i)] for i in torch.randint(0, len(_NEUTRAL), (4,), generator=g)]
        order = torch.randperm(len(words), generator=g).tolist()
        rows.append({"sentence": " ".join(words[i] for i in order), "label": int(n_good > n_bad)})
    return rows


def tiny_images(n: int, seed: int = 0, size: int = 32, classes: int = 4) -> list[dict]:
    """{"image": uint8 [size, size, 3], "label"}: the label is the brightest quadrant."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    half = size // 2
    for label in torch.randint(0, classes, (n,), generator=g).tolist():
        image = torch.randint(0, 120, (size, size, 3), generator=g)
        r, c = divmod(label, 2)
        image[r * half : (r + 1) * half, c * half : (c + 1) * half] += 120
        rows.append({"image": image.to(torch.uint8).numpy(), "label": label})
    return rows
