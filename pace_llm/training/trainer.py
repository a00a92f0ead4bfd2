"""The one training loop: setup / fit / evaluate / save, under DeepSpeed ZeRO 0-3.

    trainer = Trainer(recipe)     # builds everything (setup)
    status = trainer.fit()        # "done" or "stopped" (checkpointed); raises on NaN
    trainer.save_outputs()        # adapter/, merged/, export_check.json, training_curves.png

Task specifics (data, batches, model class, what PACE regularises) come from
`recipe.model.task` (pace_llm/tasks/); DeepSpeed specifics from deepspeed_engine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from pace_llm.config import Recipe, loss_normalization, to_dict
from pace_llm.core import hooks
from pace_llm.core.adapters import apply_pace, trainable_parameter_count
from pace_llm.core.cache import OutputCache, ShardedEpochSampler, build_output_cache
from pace_llm.core.neftune import add_neftune
from pace_llm.core.objectives import PaceObjective, consistency_grad_ratio, fast_epochs_warning
from pace_llm.core.outputs import SampleOutputs
from pace_llm.core.pace import mean_squared_norm
from pace_llm.core.token_batches import TokenBatchSampler
from pace_llm.distributed import deepspeed_engine
from pace_llm.distributed.process_group import all_ranks, all_reduce_scalars, any_rank, init_distributed, rank0_first
from pace_llm.export import export_merged
from pace_llm.files import truncate_rows
from pace_llm.logs import route_logs
from pace_llm.models import DTYPES, load_tokenizer, model_source
from pace_llm.tasks import TASKS, Task
from pace_llm.training.compile import compile_blocks, compile_report
from pace_llm.training.metrics import MetricWriter
from pace_llm.training.mfu import lora_flops_per_token, mfu, peak_flops
from pace_llm.training.plots import plot_metrics
from pace_llm.training.resume import check_resume, resolve_resume
from pace_llm.training.schedule import lr_lambda
from pace_llm.training.state import MicroStep, Progress, StepStats

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


class Trainer:
    rank: int
    world: int
    out: Path
    task: Task
    engine: deepspeed.DeepSpeedEngine  # noqa: F821
    loader: DataLoader
    sampler: ShardedEpochSampler | TokenBatchSampler
    objective: PaceObjective
    cache: OutputCache | None
    eval_set: datasets.Dataset | None  # noqa: F821
    total_steps: int

    def __init__(self, recipe: Recipe):
        self.recipe, self.stats = resolve_resume(recipe), StepStats()  # resume=auto decided here
        self.stop = StopRequested()  # from setup through export: a signal during setup stops after step 1
        self.setup()

    # --- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        r = self.recipe
        self.rank, self.world = init_distributed(r.train.dist_timeout_minutes)
        self.out = Path(r.output_dir)
        # one run per folder; on refusal rank 0 exits with the error and the launcher stops the others
        self.folder_lock = deepspeed_engine.lock_output_dir(self.out) if self.rank == 0 else None
        route_logs(self.out, "train.log")  # again: DeepSpeed, imported just now, added a console handler
        if r.resume:  # before any heavy work: a changed recipe is refused by name
            check_resume(deepspeed_engine.saved_recipe(self.out), to_dict(r), self.world, r.resume_force)
        torch.manual_seed(r.train.seed + self.rank)
        ds_config = deepspeed_engine.build_config(r, self.world)
        self._zero3 = deepspeed_engine.zero3_context(ds_config)  # held: ZeRO-3 partitioned loading lasts while it lives
        self.base_source = model_source(r.model, self.out)
        task_kind = TASKS[r.model.task]
        tokenizer = load_tokenizer(self.base_source) if task_kind.uses_tokenizer else None
        self.task = task_kind(r, tokenizer)
        with rank0_first():  # downloads and dataset caches once; bad data fails before the model loads
            train_set, self.eval_set = self.task.datasets()
        model = self.task.load_model(self.base_source)
        if self._zero3 is not None and self.rank == 0:
            partitioned = sum(hasattr(p, "ds_id") for p in model.parameters())
            log.info("ZeRO-3: model built partitioned (%d of %d tensors)", partitioned, len(list(model.parameters())))
        model = apply_pace(model, r.pace)
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        self.peak_flops = peak_flops(gpu, DTYPES[r.model.dtype])  # None on CPU: no mfu
        self.flops_per_token = lora_flops_per_token(model) if self.peak_flops else None
        if r.train.neftune_alpha:
            add_neftune(model, r.train.neftune_alpha)
        if r.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if r.train.compile:
            log.info("train.compile: %d transformer blocks compile at their first call", compile_blocks(model))
        model.train()  # before any forward: bitsandbytes' CPU 4-bit layers repack in eval mode
        t = r.train
        self.loader = self._build_loader(train_set)
        self.total_steps = t.max_steps or sum(self.epoch_steps(e) for e in range(t.epochs))
        self.engine = deepspeed_engine.initialize(model, ds_config, r, lr_lambda(r, self.total_steps))
        self.cache = self._build_cache(train_set) if r.pace.mode == "fast" else None
        self.objective = PaceObjective.from_config(r.pace, self.cache, self.task.outputs)
        warning = fast_epochs_warning(self.total_steps / self.epoch_steps(0)) if r.pace.mode == "fast" else None
        if warning and self.rank == 0:
            log.warning(warning)
        self.step_normalised = loss_normalization(r) == "step"
        trainable, total = trainable_parameter_count(model)
        if self.rank == 0:
            log.info(
                "trainable parameters: %s of %s (%.3f%%); %d train samples, %d steps; losses are means per %s",
                f"{trainable:,}",
                f"{total:,}",
                100 * trainable / max(1, total),
                len(train_set),
                self.total_steps,
                "supervised row of the step" if self.step_normalised else "micro-batch",
            )

    def _build_loader(self, train_set) -> DataLoader:
        """This rank's training batches: train.micro_batch_size samples at a time, or
        micro-batches of up to train.micro_batch_tokens tokens (TokenBatchSampler), from its
        ShardedEpochSampler shard either way; both are deterministic, so a resume replays them."""
        t = self.recipe.train
        collate = functools.partial(self.task.collate, train=True)
        generator = torch.Generator()  # not the global RNG: resumes replay it exactly
        if t.micro_batch_tokens:
            lengths = sample_lengths(train_set)
            self.sampler = TokenBatchSampler(lengths, t.micro_batch_tokens, self.rank, self.world, seed=t.seed)
            if self.rank == 0:
                self._log_token_batches()
            return DataLoader(train_set, batch_sampler=self.sampler, collate_fn=collate, generator=generator)
        self.sampler = ShardedEpochSampler(len(train_set), self.rank, self.world, seed=t.seed)
        return DataLoader(
            train_set, batch_size=t.micro_batch_size, sampler=self.sampler, collate_fn=collate, generator=generator
        )

    def _log_token_batches(self) -> None:
        """How full rank 0's epoch-0 token-budget micro-batches are: what choosing the budget reads."""
        batches, budget = self.sampler.batches(0), self.sampler.budget
        tokens = sum(self.sampler.lengths[i] for batch in batches for i in batch)
        log.info(
            "micro-batches of up to %d tokens (train.micro_batch_tokens): %d in epoch 0 per rank, "
            "%.1f samples and %.0f%% of the budget each on average",
            budget,
            len(batches),
            sum(map(len, batches)) / len(batches),
            100 * tokens / (budget * len(batches)),
        )

    def epoch_steps(self, epoch: int) -> int:
        """Optimizer steps in `epoch`: its micro-batches, train.gradient_accumulation to a step,
        the last step possibly short (steps()); token budgets give each epoch its own count."""
        if isinstance(self.sampler, TokenBatchSampler):
            batches = self.sampler.count(epoch)
        else:
            batches = math.ceil(len(self.sampler) / self.recipe.train.micro_batch_size)
        return math.ceil(batches / self.recipe.train.gradient_accumulation)

    def _build_cache(self, train_set) -> OutputCache:
        shard = (train_set[i] for i in self.sampler.shard)
        return build_output_cache(
            self.task.outputs,
            ((s["sample_id"], s) for s in shard),
            self.engine,
            self.rank,
            self.recipe.pace.cache_memory_gb,
            disk_dir=str(self.out),
        )

    # --- fit -----------------------------------------------------------------------------
    def fit(self) -> str:
        """Returns "done", "stopped" (stop_after or a signal: checkpointed) or raises on NaN."""
        t = self.recipe.train
        progress = self.resume() if self.recipe.resume else Progress()
        if self.recipe.resume and self.rank == 0:  # rows past the checkpoint are logged again from it
            dropped = truncate_rows(self.out / "metrics.jsonl", progress.step)
            if dropped:
                log.info("resume: dropped %d metrics rows logged after step %d", dropped, progress.step)
        self.writer = MetricWriter(
            self.out, enabled=self.rank == 0, report_to=t.report_to, config=to_dict(self.recipe)
        )  # open until close(): save_outputs adds the PNG
        self.grad_ratio = None  # the last consistency_grad_ratio measured, until a row logs it
        self.fixed_batch = self.first_batch(t.micro_batch_size)
        self.reference = self.fixed_outputs(self.fixed_batch) if t.fp_distance else None
        if self.eval_set is not None and progress.step == 0 and t.eval_at_start:  # the baseline point
            self.log_eval(0)
        bar = tqdm(
            total=self.total_steps, initial=progress.step, disable=self.rank != 0, desc="train", dynamic_ncols=True
        )
        try:
            for micro_batches in self.steps(progress):
                if self.grad_ratio_due(progress.step + 1):  # before the step: PACE_fast's targets are last epoch's
                    # the module, not the engine: DeepSpeed's hooks on the engine's outputs take
                    # any backward through them for a training step's
                    hooks.start_of_forward(self.engine)  # ZeRO-3: a forward of its own, a fresh trace
                    self.grad_ratio = consistency_grad_ratio(
                        self.objective, self.engine.module, micro_batches[0][1], progress.step
                    )
                self.train_step(micro_batches, progress.step)
                batch_index = micro_batches[-1][0]
                progress.finish_step(batch_index)
                self.log_step(progress, batch_index, bar)
                if t.compile and progress.step == 1 and self.rank == 0:
                    log.info("after step 1: %s", compile_report())
                bar.update(1)
                stop_now = any_rank(self.stop.flag)
                if stop_now or progress.step == t.stop_after or t.save_every and progress.step % t.save_every == 0:
                    self.save_checkpoint(progress)
                if stop_now or progress.step == t.stop_after:
                    return "stopped"
            if not (t.save_every and progress.step % t.save_every == 0):
                self.save_checkpoint(progress)
            return "done"
        finally:
            bar.close()
            if t.compile and self.rank == 0:
                log.info("at the end: %s", compile_report())

    def eval_due(self, step: int) -> bool:
        """Whether step `step` evaluates: every train.eval_every steps and the last, with data.eval."""
        t = self.recipe.train
        return self.eval_set is not None and bool(t.eval_every and step % t.eval_every == 0 or step == self.total_steps)

    def grad_ratio_due(self, step: int) -> bool:
        """consistency_grad_ratio is measured for the rows of evaluation steps and every
        train.grad_ratio_every steps, in modes with a consistency term."""
        every = self.recipe.train.grad_ratio_every
        if self.objective.mode in ("off", "noise"):
            return False
        return self.eval_due(step) or bool(every and step % every == 0)

    def steps(self, progress: Progress):
        """Each optimizer step's micro-batches, [(index in epoch, batch), ...], until the last
        step: train.gradient_accumulation of them, fewer in an epoch's last step when its batch
        count is not a multiple (a step never spans two epochs); a resumed epoch skips what it
        consumed."""
        accumulation = self.recipe.train.gradient_accumulation
        while progress.step < self.total_steps:
            self.sampler.set_epoch(progress.epoch)
            self.task.set_epoch(progress.epoch)
            micro_batches = []
            for batch_index, batch in enumerate(self.loader):
                if batch_index < progress.batches_in_epoch:
                    continue
                micro_batches.append((batch_index, batch))
                if len(micro_batches) == accumulation or batch_index == len(self.loader) - 1:
                    yield micro_batches
                    micro_batches = []
                    if progress.step >= self.total_steps:
                        return
            progress.next_epoch()

    def train_step(self, micro_batches: list[tuple[int, dict]], step: int) -> None:
        """Forward and backward on each micro-batch, the optimizer update after the last.

        DeepSpeed divides the loss L_k handed to backward by A = train.gradient_accumulation
        and averages gradients over the W ranks: the update follows (1/W) Σ_ranks Σ_k ∇L_k / A.
          step:        the objective returns S_k / N (S_k: micro-batch k's loss summed over its
                       rows; N: the rows of every micro-batch of the step on every rank), and
                       L_k = (S_k / N)·A·W makes that ∇ Σ_ranks Σ_k S_k / N, the step's mean per row.
          micro_batch: L_k = mean_k · A/K for the step's K micro-batches makes it the mean of
                       ∇mean_k over micro-batches and ranks (K = A except in a short last step).
        The logged losses are the step's: Σ_ranks Σ_k S_k / N, or the mean of the mean_k."""
        accumulation = self.recipe.train.gradient_accumulation
        denominator, scale = None, accumulation / len(micro_batches)
        if self.step_normalised:
            rows = sum(self.objective.task_outputs(batch, step) for _, batch in micro_batches)
            denominator = all_reduce_scalars([float(rows)])[0]
            scale = accumulation * self.world
        for k, (_, batch) in enumerate(micro_batches):
            # the update after the last micro-batch, also in a short step, whose end DeepSpeed's
            # own count (every A-th micro-step) would miss: the next epoch's step would get its gradients
            self.engine.set_gradient_accumulation_boundary(k == len(micro_batches) - 1)
            self.stats.add(self.train_micro_step(batch, step, denominator, scale))

    def train_micro_step(self, batch: dict, step: int, denominator: float | None, scale: float) -> MicroStep:
        started = time.perf_counter()
        with self.objective.scope(step, batch):  # shared dropout masks (and packed noise) through backward too
            result = self.objective(self.engine, batch, step, denominator)
            if not all_ranks(bool(torch.isfinite(result.loss))):  # before backward: no update from it
                raise FloatingPointError(
                    f"non-finite loss at step {step + 1} (task {result.task_loss.item():.4g}, consistency "
                    f"{result.consistency_loss.item():.4g}): stopping; {self.last_good_checkpoint()} "
                    "(lower train.lr or pace.lam?)"
                )
            self.engine.backward(result.loss if scale == 1 else result.loss * scale)
        self.stage0_norm = deepspeed_engine.stage0_grad_norm(self.engine)
        self.engine.step()
        return MicroStep(
            result.loss.item(),
            result.task_loss.item(),
            result.consistency_loss.item(),
            self.task.count_tokens(batch),
            time.perf_counter() - started,
        )

    def log_step(self, progress: Progress, batch_index: int, bar) -> None:
        # step normalisation: each micro-step's losses are its share of the step's mean, so they add up
        # over micro-steps and ranks; otherwise they are averaged
        *losses, tokens_per_s = all_reduce_scalars(list(self.stats.pop(sum_losses=self.step_normalised)))
        loss, task, cons = (v / (1 if self.step_normalised else self.world) for v in losses)
        tokens_per_s /= self.world
        t, step = self.recipe.train, progress.step
        if not (step % t.log_every == 0 or step == self.total_steps or self.eval_due(step)):
            return  # an evaluation step always gets its row: eval_every need not be a multiple of log_every
        norm = deepspeed_engine.grad_norm(self.engine) if self.stage0_norm is None else self.stage0_norm
        row = {
            "step": step,
            "epoch": progress.epoch + (batch_index + 1) / len(self.loader),
            "loss": loss,
            "task_loss": task,
            "consistency_loss": cons,
            "grad_norm": norm,
            "lr": self.engine.get_lr()[0],
            "tokens_per_s": tokens_per_s * self.world,
        }
        if torch.cuda.is_available():  # this rank's peak since the start
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.peak_flops:  # bf16/fp16 on a GPU of mfu.PEAK_TFLOPS
            forwards = 2 if self.objective.mode == "full" else 1
            row["mfu"] = mfu(row["tokens_per_s"], self.flops_per_token, self.peak_flops, self.world, forwards)
        if self.grad_ratio is not None:  # measured at this step or since the last row
            row["consistency_grad_ratio"], self.grad_ratio = self.grad_ratio, None
        if self.reference is not None:
            row["fp_distance"] = mean_squared_norm(self.fixed_outputs(self.fixed_batch) - self.reference).item()
        if self.eval_due(step):
            row.update(self.evaluate())
            if self.rank == 0:
                log.info("step %d: eval loss %.4f", step, row["eval_loss"])
        self.writer.write(row)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")

    def log_eval(self, step: int) -> None:
        scores = self.evaluate()
        if self.rank == 0:
            log.info("eval loss before training %.4f", scores["eval_loss"])
        self.writer.write({"step": step, **scores})

    # --- evaluate ------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """{"eval_loss": held-out task loss} in eval mode (no noise, no dropout): the mean over
        all supervised rows (answer tokens for LMs, samples for classifiers), so it depends on
        neither the batch size nor the world size; a classifier (not regression) also gets
        "eval_accuracy", the fraction of samples whose argmax logit is the label. Rank r scores
        samples r, r+W, ...; every rank runs the same number of batches (ZeRO-3 forwards are
        collective), padding with a repeat that counts zero."""
        eval_set, size, rows = self.eval_set, self.recipe.train.micro_batch_size, self.task.outputs
        mine = list(range(self.rank, len(eval_set), self.world))
        per_rank = -(-len(eval_set) // self.world)
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        mine += [0] * (per_rank - len(mine))
        classifier = isinstance(rows, SampleOutputs) and not rows.regression
        loss_sum, rows_sum, correct_sum = 0.0, 0.0, 0.0
        with eval_mode(self.engine):
            for i in range(0, per_rank, size):
                batch = self.task.collate([eval_set[j] for j in mine[i : i + size]])
                out = rows.forward(self.engine, batch)
                w = torch.tensor(weights[i : i + size])
                if "sample_order" in batch:  # packed: rows come in the packer's sample order
                    w = w[batch["sample_order"]]
                w = w.repeat_interleave(out.counts.cpu())
                loss_sum += float((rows.loss(out, reduction="none").float().cpu() * w).sum())
                rows_sum += float(w.sum())
                if classifier:  # one row per sample: w is the sample weight
                    correct_sum += float(((out.f.argmax(-1) == out.target).float().cpu() * w).sum())
        loss_sum, rows_sum, correct_sum = all_reduce_scalars([loss_sum, rows_sum, correct_sum])
        scores = {"eval_loss": loss_sum / max(rows_sum, 1.0)}
        if classifier:
            scores["eval_accuracy"] = correct_sum / max(rows_sum, 1.0)
        return scores

    def first_batch(self, size: int) -> dict:
        dataset = self.eval_set or self.loader.dataset
        return self.task.collate([dataset[i] for i in range(min(size, len(dataset)))])

    def fixed_outputs(self, batch) -> torch.Tensor:
        """Eval-mode outputs f on a fixed batch (FP-distance and the export check)."""
        with eval_mode(self.engine):
            return self.task.outputs.forward(self.engine, batch).f.float().cpu()

    # --- save ----------------------------------------------------------------------------
    def resume(self) -> Progress:
        state = deepspeed_engine.load_checkpoint(self.engine, self.out, self.cache)
        return Progress(**state) if state else Progress()

    def last_good_checkpoint(self) -> str:
        """Where a diverged run can go back to: checkpoints are written only of finite weights."""
        tag = deepspeed_engine.latest_tag(self.out)
        if tag is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint, {self.out / 'checkpoints' / tag}, is finite and intact (resume=true)"

    def save_checkpoint(self, progress: Progress) -> None:
        """Only of finite weights (on every rank), so that `latest` never points at a diverged state."""
        if not all_ranks(deepspeed_engine.trainable_weights_finite(self.engine)):
            raise FloatingPointError(
                f"the weights after step {progress.step} are not finite (the update diverged): not "
                f"checkpointed; {self.last_good_checkpoint()} (lower train.lr or pace.lam?)"
            )
        deepspeed_engine.save_checkpoint(
            self.engine,
            self.out,
            progress.to_dict(),
            self.cache,
            self.recipe.train.keep_checkpoints,
            to_dict(self.recipe),
            before_commit=self.before_checkpoint_commit,
        )

    def before_checkpoint_commit(self, step: int) -> None:
        """Runs on every rank once a checkpoint's files are written, before it is committed.
        Nothing by default; the crash-safety test overrides it to kill the process here."""

    def save_outputs(self) -> None:
        """OUTPUT_DIR/adapter (PEFT format) and OUTPUT_DIR/merged (HF folder), from rank 0."""
        r, out = self.recipe, self.out
        check_batch = self.first_batch(4)
        trained = self.fixed_outputs(check_batch)  # every rank: ZeRO-3 forwards are collective
        deepspeed_engine.save_adapter(self.engine, out / "adapter")
        if self.rank == 0:
            deepspeed_engine.unset_zero3()  # the base for merging is a plain, unpartitioned model
            merged = export_merged(
                self.task.load_model(self.base_source),
                out / "adapter",
                out / "merged",
                self.task.tokenizer,
                quantized=bool(r.model.quantization),
            )
            if r.train.export_check:
                self.check_export(merged, check_batch, trained)
            plot_metrics(out / "metrics.jsonl", out / "training_curves.png")
            self.writer.add_artifact(out / "training_curves.png")
            log.info("adapter: %s  merged: %s", out / "adapter", out / "merged")
        dist.barrier()

    def check_export(self, merged, batch: dict, trained: torch.Tensor) -> None:
        merged.eval()
        with torch.no_grad():
            diff = (self.task.outputs.forward(merged, batch).f.float() - trained).abs().max().item()
        # Merging W + sBA re-rounds every weight, and the error grows with the logits' size
        # (SmolLM2, fp32, 30 layers, |logit| up to ~43: 0.8-1.1e-4), so the bound is relative
        # with an absolute floor; a wrong merge (noise or scaling left in) is off by O(1).
        scale = trained.abs().max().item()
        exact = self.recipe.model.dtype == "fp32" and not self.recipe.model.quantization
        tol = max(1e-4, 1e-5 * scale) if exact else max(5e-2, 5e-3 * scale)
        (self.out / "export_check.json").write_text(
            json.dumps({"max_abs_logit_diff": diff, "max_abs_logit": scale, "tolerance": tol, "rows": len(trained)})
        )
        if diff > tol:
            raise RuntimeError(f"merged model differs from the trained model by {diff:.3g} (> {tol})")
        log.info("merged model matches the trained model (max |Δlogit| %.2e)", diff)

    def close(self) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if self.cache is not None:
            self.cache.close()
        if getattr(self, "folder_lock", None) is not None:
            self.folder_lock.close()
            self.folder_lock = None


def sample_lengths(dataset) -> list[int]:
    """len(input_ids) of every encoded sample, read in Arrow: no Python copy of every token id."""
    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


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
