"""Token-budget micro-batches (train.micro_batch_tokens, pace_llm/core/token_batches.py): every
batch fits the budget, every sample of a rank's shard comes once an epoch, ranks run as many
batches, the grouping is deterministic and reshuffled each epoch, the trainer's steps and
schedule follow each epoch's count, a resumed run replays the same batches, and a step's
gradient is that of the same samples padded in one batch."""

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import lm_samples, padded_lm, perturb_adapters
from torch.utils.data import DataLoader
from trainrun import launch, metrics

import pace_llm
from pace_llm.assets.tiny import tiny_model
from pace_llm.config import load_recipe
from pace_llm.core.objectives import PaceObjective
from pace_llm.core.outputs import TokenOutputs
from pace_llm.core.packing import pack
from pace_llm.core.token_batches import TokenBatchSampler, equalise
from pace_llm.tasks import get_task
from pace_llm.training.state import Progress
from pace_llm.training.trainer import Trainer

# 150 samples of 4-32 tokens in budgets of 48: over 2 ranks, rank 1 groups fewer batches than
# rank 0 (29 vs 31-33) and is equalised by splits; the count differs between epochs (31, 31, 33, 32)
LENGTHS = torch.randint(4, 33, (150,), generator=torch.Generator().manual_seed(0)).tolist()
BUDGET = 48


def samplers(world, lengths=LENGTHS, budget=BUDGET, seed=0):
    return [TokenBatchSampler(lengths, budget, rank, world, seed=seed) for rank in range(world)]


def tokens(batch, lengths=LENGTHS):
    return sum(lengths[i] for i in batch)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batches_fit_the_budget_and_hold_each_shard_sample_once(world):
    ranks = samplers(world)
    for epoch in range(3):
        per_rank = [s.batches(epoch) for s in ranks]
        assert len({len(b) for b in per_rank}) == 1, epoch  # every rank runs as many micro-batches
        for s, batches in zip(ranks, per_rank):
            assert all(0 < tokens(b) <= BUDGET for b in batches)
            assert sorted(i for b in batches for i in b) == s.shard  # each once, none split
        assert sorted(i for b in per_rank for batch in b for i in batch) == list(range(len(LENGTHS)))
        fill = sum(LENGTHS) / (BUDGET * sum(len(b) for b in per_rank))
        assert fill > 0.85, (epoch, fill)  # windows of 16 budgets pack nearly full


def test_counts_are_equalised_and_follow_the_epoch():
    ranks = samplers(2)
    counts = [[len(s.batches(e)) for s in ranks] for e in range(4)]
    assert counts == [[31, 31], [31, 31], [33, 33], [32, 32]]  # per epoch; rank 1 split to match
    for s in ranks:
        s.set_epoch(2)
        assert len(s) == 33 and list(s) == s.batches(2)
        s.set_epoch(0)
        assert len(s) == 31 and len(list(DataLoader(range(150), batch_sampler=s, collate_fn=list))) == 31


def test_grouping_is_deterministic_and_reshuffled_each_epoch():
    first, again, other_seed = samplers(2), samplers(2), samplers(2, seed=1)
    for a, b, c in zip(first, again, other_seed):
        assert a.batches(0) == b.batches(0) and a.batches(1) == b.batches(1)
        assert a.batches(0) != a.batches(1)  # a new order and grouping each epoch
        assert a.batches(0) != c.batches(0)
        assert a.shard == c.shard  # a sample never changes rank


def test_equalise_splits_the_fullest_batch_then_repeats_samples():
    assert equalise([[1], [2, 3, 4, 5], [6, 7]], 4, [1, 2]) == [[1], [2, 3], [4, 5], [6, 7]]
    assert equalise([[1, 2], [3, 4]], 3, [1]) == [[1], [2], [3, 4]]  # ties: the earliest
    # a shard of single-sample batches pads with its own samples in the epoch's order
    assert equalise([[5], [3]], 5, [5, 3]) == [[5], [3], [5], [3], [5]]


def test_a_micro_batch_packs_into_rows_of_the_budget():
    samples = [{"input_ids": [7] * n, "labels": [7] * n, "sample_id": i} for i, n in enumerate([30, 50, 40])]
    overrides = ["data.packing=true", "data.max_length=64"]
    by_length = get_task(load_recipe(None, overrides)).collate(samples, train=True)
    by_budget = get_task(load_recipe(None, [*overrides, "train.micro_batch_tokens=128"])).collate(samples, train=True)
    assert len(by_length["input_ids"]) == 3  # rows of data.max_length: no two of them fit in one
    assert by_budget["input_ids"].shape == (1, 120)  # one row of the budget


def test_inspect_data_shows_token_budget_batches(capsys):
    """launch/inspect_data.py with a token budget: epoch 0's first micro-batches as training
    groups them (one row each, within the budget), and how full the budget is on average."""
    from pace_llm.cli import inspect_data

    overrides = ["data.packing=true", "train.micro_batch_tokens=128", "--n", "0", "--batches", "3"]
    assert inspect_data.main(["recipes/tiny.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    assert "micro-batches of up to 128 tokens (train.micro_batch_tokens)" in out
    batches = re.findall(r"micro-batch \d+: (\d+) samples in (\d+) rows of (\d+) tokens", out)
    assert len(batches) == 3 and all(rows == "1" and int(width) <= 128 for _, rows, width in batches)
    assert re.search(r"token budget filled [\d.]+% on average", out)


def fake_trainer(recipe, world=2, rank=1):
    """A Trainer with only what steps() and epoch_steps() read: its loader yields sample indices."""
    trainer = object.__new__(Trainer)
    trainer.recipe = recipe
    trainer.sampler = TokenBatchSampler(LENGTHS, BUDGET, rank, world, seed=recipe.train.seed)
    trainer.loader = DataLoader(range(len(LENGTHS)), batch_sampler=trainer.sampler, collate_fn=list)
    trainer.task = SimpleNamespace(set_epoch=lambda epoch: None)
    trainer.total_steps = sum(trainer.epoch_steps(e) for e in range(recipe.train.epochs))
    return trainer


def run_steps(trainer, progress):
    """[(epoch, [(index in epoch, batch), ...]) per step] as fit() takes them from steps()."""
    steps = []
    for micro_batches in trainer.steps(progress):
        steps.append((progress.epoch, micro_batches))
        progress.finish_step(micro_batches[-1][0])
    return steps


def test_steps_follow_each_epochs_batch_count_and_resume_in_place():
    """3 epochs of 31, 31 and 33 micro-batches accumulated by 4: 8 + 8 + 9 steps, the last of
    each epoch short; every epoch's batches in order, each once; a resume mid-epoch continues
    with the same batches."""
    recipe = load_recipe(
        None,
        [
            "data.packing=true",
            "train.micro_batch_tokens=48",
            "data.max_length=32",
            "train.gradient_accumulation=4",
            "train.epochs=3",
        ],
    )
    trainer = fake_trainer(recipe)
    assert trainer.total_steps == 8 + 8 + 9
    steps = run_steps(trainer, Progress())
    assert len(steps) == trainer.total_steps
    for epoch in range(3):
        batches = [mb for e, step in steps if e == epoch for mb in step]
        assert [i for i, _ in batches] == list(range(trainer.sampler.count(epoch)))
        assert [b for _, b in batches] == trainer.sampler.batches(epoch)
    assert [len(step) for _, step in steps][:8] == [4] * 7 + [3]  # 31 = 7 x 4 + 3: a short last step
    resumed, k = fake_trainer(recipe), 12  # after step 12: epoch 1, 4 steps (16 batches) in
    again = run_steps(resumed, Progress(step=k, epoch=1, batches_in_epoch=16))
    assert again == steps[k:]


def step_gradients(micro_batches):
    """Adapter gradients of one step over `micro_batches` with the step normalisation
    (trainer.train_step on one rank, DeepSpeed's 1/A undone): each micro-batch's loss summed
    over its rows, over the rows of all of them. σ = 0, fp32, no PACE term."""
    model = pace_llm.apply_pace(tiny_model("llama", seed=0), pace_llm.PaceConfig(sigma=0.0, rank=4))
    perturb_adapters(model, seed=1)
    model.train()
    objective = PaceObjective("off", outputs=TokenOutputs())
    rows = sum(objective.task_outputs(batch) for batch in micro_batches)
    for batch in micro_batches:
        objective(model, batch, 0, denominator=rows).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_token_budget_step_has_the_gradient_of_its_samples_padded():
    """3 consecutive token-budget micro-batches of epoch 0 holding unlike sample counts (a step
    of accumulation 3), each packed into a row of the budget, give the adapter gradients (rel
    1e-5) of one padded batch of the same samples."""
    samples, batches = lm_samples(LENGTHS), TokenBatchSampler(LENGTHS, BUDGET).batches(0)
    step = next(batches[k : k + 3] for k in range(len(batches)) if len({len(b) for b in batches[k : k + 3]}) > 1)
    packed = [pack([samples[i] for i in batch], BUDGET, 0) for batch in step]
    assert all(len(b["input_ids"]) == 1 for b in packed)  # one row each
    reference = step_gradients([padded_lm([samples[i] for batch in step for i in batch])])
    grads = step_gradients(packed)
    assert all(r.abs().sum() > 0 for r in reference.values())
    for n, r in reference.items():
        assert (grads[n] - r).norm() <= 1e-5 * r.norm(), n


RUN = [
    "deepspeed.zero_stage=0",
    "data.packing=true",
    "train.micro_batch_tokens=128",
    "data.limit=40",
    "data.eval_limit=8",
    "train.epochs=2",
    "train.max_steps=null",
    "train.gradient_accumulation=2",
    "train.save_every=0",
    "train.report_to=[]",
    "pace.mode=fast",
]


def test_token_budget_run_resumes_exactly(tmp_path):
    """One process, PACE_fast, 40 tiny samples (~44 tokens) in budgets of 128 tokens (19
    micro-batches an epoch, 2 or 3 samples each), accumulated by 2: 10 steps an epoch, the last
    short. Stopped after step 12 (in epoch 2, its cache of epoch 1 checkpointed) and resumed,
    it logs the uninterrupted run's losses."""
    whole, out = tmp_path / "whole", tmp_path / "resumed"
    launch("python", whole, *RUN)
    assert (
        "micro-batches of up to 128 tokens (train.micro_batch_tokens): 19 in epoch 0"
        in (whole / "train.log").read_text()
    )
    launch("python", out, *RUN, "train.stop_after=12")
    launch("python", out, *RUN, "resume=true")
    rows, again = metrics(whole), metrics(out)
    assert [r["step"] for r in rows] == [r["step"] for r in again] == list(range(1, 21))
    assert [r["epoch"] for r in rows if r["epoch"] == int(r["epoch"])] == [1.0, 2.0]
    for r, a in zip(rows, again, strict=True):
        for key in ("loss", "task_loss", "consistency_loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7), (r["step"], key)
    assert all(r["consistency_loss"] > 0 for r in rows[10:])  # epoch 2 reads epoch 1's targets


def test_token_budget_trains_on_two_ranks_under_zero2(tmp_path):
    """2 gloo ranks, ZeRO-2, PACE_fast: each rank groups its own shard (20 samples) into budget
    micro-batches, both run the same count (else a collective would hang), the schedule counts
    them, and every sample finds its own rank's epoch-1 target in epoch 2."""
    out = tmp_path / "two"
    launch("torchrun", out, *[a for a in RUN if not a.startswith("deepspeed.")], "deepspeed.zero_stage=2")
    log = (out / "train.log").read_text()
    found = re.search(r"micro-batches of up to 128 tokens \(train.micro_batch_tokens\): (\d+) in epoch 0 per rank", log)
    assert found, log[-2000:]
    per_epoch = -(-int(found.group(1)) // 2)  # accumulation 2, the last step short
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2 * per_epoch - 1
    assert all(r["consistency_loss"] == 0 for r in rows[:per_epoch])  # epoch 1: no targets yet
    assert all(r["consistency_loss"] > 0 for r in rows[per_epoch:])
