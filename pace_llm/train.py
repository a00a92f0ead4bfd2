"""The training loop: setup / fit / evaluate / save, under DeepSpeed ZeRO 0-3.

    deepspeed --num_gpus 8 launch/train.py recipes/gsm8k.yaml pace.lam=0.05
    torchrun --nproc_per_node 8 launch/train.py recipes/gsm8k.yaml
    python launch/train.py recipes/tiny.yaml            # one process

One loop for every launcher: torchrun, deepspeed and Slurm all set RANK / WORLD_SIZE /
MASTER_ADDR; plain `python` gets single-process defaults. DeepSpeed specifics (config,
ZeRO-3 gathering, checkpoint layout) sit behind the helpers in `engine.py`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import engine as ds
from .adapters import PaceConfig, TargetError, apply_pace, trainable_parameter_count
from .cache import OutputCache, ShardedEpochSampler
from .config import Recipe, RecipeError, load_recipe, to_dict
from .data import Collator, DataError
from .objectives import PaceObjective, cache_dim, forward_rows, supervised_counts, task_loss
from .pace import mean_squared_norm
from .plots import plot_metrics
from .setup import build_datasets, build_model

log = logging.getLogger("pace_llm.train")


class StopRequested:
    """SIGTERM / SIGUSR1 (Slurm time limit, preemption): finish the step, checkpoint, exit."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received signal %d: checkpointing after this step", signum)
        self.flag = True


def warmup_steps(recipe: Recipe, total_steps: int) -> int:
    """train.warmup_steps, or ceil(train.warmup_ratio · total steps) (as HF's warmup_ratio)."""
    t = recipe.train
    return t.warmup_steps if t.warmup_ratio is None else math.ceil(t.warmup_ratio * total_steps)


def lr_lambda(recipe: Recipe, total_steps: int):
    """Linear warmup, then cosine (or linear) decay to min_lr (as a factor of lr)."""
    t, floor = recipe.train, recipe.train.min_lr / recipe.train.lr
    warmup = warmup_steps(recipe, total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 1 - progress if t.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * shape
    return factor


def all_mean(values: list[float]) -> list[float]:
    return [v / dist.get_world_size() for v in ds.all_reduce_scalars(values)]


def setup(recipe: Recipe):
    rank, world = ds.init_distributed()
    torch.manual_seed(recipe.train.seed + rank)
    out = Path(recipe.output_dir)
    ds_config = ds.build_config(recipe, world)
    hf_ds = ds.zero3_context(ds_config)  # keeps from_pretrained partitioned under ZeRO-3
    tokenizer, model, base_source = build_model(recipe, out)
    if hf_ds is not None and rank == 0:
        partitioned = sum(hasattr(p, "ds_id") for p in model.parameters())
        log.info("ZeRO-3: model built partitioned (%d of %d tensors)", partitioned, len(list(model.parameters())))
    with ds.rank0_first():  # downloads and dataset caches once
        train_set, eval_set = build_datasets(recipe, tokenizer)
    pace = recipe.pace
    model = apply_pace(model, PaceConfig(
        rank=pace.rank, alpha=pace.alpha, dropout=pace.dropout, target_modules=pace.target_modules,
        adapter=pace.adapter, sigma=0.0 if pace.mode == "off" else pace.sigma,
        sigma_schedule=pace.sigma_schedule, first_noisy_block=pace.first_noisy_block))
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # before any forward: bitsandbytes' CPU 4-bit layers repack in eval mode
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / world) / recipe.train.micro_batch_size
                                / recipe.train.gradient_accumulation)
    total_steps = recipe.train.max_steps or steps_per_epoch * recipe.train.epochs
    engine = ds.initialize(model, ds_config, recipe, lr_lambda(recipe, total_steps))
    sampler = ShardedEpochSampler(len(train_set), rank, world, seed=recipe.train.seed)
    collate = Collator(tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0)
    loader = DataLoader(train_set, batch_size=recipe.train.micro_batch_size, sampler=sampler, collate_fn=collate,
                        generator=torch.Generator())  # not the global RNG: resumes replay it exactly
    cache = None
    if pace.mode == "fast":
        shard = [train_set[i] for i in sampler.shard]
        counts = supervised_counts_rows(shard)
        cache = OutputCache(counts, cache_dim(engine), sample_ids=[r["sample_id"] for r in shard],
                            memory_budget_bytes=int(pace.cache_memory_gb * 2**30), disk_dir=str(out))
        log.info("PACE_fast cache: %d samples on this rank, %.1f MiB", len(counts), cache.nbytes / 2**20)
    objective = PaceObjective(pace.mode, pace.lam, pace.lazy_every, cache)
    trainable, total = trainable_parameter_count(model)
    if rank == 0:
        log.info("trainable parameters: %s of %s (%.3f%%); %d train samples, %d steps",
                 f"{trainable:,}", f"{total:,}", 100 * trainable / max(1, total), len(train_set), total_steps)
    return dict(rank=rank, world=world, out=out, tokenizer=tokenizer, engine=engine, loader=loader,
                sampler=sampler, objective=objective, cache=cache, eval_set=eval_set, collate=collate,
                total_steps=total_steps, base_source=base_source,
                hf_ds=hf_ds)  # held: ZeRO-3 partitioned loading lasts while this object lives


def supervised_counts_rows(rows: list[dict]) -> list[int]:
    if rows and isinstance(rows[0]["labels"], list):
        return [int(supervised_counts(torch.tensor([r["labels"]]))[0]) for r in rows]
    return [1] * len(rows)


def first_batch(dataset, collate, size: int) -> dict:
    return collate([dataset[i] for i in range(min(size, len(dataset)))])


def evaluate(engine, eval_set, collate, batch_size: int) -> float:
    """Held-out task loss in eval mode (no noise, no dropout): the mean over all supervised
    rows (answer tokens for LMs, samples for classifiers), so it depends on neither the
    batch size nor the world size. Rank r scores samples r, r+W, ...; every rank runs the
    same number of batches (ZeRO-3 forwards are collective), padding with a repeat that
    counts zero."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(eval_set), world))
    per_rank = -(-len(eval_set) // world)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    loss_sum, rows_sum = 0.0, 0.0
    with eval_mode(engine):
        for i in range(0, per_rank, batch_size):
            rows = forward_rows(engine, collate([eval_set[j] for j in mine[i:i + batch_size]]))
            w = torch.tensor(weights[i:i + batch_size]).repeat_interleave(rows.counts.cpu())
            loss_sum += float((task_loss(rows, reduction="none").float().cpu() * w).sum())
            rows_sum += float(w.sum())
    loss_sum, rows_sum = ds.all_reduce_scalars([loss_sum, rows_sum])
    return loss_sum / max(rows_sum, 1.0)


def fit(recipe: Recipe, s: dict) -> str:
    """Returns "done", "stopped" (stop_after or a signal: checkpointed) or raises on NaN."""
    engine, loader, sampler, objective, rank = s["engine"], s["loader"], s["sampler"], s["objective"], s["rank"]
    t, out = recipe.train, s["out"]
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0}
    if recipe.resume:
        state = ds.load_checkpoint(engine, out, s["cache"]) or state
    stop = StopRequested()
    fixed_batch = first_batch(s["eval_set"] or loader.dataset, s["collate"], t.micro_batch_size)
    reference = fixed_outputs(engine, fixed_batch) if t.fp_distance else None
    metrics_path = out / "metrics.jsonl"
    if s["eval_set"] is not None and state["step"] == 0:  # the baseline point
        eval_loss = evaluate(engine, s["eval_set"], s["collate"], t.micro_batch_size)
        if rank == 0:
            log.info("eval loss before training %.4f", eval_loss)
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": 0, "eval_loss": eval_loss}) + "\n")
    bar = tqdm(total=s["total_steps"], initial=state["step"], disable=rank != 0, desc="train",
               dynamic_ncols=True)
    ga = t.gradient_accumulation
    step, epoch = state["step"], state["epoch"]
    while step < s["total_steps"]:
        sampler.set_epoch(epoch)
        skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        micro = []
        for batch_index, batch in enumerate(loader):
            if batch_index < skip:
                continue
            started = time.perf_counter()
            result = objective(engine, batch, step)
            if ds.all_reduce_scalars([float(torch.isfinite(result.loss))], dist.ReduceOp.MIN)[0] < 1:
                raise FloatingPointError(
                    f"non-finite loss at step {step + 1} (task {result.task_loss.item():.4g}, consistency "
                    f"{result.consistency_loss.item():.4g}): stopping; the last good checkpoint in "
                    f"{out / 'checkpoints'} is intact (lower train.lr or pace.lam?)")
            engine.backward(result.loss)
            norm = stage0_grad_norm(engine)
            engine.step()
            micro.append((result.loss.item(), result.task_loss.item(), result.consistency_loss.item(),
                          int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["labels"]),
                          time.perf_counter() - started))
            if len(micro) < ga:
                continue
            step += 1
            state = {"step": step, "epoch": epoch, "batches_in_epoch": batch_index + 1}
            loss, task, cons, tokens, seconds = (sum(x) / ga for x in zip(*micro))
            loss, task, cons, tokens_per_s = all_mean([loss, task, cons, tokens * ga / (seconds * ga)])
            micro = []
            if step % t.log_every == 0 or step == s["total_steps"]:
                row = {"step": step, "epoch": epoch + (batch_index + 1) / len(loader), "loss": loss,
                       "task_loss": task, "consistency_loss": cons, "grad_norm": ds.grad_norm(engine) if norm is None else norm,
                       "lr": engine.get_lr()[0], "tokens_per_s": tokens_per_s * s["world"]}
                if reference is not None:
                    row["fp_distance"] = mean_squared_norm(fixed_outputs(engine, fixed_batch) - reference).item()
                if s["eval_set"] is not None and (t.eval_every and step % t.eval_every == 0
                                                  or step == s["total_steps"]):
                    row["eval_loss"] = evaluate(engine, s["eval_set"], s["collate"], t.micro_batch_size)
                    if rank == 0:
                        log.info("step %d: eval loss %.4f", step, row["eval_loss"])
                if rank == 0:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    ds.tensorboard_log(out, row)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            stop_now = ds.all_reduce_scalars([float(stop.flag)], dist.ReduceOp.MAX)[0] > 0
            if t.save_every and step % t.save_every == 0 or stop_now or step == t.stop_after:
                ds.save_checkpoint(engine, out, state, s["cache"], t.keep_checkpoints)
            if stop_now or step == t.stop_after:
                bar.close()
                return "stopped"
            if step >= s["total_steps"]:
                break
        epoch += 1
        state = {"step": step, "epoch": epoch, "batches_in_epoch": 0}
    bar.close()
    if not (t.save_every and step % t.save_every == 0):
        ds.save_checkpoint(engine, out, state, s["cache"], t.keep_checkpoints)
    return "done"


def stage0_grad_norm(engine) -> float | None:
    """DeepSpeed reports the global gradient norm for ZeRO >= 1 only; for stage 0 the
    (already all-reduced) gradients are on the parameters at the accumulation boundary."""
    if engine.zero_optimization_stage() != 0 or not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad.float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


@contextlib.contextmanager
def eval_mode(engine):
    """Eval mode (no noise, no dropout) and no grad, then back to training. bitsandbytes'
    Linear4bit layers stay in train mode: on CPUs with AVX512-BF16 an eval-mode no-grad
    forward repacks their weights for inference for good (environment.md), which changes
    the trained model's outputs (the QLoRA export check fails) and can stop adapter
    gradients. They have no train/eval behaviour of their own."""
    engine.eval()
    bnb = sys.modules.get("bitsandbytes")  # a model holding bnb layers has imported it
    if bnb is not None:
        for module in engine.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.train()
    try:
        with torch.no_grad():
            yield
    finally:
        engine.train()


def fixed_outputs(engine, batch) -> torch.Tensor:
    """Eval-mode outputs f on a fixed batch (FP-distance and the export check)."""
    with eval_mode(engine):
        return forward_rows(engine, batch).f.float().cpu()


def save_outputs(recipe: Recipe, s: dict) -> None:
    """OUTPUT_DIR/adapter (PEFT format) and OUTPUT_DIR/merged (HF folder), from rank 0."""
    out, engine, rank = s["out"], s["engine"], s["rank"]
    check_batch = first_batch(s["eval_set"] or s["loader"].dataset, s["collate"], 4)
    trained = fixed_outputs(engine, check_batch)  # every rank: ZeRO-3 forwards are collective
    ds.save_adapter(engine, out / "adapter")
    if rank == 0:
        merged = ds.export_merged(recipe, s["base_source"], out / "adapter", out / "merged", s["tokenizer"])
        if recipe.train.export_check:
            merged.eval()
            with torch.no_grad():
                diff = (forward_rows(merged, check_batch).f.float() - trained).abs().max().item()
            # Merging W + sBA re-rounds every weight, and the error grows with the logits' size
            # (SmolLM2, fp32, 30 layers, |logit| up to ~43: 0.8-1.1e-4), so the bound is relative
            # with an absolute floor; a wrong merge (noise or scaling left in) is off by O(1).
            scale = trained.abs().max().item()
            exact = recipe.model.dtype == "fp32" and not recipe.model.quantization
            tol = max(1e-4, 1e-5 * scale) if exact else max(5e-2, 5e-3 * scale)
            (out / "export_check.json").write_text(json.dumps(
                {"max_abs_logit_diff": diff, "max_abs_logit": scale, "tolerance": tol, "rows": len(trained)}))
            if diff > tol:
                raise RuntimeError(f"merged model differs from the trained model by {diff:.3g} (> {tol})")
            log.info("merged model matches the trained model (max |Δlogit| %.2e)", diff)
        plot_metrics(out / "metrics.jsonl", out / "training_curves.png")
        log.info("adapter: %s  merged: %s", out / "adapter", out / "merged")
    dist.barrier()


def run(recipe: Recipe) -> str:
    out = Path(recipe.output_dir)
    if not recipe.resume and (out / "checkpoints" / "latest").exists():
        raise RecipeError(f"output_dir {out} holds checkpoints of an earlier run: pass resume=true to "
                          "continue it, or choose another output_dir (nothing was overwritten)")
    s = setup(recipe)
    if s["rank"] == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=2))
        if not recipe.resume:  # a fresh run's log starts empty
            (out / "metrics.jsonl").unlink(missing_ok=True)
    status = fit(recipe, s)
    if status == "done":
        save_outputs(recipe, s)
    if s["rank"] == 0:  # read by the Slurm scripts: "stopped" means requeue and resume
        (s["out"] / "run_status.json").write_text(json.dumps({"status": status}))
    if s["cache"] is not None:
        s["cache"].close()
    return status


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stdout)
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        recipe = load_recipe(argv[0], argv[1:])
    except RecipeError as err:
        print(f"recipe error: {err}", file=sys.stderr)
        return 2
    try:
        status = run(recipe)
    except (RecipeError, DataError, TargetError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)  # bad recipe / data / targets, or a diverged run
        return 1 if isinstance(err, FloatingPointError) else 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if status in ("done", "stopped") else 1
