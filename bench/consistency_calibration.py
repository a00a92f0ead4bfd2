"""How strongly each consistency form pulls, per unit λ: its value per output and
consistency_grad_ratio = ‖∇(λ·consistency)‖ / ‖∇task‖ at λ = 1, on the study's SmolLM2 setting.

    python bench/consistency_calibration.py                 # SmolLM2-135M, GSM-Symbolic (~5 min)
    python bench/consistency_calibration.py --smoke         # tiny Llama, seconds (the tests)

Setting (issue #23's table): recipes/study/smollm2_gsm.yaml's model, data, rank and σ; the
adapter first trained `--warm-steps` steps with the noise on (mode noise, AdamW at the recipe's
lr, so that lora_B ≠ 0 and two views differ), then for each of `--batches` micro-batches of 4
and each form: full PACE's two views (one paired forward) and PACE_fast's target (the same
sample's output under another noise draw, as the cache would hold after an epoch without
movement). The ratio is linear in λ, so λ* = target / ratio gives the λ at which the
consistency's gradient is `target` times the task's: printed for targets 0.1 and 1.
Writes bench/results/consistency_calibration[_smoke].{json,md}.
"""

from __future__ import annotations

import argparse
import statistics

import common
import torch

from pace_llm import OutputCache, PaceConfig, PaceObjective, TokenOutputs, apply_pace, cache_dim
from pace_llm.config import load_recipe
from pace_llm.core.consistency import FORMS
from pace_llm.core.objectives import consistency_grad_ratio
from pace_llm.tasks import get_task

RECIPE = common.ROOT / "recipes" / "study" / "smollm2_gsm.yaml"


def setup(args):
    """(model, batches): the study's SmolLM2 with PACE-LoRA, or a tiny Llama for --smoke."""
    if args.smoke:
        from pace_llm.assets.tiny import tiny_model, tiny_tokenizer

        recipe = load_recipe(str(common.ROOT / "recipes" / "tiny.yaml"), ["model.name=tiny:llama"])
        task = get_task(recipe, tiny_tokenizer())
        base = tiny_model("llama")
    else:
        from pace_llm import assets
        from pace_llm.models import load_tokenizer

        assets.smollm2_dir()
        assets.gsm_symbolic_val_files()
        recipe = load_recipe(str(RECIPE), [f"data.sample={4 * args.batches}"])
        task = get_task(recipe, load_tokenizer(recipe.model.name))
        base = task.load_model(recipe.model.name)
    train_set, _ = task.datasets()
    config = PaceConfig(mode="noise", sigma=recipe.pace.sigma, rank=recipe.pace.rank, alpha=recipe.pace.alpha)
    model = apply_pace(base, config)
    model.train()
    batches = [task.collate([train_set[i] for i in range(4 * b, 4 * b + 4)]) for b in range(args.batches)]
    return model, batches, recipe


def warm_up(model, batches, steps: int, lr: float) -> list[float]:
    """`steps` AdamW steps of the noise-only objective over the batches: lora_B leaves zero."""
    objective = PaceObjective("noise")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = objective(model, batches[step % len(batches)], step).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def measure(model, batch, form: str, seed: int) -> dict:
    """Full PACE's and PACE_fast's value per output and gradient ratio at λ = 1, one batch."""
    full = PaceObjective("full", lam=1.0, consistency=form)
    torch.manual_seed(seed)
    with torch.no_grad(), full.scope(0, batch):
        values = full(model, batch, 0)
    torch.manual_seed(seed)
    ratio_full = consistency_grad_ratio(full, model, batch, step=0)

    fast, value_fast = fast_value(model, batch, form, target_seed=seed + 1000, seed=seed)
    torch.manual_seed(seed)
    ratio_fast = consistency_grad_ratio(fast, model, batch, step=0)
    value_fast_fp32 = fast_value(model, batch, form, seed + 1000, seed, dtype=torch.float32)[1]
    return {
        "task_loss": values.task_loss.item(),
        "value_full": values.consistency_loss.item(),
        "ratio_full": ratio_full,
        "value_fast": value_fast,
        "ratio_fast": ratio_fast,
        # the cache's bf16 rounding: the term with an fp32 target, and the term's floor (the
        # target is the very output it is compared with, so only the rounding is left)
        "value_fast_fp32": value_fast_fp32,
        "bf16_error": abs(value_fast - value_fast_fp32) / value_fast_fp32,
        "bf16_floor": fast_value(model, batch, form, seed, seed)[1],
    }


def fast_value(model, batch, form: str, target_seed: int, seed: int, dtype=None) -> tuple[PaceObjective, float]:
    """(PACE_fast objective, its consistency per output) with the cache holding this batch's
    output under the noise draw of `target_seed`, stored in `dtype` (default: the cache's bf16)."""
    counts = TokenOutputs().forward(model, batch).counts
    options = {} if dtype is None else {"dtype": dtype}
    cache = OutputCache(counts.tolist(), cache_dim(model), sample_ids=batch["sample_id"].tolist(), **options)
    fast = PaceObjective("fast", lam=1.0, cache=cache, consistency=form)
    torch.manual_seed(target_seed)
    with torch.no_grad():
        fast(model, batch, 0)  # writes the target
    torch.manual_seed(seed)
    with torch.no_grad(), fast.scope(0, batch):
        value = fast(model, batch, 0, write_cache=False).consistency_loss.item()
    return fast, value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_args(parser)
    parser.add_argument("--warm-steps", type=int, default=9)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    if args.smoke:
        args.warm_steps, args.batches = 3, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = common.machine_info()  # its load average before the work
    model, batches, recipe = setup(args)
    warm = warm_up(model, batches, args.warm_steps, recipe.train.lr)
    print(f"warm-up ({args.warm_steps} noise-only steps): task loss {warm[0]:.3f} -> {warm[-1]:.3f}", flush=True)

    rows, per_form = [], {}
    for form in FORMS:
        runs = [measure(model, batch, form, seed=b) for b, batch in enumerate(batches)]
        summary = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        summary["runs"] = runs
        per_form[form] = summary
        rows.append(
            [
                form,
                summary["value_full"],
                summary["ratio_full"],
                0.1 / summary["ratio_full"],
                1 / summary["ratio_full"],
                summary["value_fast"],
                summary["ratio_fast"],
                summary["bf16_error"],
                summary["bf16_floor"] / summary["value_fast"],
            ]
        )
        print(f"{form}: {rows[-1][1:]}", flush=True)
    headers = [
        "form",
        "value / output (full)",
        "grad ratio at λ=1 (full)",
        "λ for ratio 0.1",
        "λ for ratio 1",
        "value / output (fast)",
        "grad ratio at λ=1 (fast)",
        "bf16 cache: error of the fast value",
        "bf16 floor / fast value",
    ]
    table = common.markdown_table(headers, rows)
    note = (
        f"\nMedians over {args.batches} micro-batches of 4; task cross-entropy "
        f"{statistics.median(per_form[f]['task_loss'] for f in FORMS):.3f} after {args.warm_steps} noise-only "
        f"steps at σ {recipe.pace.sigma}, rank {recipe.pace.rank}. `python bench/consistency_calibration.py"
        f"{' --smoke' if args.smoke else ''}`\n"
    )
    print(table + note)
    result = {
        "machine": machine,
        "command": common.command_line(),
        "model": recipe.model.name,
        "sigma": recipe.pace.sigma,
        "rank": recipe.pace.rank,
        "warm_up_losses": warm,
        "forms": per_form,
    }
    common.save(
        args.name or ("consistency_calibration_smoke" if args.smoke else "consistency_calibration"),
        result,
        table + note,
        args.out,
    )


if __name__ == "__main__":
    main()
