"""Padding-free packing (data.packing, pace_llm/core/packing.py): the same samples give the same
losses and gradients packed or padded, at any micro-batch size and accumulation (step loss
normalisation), samples in a row cannot see each other, and PACE's noise stays one draw per
sample and channel."""

import json
import re

import pytest
import torch
from conftest import lm_samples, make_batch, padded_lm, perturb_adapters
from trainrun import ds_steps, eval_losses, launch_many, metrics

import pace_llm
from pace_llm.assets.tiny import tiny_model
from pace_llm.core.objectives import PaceObjective
from pace_llm.core.outputs import SampleOutputs, TokenOutputs, model_inputs
from pace_llm.core.pace import multiplicative_noise, noise_segments
from pace_llm.core.packing import best_fit_decreasing, duplicate_packed, pack, padded_tokens

LENGTHS = [9, 4, 7, 3, 12, 5, 6, 2]  # packed into rows of 16 tokens: 3 rows, several per row


def samples(lengths=LENGTHS, seed=0):
    """Encoded samples: a prompt of about a third, supervised after it; ids 10, 11, ..."""
    return lm_samples(lengths, seed, first_id=10)


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
    assert padded_tokens(LENGTHS, 16) == 48 and padded_tokens(LENGTHS) == 8 * 12  # packed: 3 full rows


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
    for how, batch in (("padded", padded_lm(s)), ("packed", pack(s, 16, 0))):
        model = adapted(kind)
        rows = TokenOutputs().forward(model, batch)
        rows_of[how] = per_sample(rows, batch["sample_id"])
        losses[how] = {
            i: torch.nn.functional.cross_entropy(f, t).item()
            for i, f, t in zip(
                batch["sample_id"].tolist(), rows.f.split(rows.counts.tolist()), rows.target.split(rows.counts.tolist())
            )
        }
        out = PaceObjective("full", lam=0.1, outputs=TokenOutputs())(model, batch)
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
        objective = PaceObjective("full", outputs=TokenOutputs())
        with torch.no_grad(), objective.scope(0, batch):
            out = TokenOutputs().forward(model, twice)
        first, second = out.first(s), out.last(s)
        assert torch.equal(first.f, second.f) == equal
    half = duplicate_packed(batch, 1)  # lazy_half: the first row's samples, twice
    m = int(batch["segment_index"][0].max()) + 1
    assert len(half["sample_id"]) == 2 * m and len(half["input_ids"]) == 2


def test_inspect_data_shows_the_bins(capsys):
    """launch/inspect_data.py with data.packing: the first micro-batches' rows, each sample by
    id and length, in the order training takes them; and the epoch's padding packed vs padded."""
    from pace_llm.cli import inspect_data
    from pace_llm.core.cache import ShardedEpochSampler

    assert (
        inspect_data.main(
            ["recipes/tiny.yaml", "data.packing=true", "data.max_length=100", "--n", "0", "--batches", "2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = re.findall(r"  row \d+: (\d+) tokens: (.*)", out)
    shown = [[(int(i), int(n)) for i, n in re.findall(r"#(\d+) \((\d+)\)", parts)] for _, parts in rows]
    assert all(int(used) == sum(n for _, n in parts) <= 100 for (used, _), parts in zip(rows, shown))
    assert any(len(parts) > 1 for parts in shown)  # samples share rows
    first = list(ShardedEpochSampler(64, seed=0))[:8]  # 2 micro-batches of 4; tiny sample ids are row numbers
    assert sorted(i for parts in shown for i, _ in parts) == sorted(first)
    packed, padded = re.search(r"packed ([\d.]+)%, padded to each micro-batch's longest sample ([\d.]+)%", out).groups()
    assert float(packed) < float(padded)


def step_gradients(model, micro_batches, normalization, outputs=None):
    """Adapter gradients of one optimizer step over `micro_batches`, taken as the trainer takes
    it (trainer.train_step) on one rank without DeepSpeed's 1/A, which its scale undoes: full
    PACE; step: every micro-batch's loss over the rows of all of them; micro_batch: the mean
    of the micro-batches' means."""
    objective = PaceObjective("full", lam=0.1, outputs=outputs or TokenOutputs())
    supervised = sum(objective.task_outputs(batch) for batch in micro_batches)
    for batch in micro_batches:
        if normalization == "step":
            objective(model, batch, 0, denominator=supervised).loss.backward()
        else:
            (objective(model, batch, 0).loss / len(micro_batches)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_step_normalisation_gives_the_same_gradient_packed_or_padded_at_any_accumulation():
    """σ = 0, fp32: 4 samples of 6, 3, 5 and 2 supervised tokens give the same adapter gradients
    (rel 1e-5) packed in one micro-batch, packed in two accumulated ones and padded; averaging
    the micro-batches' own means would weight the tokens of the smaller one more."""
    s = samples()[:4]
    ways = {
        "packed mb=4": [pack(s, 16, 0)],
        "packed mb=2 x2": [pack(s[:2], 16, 0), pack(s[2:], 16, 0)],
        "padded mb=4": [padded_lm(s)],
    }
    grads = {name: step_gradients(adapted("llama"), batches, "step") for name, batches in ways.items()}
    reference = grads["padded mb=4"]
    for name, g in grads.items():
        for n, r in reference.items():
            assert (g[n] - r).norm() <= 1e-5 * r.norm(), (name, n)
    per_micro_batch = step_gradients(adapted("llama"), ways["packed mb=2 x2"], "micro_batch")
    assert any((per_micro_batch[n] - r).norm() > 1e-2 * r.norm() for n, r in reference.items())


@pytest.mark.parametrize("kind", ["roberta", "vit"])
def test_step_normalisation_of_a_classifier_weights_every_sample_once(kind):
    """Classifiers (one row per sample): micro-batches of 3 and 1 samples accumulated give the
    gradient of one micro-batch of 4 with step normalisation; the mean of the micro-batches'
    means would weight the lone sample 3 times as much as each of the others."""
    batch = make_batch(kind, batch=4)
    split = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]

    def model():  # no dropout: a batch of 4 and batches of 3 + 1 would draw other masks
        no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        adapted = pace_llm.apply_pace(tiny_model(kind, **no_dropout), pace_llm.PaceConfig(sigma=0.0, rank=4))
        perturb_adapters(adapted)
        return adapted.train()

    reference = step_gradients(model(), [batch], "step", SampleOutputs())
    accumulated = step_gradients(model(), split, "step", SampleOutputs())
    assert all(g.abs().sum() > 0 for g in reference.values())
    for n, r in reference.items():
        assert (accumulated[n] - r).norm() <= 1e-5 * r.norm(), n
    per_micro_batch = step_gradients(model(), split, "micro_batch", SampleOutputs())
    assert any((per_micro_batch[n] - r).norm() > 1e-2 * r.norm() for n, r in reference.items())


def test_qlora_nf4_packed_equals_padded(tmp_path):
    """QLoRA (an nf4 tiny Llama, bitsandbytes on CPU) on packed rows: at σ = 0 the same step
    gradients packed or padded, and they reach every adapter."""
    import bitsandbytes as bnb

    from pace_llm.config import load_recipe
    from pace_llm.tasks import get_task

    tiny_model("llama").save_pretrained(tmp_path / "base")
    task = get_task(load_recipe("recipes/tiny.yaml", ["model.quantization=nf4", "data.packing=true"]))
    s, grads = samples()[:4], {}
    for how, batch in (("packed", pack(s, 16, 0)), ("padded", padded_lm(s))):
        model = task.load_model(tmp_path / "base")
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        torch.manual_seed(0)  # the same adapter initialisation both times
        model = pace_llm.apply_pace(model, pace_llm.PaceConfig(sigma=0.0, rank=4))
        perturb_adapters(model)
        model.train()  # before any forward: the CPU repacking trap of environment.md
        grads[how] = step_gradients(model, [batch], "step")
    assert all(g.abs().sum() > 0 for n, g in grads["packed"].items() if "lora_B" in n)
    for n, g in grads["padded"].items():
        assert (grads["packed"][n] - g).norm() <= 1e-5 * g.norm(), n


@pytest.mark.parametrize("mode", ["off", "full", "lazy_half"])
def test_task_rows_counts_the_rows_the_task_loss_covers(mode):
    """What the trainer's denominator adds up before any forward (lazy_half's paired step:
    the first half of the packed or padded rows) is what the objective's task loss covers."""
    model, objective = adapted("llama"), PaceObjective(mode, outputs=TokenOutputs())
    for batch in (padded_lm(samples()), pack(samples(), 16, 0)):
        for step in (0, 1):
            with torch.no_grad():
                assert objective(model, batch, step).n_outputs == objective.task_outputs(batch, step)


NORM_COMMON = [
    "deepspeed.zero_stage=2",
    "pace.mode=full",
    "pace.sigma=0",
    "data.limit=36",
    "train.epochs=2",
    "train.max_steps=null",
    "train.save_every=0",
    "data.eval_limit=8",
    "train.eval_every=5",
    "train.report_to=[]",
]
NORM_PADDED = [*NORM_COMMON, "train.loss_normalization=step"]
NORM_ACCUMULATED = [*NORM_COMMON, "data.packing=true", "train.micro_batch_size=2", "train.gradient_accumulation=2"]
NORM_RUNS = [
    ("padded", NORM_PADDED),
    ("packed", [*NORM_COMMON, "data.packing=true"]),
    ("accumulated", NORM_ACCUMULATED),
    ("padded_fast", [*NORM_PADDED, "pace.mode=fast"]),
    ("accumulated_fast", [*NORM_ACCUMULATED, "pace.mode=fast"]),
    ("padded_llama", [*NORM_PADDED, "model.name=tiny:llama"]),
    ("packed_llama", [*NORM_COMMON, "data.packing=true", "model.name=tiny:llama"]),
]


@pytest.mark.slow
def test_step_normalisation_two_ranks_same_losses_packed_or_padded_at_any_accumulation(two_rank_runs):
    """2 ranks under ZeRO-2, σ = 0, 18 samples per rank, 2 epochs. Full PACE: padded and packed
    micro-batches of 4 (tiny Phi-3, the recipe's model, and tiny Llama), and packed micro-batches
    of 2 accumulated in pairs (each epoch's 9th a short last step), log the same losses,
    gradient norms and held-out losses; so do PACE_fast padded and packed-accumulated, its
    epoch-1 targets read back by sample id. DeepSpeed
    updates exactly at the trainer's steps (the short step's gradients stay out of the next
    epoch's first step), the lr follows the schedule, epochs end where they should, and the
    packed run's merged model equals the trained one."""
    outs = {name: two_rank_runs[f"norm-{name}"] for name, _ in NORM_RUNS}
    logged = {name: metrics(out) for name, out in outs.items()}
    assert [r["step"] for r in logged["accumulated"]] == list(range(1, 11))
    assert logged["packed_llama"][0]["loss"] != logged["packed"][0]["loss"]  # another model indeed
    for name, reference in (
        ("packed", "padded"),
        ("accumulated", "padded"),
        ("accumulated_fast", "padded_fast"),
        ("packed_llama", "padded_llama"),
    ):
        for padded_row, row in zip(logged[reference], logged[name], strict=True):
            for key in ("loss", "task_loss", "consistency_loss", "grad_norm"):
                assert row[key] == pytest.approx(padded_row[key], rel=1e-5, abs=1e-7), (name, row["step"], key)
        for (step, loss), (_, padded_loss) in zip(eval_losses(outs[name]), eval_losses(outs[reference]), strict=True):
            assert loss == pytest.approx(padded_loss, rel=1e-5), (name, step)
    consistency = [r["consistency_loss"] for r in logged["accumulated_fast"]]
    assert all(c == 0 for c in consistency[:5]) and all(c > 0 for c in consistency[5:])
    from pace_llm.config import load_recipe
    from pace_llm.training import lr_lambda

    rows = logged["accumulated"]
    assert ds_steps(outs["accumulated"]) == [(k, k) for k in range(1, 11)]
    schedule = lr_lambda(load_recipe("recipes/tiny.yaml", NORM_ACCUMULATED), 10)
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * schedule(r["step"]) for r in rows])
    assert [r["epoch"] for r in rows if r["epoch"] == int(r["epoch"])] == [1.0, 2.0]
    assert [r["step"] for r in rows if r["epoch"] == int(r["epoch"])] == [5, 10]
    assert json.loads((outs["accumulated"] / "export_check.json").read_text())["max_abs_logit_diff"] <= 1e-4


PATH_MODES = ["full", "fast", "lazy_half"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """This module's 2-rank runs, all in one launch (a launch's start-up costs more than a tiny
    run): the step-normalisation runs (NORM_RUNS, as norm-<name>), and packed runs under ZeRO-2
    and ZeRO-3 (with gradient checkpointing) for each mode: 20 samples per rank in micro-batches
    of 4 accumulated in pairs (3 steps an epoch, the last short), 2 epochs; each trained through
    once, and again stopped after step 4 (fast: its epoch-0 cache is then in the checkpoint) and
    resumed to the end."""
    common = [
        "data.packing=true",
        "data.limit=40",
        "train.gradient_accumulation=2",
        "train.epochs=2",
        "train.max_steps=null",
        "train.save_every=0",
        "data.eval_limit=8",
        "train.report_to=[]",
    ]
    runs = [(f"norm-{name}", overrides) for name, overrides in NORM_RUNS]
    for stage in (2, 3):
        for mode in PATH_MODES:
            overrides = [
                *common,
                f"deepspeed.zero_stage={stage}",
                f"pace.mode={mode}",
                f"model.gradient_checkpointing={str(stage == 3).lower()}",
            ]
            runs += [
                (f"zero{stage}-{mode}", overrides),
                (f"zero{stage}-{mode}-resumed", [*overrides, "train.stop_after=4"]),
                (f"zero{stage}-{mode}-resumed", [*overrides, "resume=true"]),
            ]
    return launch_many(tmp_path_factory.mktemp("two-rank-runs"), runs)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("mode", PATH_MODES)
def test_packed_runs_resume_exactly_and_export(two_rank_runs, stage, mode):
    whole, resumed = two_rank_runs[f"zero{stage}-{mode}"], two_rank_runs[f"zero{stage}-{mode}-resumed"]
    rows = metrics(whole)
    assert [r["step"] for r in rows] == list(range(1, 7)) and [r["step"] for r in metrics(resumed)] == list(range(1, 7))
    for r, again in zip(rows, metrics(resumed), strict=True):  # steps 5-6 after the resume
        for key in ("loss", "task_loss", "consistency_loss", "grad_norm", "lr"):
            assert again[key] == pytest.approx(r[key], rel=1e-5, abs=1e-6), (r["step"], key)
    assert eval_losses(resumed)[-1] == pytest.approx(eval_losses(whole)[-1], rel=1e-5)
    assert ds_steps(whole) == ds_steps(resumed) == [(k, k) for k in range(1, 7)]
    consistency = [r["consistency_loss"] for r in rows]
    if mode == "full":
        assert all(c > 0 for c in consistency[1:])  # step 1: lora_B = 0, so no noise effect yet
    elif mode == "fast":  # targets from epoch 1 (steps 4-6) on, read by sample id
        assert all(c == 0 for c in consistency[:3]) and all(c > 0 for c in consistency[3:])
    else:  # paired on steps 1, 3, 5
        assert all(c > 0 for c in consistency[2::2]) and all(c == 0 for c in consistency[1::2])
    for out in (whole, resumed):
        assert json.loads((out / "export_check.json").read_text())["max_abs_logit_diff"] <= 1e-4
    if stage == 3:
        assert re.search(r"ZeRO-3: model built partitioned \((\d+) of \1 tensors\)", (whole / "train.log").read_text())


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_segment_attention_equals_the_masked_attention(kind):
    """model.attn_implementation=segment_sdpa (one causal sdpa call per packed sample) gives the
    logits of transformers' sdpa under its block-diagonal mask, packed rows and right-padded
    rows alike, and the same gradients (fp32)."""
    from pace_llm.core import segment_attention

    segment_attention.register()
    packed_batch, padded_batch = pack(samples(), 16, 0), padded_lm(samples())
    out = {}
    for impl in ("sdpa", segment_attention.NAME):
        model = adapted(kind)
        model.set_attn_implementation(impl)
        for name, batch in (("packed", packed_batch), ("padded", padded_batch)):
            rows = TokenOutputs().forward(model, batch)
            model.zero_grad()
            rows.f.square().sum().backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            out[impl, name] = (rows.f.detach(), grads)
    for name in ("packed", "padded"):
        (f_ref, g_ref), (f, g) = out["sdpa", name], out[segment_attention.NAME, name]
        torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_ref):
            assert (a - b).norm() <= 1e-5 * b.norm()
