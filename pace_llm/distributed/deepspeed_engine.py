"""DeepSpeed behind a few named functions: config, engine, ZeRO-3 gathering, checkpoints.

Checkpoint layout (OUTPUT_DIR/checkpoints/):
    step-00000040/     DeepSpeed's files (trainable parameters, optimizer, scheduler) plus
                       pace_rank{r}.pt (RNG states, this rank's PACE_fast cache shard) and
                       recipe.json (the recipe and world size the run was started with)
    latest             the tag of the newest complete checkpoint
A checkpoint is written as step-N.tmp and renamed when every rank has finished, and only
then does `latest` move (atomic os.replace): a kill during a save leaves the previous
checkpoint and `latest` untouched. `before_commit(step)`, when given, runs on every rank
after the files are written and before the rename: the crash-safety test kills the
process there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from pace_llm import files
from pace_llm.config import RecipeError

log = logging.getLogger("pace_llm.deepspeed")


def build_config(recipe, world: int) -> dict:
    """The DeepSpeed config from the recipe, or the recipe's JSON with batch sizes filled in."""
    t, d = recipe.train, recipe.deepspeed
    batch = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation * world,
    }
    if d.config:
        config = json.loads(Path(d.config).read_text())
        for key, value in batch.items():
            if config.get(key, "auto") == "auto":
                config[key] = value
            elif config[key] != value:
                raise RecipeError(
                    f"deepspeed.config {d.config}: {key}={config[key]} but the recipe and world size "
                    f"({world}) give {value}"
                )
        return config
    zero: dict = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params:
        if d.zero_stage != 3:
            raise RecipeError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    dtype = recipe.model.dtype
    return {
        **batch,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
    }


def is_zero3(config: dict) -> bool:
    return config.get("zero_optimization", {}).get("stage", 0) == 3


def zero3_context(config: dict):
    """Under ZeRO-3, an HfDeepSpeedConfig kept alive makes from_pretrained build the model
    partitioned (deepspeed.zero.Init). Returns it (or None); `unset_zero3` drops it."""
    if not is_zero3(config):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def unset_zero3() -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def initialize(model, config: dict, recipe, lr_lambda):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    t = recipe.train
    if recipe.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=t.lr, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _gathered(params, engine):
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_adapter(engine, path: Path) -> None:
    """The adapter, gathered from all ranks under ZeRO-3 (never an empty file)."""
    from pace_llm.export import save_adapter as save

    model = engine.module
    params = [p for p in model.parameters() if p.requires_grad]
    with _gathered(params, engine):
        if dist.get_rank() == 0:
            save(model, path)
    dist.barrier()


def _rng_state() -> dict:
    """Tensors, tuples and numbers only, so that torch.load(weights_only=True) reads it back
    (a checkpoint is not code: numpy's state keeps its key array as a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_tag(out: Path) -> Optional[str]:
    latest = Path(out) / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.exists() else None


def saved_recipe(out: Path) -> Optional[dict]:
    """{"recipe": ..., "world_size": ...} of the newest checkpoint, or None (none, or older)."""
    tag = latest_tag(out)
    path = Path(out) / "checkpoints" / str(tag) / "recipe.json"
    return json.loads(path.read_text()) if tag and path.exists() else None


def save_checkpoint(
    engine,
    out: Path,
    state: dict,
    cache,
    keep: int,
    recipe: dict,
    before_commit: Optional[Callable[[int], None]] = None,
) -> None:
    root = out / "checkpoints"
    tag = f"step-{state['step']:08d}"
    rank = dist.get_rank()
    # a name of this save's own (rank 0's pid and clock, shared with the other ranks): a second
    # process writing the same folder cannot delete or mix into this one's temporary folder
    name = [f"{tag}.tmp-{os.getpid()}-{time.time_ns()}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    tmp = root / name[0]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(
        str(root), tag=tmp.name, client_state={"pace_state": state}, save_latest=False, exclude_frozen_parameters=True
    )
    extra = {"rng": _rng_state(), "cache": cache.state_dict() if cache is not None else None}
    torch.save(extra, tmp / f"pace_rank{rank}.pt")
    if rank == 0:
        (tmp / "recipe.json").write_text(json.dumps({"recipe": recipe, "world_size": dist.get_world_size()}))
    if before_commit is not None:
        before_commit(state["step"])
    files.fsync_tree(tmp)  # this rank's files on disk before the rename makes it the checkpoint
    dist.barrier()
    if rank == 0:
        commit(root, tmp, tag, keep)
        log.info("checkpoint %s", root / tag)
    dist.barrier()


def lock_output_dir(out: Path):
    """An exclusive lock on `out` for this run's lifetime (the open file; rank 0 calls it), or a
    RecipeError naming the process that holds it: two runs writing one folder would delete each
    other's checkpoints. Under the lock, what a killed save left is tidied: temporary folders go,
    and a checkpoint moved aside for a re-save comes back if the re-save never landed."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / ".pace-llm.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RecipeError(
            f"output_dir {out} is in use by another run ({holder}): one run per folder; wait for it, "
            "or choose another output_dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    fh.flush()
    root = out / "checkpoints"
    for leftover in sorted(root.glob("step-*.old-*")) if root.exists() else []:
        final = root / leftover.name.split(".old-")[0]
        if final.exists():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.rename(final)
    for leftover in root.glob("step-*.tmp-*") if root.exists() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    return fh


def commit(root: Path, tmp: Path, tag: str, keep: int) -> None:
    """`tmp` becomes checkpoint `tag` and `latest` points at it. An existing `tag` (a re-save) is
    moved aside first and deleted only once `latest` is rewritten, so a crash at any point leaves
    `latest` naming a complete checkpoint. Pruning keeps the newest `keep` (0: all), by step, and
    never the one `latest` names."""
    final = root / tag
    aside = root / f"{tag}.old-{os.getpid()}-{time.time_ns()}"
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    files.write_atomic(root / "latest", tag)
    shutil.rmtree(aside, ignore_errors=True)
    for old in checkpoint_tags(root)[:-keep] if keep > 0 else []:
        if old != tag:
            shutil.rmtree(root / old, ignore_errors=True)


def checkpoint_tags(root: Path) -> list[str]:
    """The committed checkpoints in `root` (step-N folders; not .tmp-/.old- ones), oldest first."""
    return sorted(
        (p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)), key=lambda t: int(t[5:])
    )


def load_rank_state(path: Path) -> dict:
    """A pace_rank*.pt (RNG state, PACE_fast cache) read with weights_only=True: tensors,
    numbers and tuples, never code (PyTorch's default since 2.6, CVE-2025-32434). DeepSpeed's
    own optimizer files still unpickle: a checkpoint folder is trusted input (README, Resuming)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"{path} holds more than tensors and numbers, so it is not loaded (weights_only): a checkpoint "
            f"written before pace-llm stored numpy's RNG state as a tensor, or a tampered file ({err})"
        ) from None


def load_checkpoint(engine, out: Path, cache) -> dict | None:
    """The training state of `latest`; if it fails to load on any rank (a damaged file), the
    checkpoint before it, and so on, with a warning naming each failure. None without any."""
    root = out / "checkpoints"
    latest = latest_tag(out)
    if latest is None:
        log.info("resume: no checkpoint in %s, starting from scratch", root)
        return None
    older = [t for t in checkpoint_tags(root) if t < latest]  # zero-padded: name order is step order
    for tag in [latest, *reversed(older)]:
        try:
            state, error = _load_tag(engine, root / tag, cache), None
        except Exception as err:  # noqa: BLE001 (any damage: the ranks agree below and fall back together)
            state, error = None, err
        failed = torch.tensor([float(error is not None)])
        dist.all_reduce(failed)
        if not failed.item():
            log.info("resumed from %s at step %d", root / tag, state["step"])
            return state
        log.warning(
            "resume: checkpoint %s failed to load (%s); trying the one before it", root / tag, error or "another rank"
        )
        if cache is not None:
            cache.clear()
    raise RuntimeError(f"no checkpoint in {root} loads (tried {latest} and every older one)")


def _load_tag(engine, folder: Path, cache) -> dict:
    _, client = engine.load_checkpoint(
        str(folder.parent),
        tag=folder.name,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}")
    rank, files = dist.get_rank(), sorted(folder.glob("pace_rank*.pt"))
    own = folder / f"pace_rank{rank}.pt"
    extra = load_rank_state(own if own.exists() else files[0])
    if cache is not None:  # every saved shard: the world size may have changed
        for f in files:
            cache.load_state_dict(load_rank_state(f)["cache"])
    _set_rng_state(extra["rng"])
    return client["pace_state"]


def trainable_weights_finite(engine) -> bool:
    """Whether this rank's share of the trainable weights is finite (under ZeRO-3 each rank
    holds a partition, `ds_tensor`; the module's own tensors are empty placeholders)."""
    for p in engine.module.parameters():
        if p.requires_grad and not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()):
            return False
    return True


def stage0_grad_norm(engine) -> float | None:
    """DeepSpeed reports the global gradient norm for ZeRO >= 1 only; for stage 0 the
    (already all-reduced) gradients are on the parameters at the accumulation boundary,
    between backward and step. None otherwise: ask `grad_norm` after the step."""
    if engine.zero_optimization_stage() != 0 or not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad.float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0
