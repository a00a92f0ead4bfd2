import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TORCH_DROPOUT = F.dropout  # before pace_llm is imported: what torch itself provides

from pace_llm.assets.tiny import tiny_model  # noqa: E402

KINDS = ["phi3", "llama", "roberta", "vit"]


def make_batch(kind: str, batch: int = 4, seq: int = 10, seed: int = 0) -> dict:
    """A batch in the trainer's format: model inputs, labels, sample ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(batch)
    if kind == "vit":
        return {
            "pixel_values": torch.randn(batch, 3, 32, 32, generator=g),
            "labels": torch.randint(0, 5, (batch,), generator=g),
            "sample_id": ids,
        }
    input_ids = torch.randint(3, 256, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if kind == "roberta":
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": torch.randint(0, 3, (batch,), generator=g),
            "sample_id": ids,
        }
    labels = input_ids.clone()
    labels[:, : seq // 2] = -100  # the prompt half is not supervised
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "sample_id": ids}


def lm_samples(lengths, seed: int = 0, first_id: int = 0) -> list[dict]:
    """Encoded causal-LM samples of these lengths: random ids, a prompt of a third, supervised
    after it; sample ids first_id, first_id + 1, ..."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :], "sample_id": first_id + i})
    return out


def padded_lm(samples: list[dict]) -> dict:
    """The unpacked causal-LM batch of these samples: right-padded, labels -100 on the padding."""
    from pace_llm.tasks.base import pad_tokens

    batch = pad_tokens(samples, 0)
    labels = torch.full_like(batch["input_ids"], -100)
    for i, s in enumerate(samples):
        labels[i, : len(s["labels"])] = torch.tensor(s["labels"])
    return {**batch, "labels": labels}


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "sample_id")}


def perturb_adapters(model, seed: int = 1, scale: float = 0.1) -> None:
    """Give the zero-initialised adapter factors values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def tiny():
    return tiny_model
