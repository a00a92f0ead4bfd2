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
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

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
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    tmp = root / f"{tag}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
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
    dist.barrier()
    if rank == 0:
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest.tmp").write_text(tag)
        os.replace(root / "latest.tmp", root / "latest")
        tags = sorted(
            p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")
        )
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(root / old, ignore_errors=True)
        log.info("checkpoint %s", final)
    dist.barrier()


def load_checkpoint(engine, out: Path, cache) -> dict | None:
    root = out / "checkpoints"
    tag = latest_tag(out)
    if tag is None:
        log.info("resume: no checkpoint in %s, starting from scratch", root)
        return None
    _, client = engine.load_checkpoint(
        str(root), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise RuntimeError(f"could not load checkpoint {root / tag}")
    rank, files = dist.get_rank(), sorted((root / tag).glob("pace_rank*.pt"))
    own = root / tag / f"pace_rank{rank}.pt"
    extra = torch.load(own if own.exists() else files[0], weights_only=False)
    if cache is not None:  # every saved shard: the world size may have changed
        for f in files:
            cache.load_state_dict(torch.load(f, weights_only=False)["cache"])
    _set_rng_state(extra["rng"])
    log.info("resumed from %s at step %d", root / tag, client["pace_state"]["step"])
    return client["pace_state"]


def stage0_grad_norm(engine) -> float | None:
    """DeepSpeed reports the global gradient norm for ZeRO >= 1 only; for stage 0 the
    (already all-reduced) gradients are on the parameters at the accumulation boundary,
    between backward and step. None otherwise: ask `grad_norm` after the step."""
    if engine.zero_optimization_stage() != 0 or not engine.is_gradient_accumulation_boundary():
        return None
    grads = [p.grad.float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0
