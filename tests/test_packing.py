"""Padding-free packing (data.packing, pace_llm/packing.py): the same samples give the same
losses and gradients packed or padded, samples in a row cannot see each other, and PACE's
noise stays one draw per sample and channel."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pace_llm
from pace_llm.objectives import PaceObjective
from pace_llm.packing import best_fit_decreasing, duplicate_packed, pack
from pace_llm.pace import multiplicative_noise, noise_segments
from pace_llm.rows import TokenRows, model_inputs
from pace_llm.tasks.base import pad_tokens
from pace_llm.tiny import tiny_model

from conftest import perturb_adapters

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [9, 4, 7, 3, 12, 5, 6, 2]  # packed into rows of 16 tokens: 3 rows, several per row


def samples(lengths=LENGTHS, seed=0):
    """Encoded samples: a prompt of about a third, supervised after it; ids 10, 11, ..."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        out.append({"input_ids": ids, "labels": labels, "sample_id": 10 + i})
    return out


def padded(batch_samples):
    batch = pad_tokens(batch_samples, 0)
    labels = torch.full_like(batch["input_ids"], -100)
    for i, s in enumerate(batch_samples):
        labels[i, : len(s["labels"])] = torch.tensor(s["labels"])
    return {**batch, "labels": labels}


def adapted(kind, sigma=0.0, seed=0):
    model = pace_llm.apply_pace(tiny_model(kind, seed=seed), pace_llm.PaceConfig(sigma=sigma, rank=4))
    perturb_adapters(model, seed=seed + 1)
    model.train()
    return model


def per_sample(rows, sample_ids):
    """{sample id: its rows' logits}."""
    return dict(zip(sample_ids.tolist(), rows.f.split(rows.counts.tolist())))


def test_best_fit_decreasing_is_tight_and_deterministic():
    rows = best_fit_decreasing(LENGTHS, 16)
    assert sorted(i for r in rows for i in r) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in r) <= 16 for r in rows)
    assert len(rows) == -(-sum(LENGTHS) // 16)  # 48 tokens: 3 full rows
    assert rows == best_fit_decreasing(LENGTHS, 16)
    assert best_fit_decreasing([20, 3], 16) == [[0], [1]]  # an over-long sample gets its own row


def test_packed_batch_layout():
    s = samples()
    batch = pack(s, 16, pad_id=0)
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= 16
    assert sorted(batch["sample_order"].tolist()) == list(range(len(s)))
    segment, positions, labels = batch["segment_index"], batch["position_ids"], batch["labels"]
    for k, i in enumerate(batch["sample_order"].tolist()):
        assert batch["sample_id"][k] == s[i]["sample_id"]
        where = segment == k
        assert int(where.sum()) == len(s[i]["input_ids"])
        assert positions[where].tolist() == list(range(len(s[i]["input_ids"])))  # restarts at 0
        assert batch["input_ids"][where].tolist() == s[i]["input_ids"]
        assert labels[where][0] == -100 and labels[where][1:].tolist() == s[i]["labels"][1:]
    flat = segment[segment >= 0]
    assert torch.all(flat[1:] >= flat[:-1])  # numbered row-major: rows come grouped by sample


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_sigma_zero_packed_equals_padded(kind):
    """Same per-sample rows, losses and adapter gradients, fp32, rel 1e-5; full PACE too."""
    s = samples()
    grads, rows_of, losses = {}, {}, {}
    for how, batch in (("padded", padded(s)), ("packed", pack(s, 16, 0))):
        model = adapted(kind)
        rows = TokenRows().forward(model, batch)
        rows_of[how] = per_sample(rows, batch["sample_id"])
        losses[how] = {i: torch.nn.functional.cross_entropy(f, t).item() for i, f, t in zip(
            batch["sample_id"].tolist(), rows.f.split(rows.counts.tolist()), rows.target.split(rows.counts.tolist()))}
        out = PaceObjective("full", lam=0.1, rows=TokenRows())(model, batch)
        assert out.consistency_loss.item() == 0.0
        out.loss.backward()
        grads[how] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert rows_of["packed"].keys() == rows_of["padded"].keys()
    for i, f in rows_of["padded"].items():
        torch.testing.assert_close(rows_of["packed"][i], f, rtol=1e-5, atol=1e-5)
        assert losses["packed"][i] == pytest.approx(losses["padded"][i], rel=1e-5)
    for n, g in grads["padded"].items():  # relative to the tensor's norm: sums run in another order
        assert (grads["packed"][n] - g).norm() <= 1e-5 * g.norm(), n


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_a_sample_cannot_see_its_row_neighbours(kind):
    model = adapted(kind).eval()
    batch = pack(samples(), 16, 0)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    row = int((batch["segment_index"] >= 0).sum(1).argmax())
    victim = int(batch["segment_index"][row, 0])
    where = batch["segment_index"] == victim
    changed["input_ids"][where] = (changed["input_ids"][where] + 7) % 250 + 3
    with torch.no_grad():
        before = model(**model_inputs(batch)).logits
        after = model(**model_inputs(changed)).logits
    others = (batch["segment_index"] >= 0) & ~where
    assert torch.equal(before[others], after[others])  # exactly
    assert not torch.equal(before[where], after[where])


def test_noise_is_one_draw_per_packed_sample():
    sigma, rows, per_row, length, d = 0.5, 4, 50, 3, 512
    segment = torch.arange(rows * per_row).repeat_interleave(length).view(rows, per_row * length)
    segment = torch.cat([segment, torch.full((rows, 2), -1)], 1)  # an unused tail
    torch.manual_seed(0)
    with noise_segments(segment):
        z = multiplicative_noise(torch.ones(rows, segment.shape[1], d), sigma)
    per_sample = torch.stack([z[segment == k][0] for k in range(rows * per_row)])  # [S, d]
    for k in range(rows * per_row):
        assert torch.equal(z[segment == k], per_sample[k].expand(length, d))  # same on each token
    assert per_sample.mean().item() == pytest.approx(1.0, abs=0.01)
    assert per_sample.std().item() == pytest.approx(sigma, rel=0.02)
    centred = per_sample - 1  # neighbours in a row are uncorrelated (|r| ~ 1/sqrt(d))
    r = torch.nn.functional.cosine_similarity(centred[:-1], centred[1:], dim=1)
    assert r.abs().mean().item() < 0.1
    torch.manual_seed(0)  # outside the block: one draw per row, the unpacked path
    assert multiplicative_noise(torch.ones(2, 5, 8), sigma).shape == (2, 5, 8)


def test_paired_copies_of_a_packed_batch_draw_their_own_noise():
    """Full PACE on packed rows: the copies are new samples with independent draws; at σ = 0
    they are identical, at σ > 0 they differ, and the noise is per sample, not per row."""
    batch = pack(samples(), 16, 0)
    twice = duplicate_packed(batch)
    s = len(batch["sample_id"])
    assert twice["segment_index"].max() == 2 * s - 1 and len(twice["sample_id"]) == 2 * s
    for sigma, equal in ((0.0, True), (1.0, False)):
        model = adapted("llama", sigma=sigma)
        objective = PaceObjective("full", rows=TokenRows())
        with torch.no_grad(), objective.scope(0, batch):
            out = TokenRows().forward(model, twice)
        first, second = out.first(s), out.last(s)
        assert torch.equal(first.f, second.f) == equal
    half = duplicate_packed(batch, 1)  # lazy_half: the first row's samples, twice
    m = int(batch["segment_index"][0].max()) + 1
    assert len(half["sample_id"]) == 2 * m and len(half["input_ids"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "fast"])
def test_packed_training_run_exports_merged_equal_trained(tmp_path, mode):
    out = tmp_path / mode
    cmd = [sys.executable, "launch/train.py", "recipes/tiny.yaml", f"output_dir={out}", f"pace.mode={mode}",
           "data.packing=true", "train.max_steps=6", "train.save_every=0", "train.epochs=2"]
    if mode == "fast":  # a second epoch within the run, so the cache is read back
        cmd += ["data.limit=16", "train.max_steps=8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train and all(r["loss"] == r["loss"] for r in train)
    if mode == "fast":
        assert train[-1]["consistency_loss"] > 0  # the epoch-1 targets, read by sample id
    assert json.loads((out / "export_check.json").read_text())["max_abs_logit_diff"] <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "fast"])
def test_sigma_zero_training_logs_the_same_losses_packed_or_padded(tmp_path, mode):
    """The micro-batch holds the same samples either way: same losses step by step, same eval
    loss; fast: 2 epochs of 4 steps, so epoch 1 reads the cache back by sample id."""
    logged = {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        cmd = [sys.executable, "launch/train.py", "recipes/tiny.yaml", f"output_dir={out}", f"pace.mode={mode}",
               "pace.sigma=0", f"data.packing={packing}", "data.limit=16", "train.max_steps=8",
               "train.save_every=0", "train.export_check=false"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        logged[packing] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for padded_row, packed_row in zip(logged["false"], logged["true"], strict=True):
        for key in ("loss", "consistency_loss", "eval_loss"):
            if key in padded_row:
                assert packed_row[key] == pytest.approx(padded_row[key], rel=1e-5), (padded_row["step"], key)
    if mode == "fast":
        assert logged["true"][-1]["consistency_loss"] > 0


@pytest.mark.slow
def test_sigma_zero_two_rank_zero2_same_losses_packed_or_padded(tmp_path):
    """2 ranks under DeepSpeed ZeRO-2, full PACE at σ = 0: the same losses packed or padded,
    and the packed run exports a merged model equal to the trained one."""
    from trainrun import launch, metrics
    logged = {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        launch("torchrun", out, "deepspeed.zero_stage=2", "pace.mode=full", "pace.sigma=0",
               f"data.packing={packing}", "train.max_steps=4", "train.save_every=0")
        logged[packing] = metrics(out)
    assert len(logged["true"]) == 4
    for padded_row, packed_row in zip(logged["false"], logged["true"], strict=True):
        for key in ("loss", "task_loss"):
            assert packed_row[key] == pytest.approx(padded_row[key], rel=1e-5), (padded_row["step"], key)
    assert json.loads((tmp_path / "true" / "export_check.json").read_text())["max_abs_logit_diff"] <= 1e-4
