"""NEFTune (pace_llm/core/neftune.py): uniform noise of magnitude α / sqrt(L·d) on the input
embeddings, L each sample's own length, padded or packed."""

from __future__ import annotations

import math

import torch

from pace_llm.assets.tiny import tiny_model
from pace_llm.core.neftune import add_neftune, sample_lengths, token_lengths
from pace_llm.core.packing import pack

ALPHA = 5.0


def embedding_noise(model, input_ids, lengths=None):
    """What the hook adds to the embeddings of `input_ids` (training mode)."""
    embed = model.get_input_embeddings()
    embed.eval()
    clean = embed(input_ids)
    embed.train()
    with sample_lengths(lengths):
        return embed(input_ids) - clean


def test_padded_rows_get_the_noise_of_their_own_length():
    torch.manual_seed(0)
    model = tiny_model("llama")
    d = model.config.hidden_size
    handle = add_neftune(model, ALPHA)
    ids = torch.randint(3, 200, (2, 400))
    mask = torch.zeros(2, 400, dtype=torch.long)
    mask[0, :400], mask[1, :25] = 1, 1  # lengths 400 and 25
    noise = embedding_noise(model, ids, token_lengths({"input_ids": ids, "attention_mask": mask}))
    for row, length in ((0, 400), (1, 25)):
        bound = ALPHA / math.sqrt(length * d)
        values = noise[row, :length]
        assert values.abs().max() <= bound * (1 + 1e-5)
        assert values.abs().max() > 0.95 * bound  # uniform on (−m, m): the max nears m
        assert abs(values.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(−m, m)
    handle.remove()
    assert embedding_noise(model, ids).abs().max() == 0  # removed: no noise


def test_no_noise_in_eval_mode_and_the_row_width_without_lengths():
    torch.manual_seed(0)
    model = tiny_model("llama")
    add_neftune(model, ALPHA)
    ids = torch.randint(3, 200, (1, 64))
    embed = model.get_input_embeddings().eval()
    assert torch.equal(embed(ids), embed(ids))
    noise = embedding_noise(model, ids)  # no lengths: transformers' rule, the row's width
    bound = ALPHA / math.sqrt(64 * model.config.hidden_size)
    assert bound * 0.9 < noise.abs().max() <= bound * (1 + 1e-5)


def test_a_packed_sample_gets_the_scale_it_gets_padded():
    """Two samples of 30 and 90 tokens packed into one row of 128: each token's magnitude is
    its own sample's, α / sqrt(L·d), not the packed row's width (transformers' packing bug)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    d = model.config.hidden_size
    add_neftune(model, ALPHA)
    samples = [
        {"input_ids": list(range(3, 33)), "labels": list(range(3, 33)), "sample_id": 0},
        {"input_ids": list(range(3, 93)), "labels": list(range(3, 93)), "sample_id": 1},
    ]
    batch = pack(samples, capacity=128, pad_id=0)
    lengths = token_lengths(batch)
    assert lengths.shape == batch["input_ids"].shape
    noise = embedding_noise(model, batch["input_ids"], lengths)
    index = batch["segment_index"]
    for segment, sample in enumerate(batch["sample_order"].tolist()):  # segments in packing order
        length = len(samples[sample]["input_ids"])
        assert lengths[index == segment].unique().tolist() == [length]
        values = noise[index == segment]
        bound = ALPHA / math.sqrt(length * d)
        assert values.abs().max() <= bound * (1 + 1e-5) and values.abs().max() > 0.9 * bound
    assert sorted(lengths[index >= 0].unique().tolist()) == [30, 90]


def test_a_paired_step_gives_both_copies_their_samples_lengths():
    """Full PACE runs on [x; x] (lazy_half on the first half twice): inside the objective's
    scope each row of the doubled batch gets its sample's length, padded and packed."""
    from pace_llm import PaceObjective
    from pace_llm.core import neftune

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    batch = {
        "input_ids": torch.ones(4, 4, dtype=torch.long),
        "attention_mask": mask,
        "labels": torch.ones(4, 4, dtype=torch.long),
        "sample_id": torch.arange(4),
    }
    for mode, step, rows in (("full", 0, [0, 1, 2, 3]), ("lazy_half", 0, [0, 1]), ("lazy_half", 1, None)):
        objective = PaceObjective(mode)
        with objective.scope(step, batch):
            seen = neftune._lengths
        expected = token_lengths(batch) if rows is None else token_lengths(batch)[rows].repeat(2, 1)
        assert torch.equal(seen, expected), (mode, step)
        doubled = objective.forward_batch(batch, step)
        assert torch.equal(token_lengths(doubled), expected)  # what the forward really runs on
