"""`resume=true` compares the recipe with the one the checkpoint was written under.

A resumed run is exact (the same losses as an uninterrupted one) only if the data, its
order, the batch sizes, the seed, the model and PACE's settings are the same. Such a
change is refused with every changed key listed, unless `resume_force=true`. Changing
the length of the run (train.max_steps / train.epochs) is allowed with a warning: the LR
schedule is recomputed, so it differs from the resume point on. Logging, evaluation and
checkpoint frequencies, and where the run stops, may change freely.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from pace_llm.config import RecipeError

log = logging.getLogger("pace_llm.resume")

FREE = {
    "output_dir",
    "resume",
    "resume_force",
    "train.stop_after",
    "train.log_every",
    "train.eval_every",
    "train.eval_at_start",
    "train.save_every",
    "train.keep_checkpoints",
    "train.report_to",
    "train.fp_distance",
    "train.grad_ratio_every",
    "train.dist_timeout_minutes",
    "train.export_check",
    "data.eval",
    "data.eval_split",
    "data.eval_limit",
}
SCHEDULE = {"train.max_steps", "train.epochs"}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def same_file(a, b) -> bool:
    """Two spellings of one existing file or folder ('.cache/x' and '/work/.cache/x', a
    symlinked path): the same data or model, not a change."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (a hub id, a tiny: name): compare as text
        return False


def changed_keys(saved: dict, now: dict) -> dict[str, tuple]:
    """key -> (saved value, current value) for every key that differs (paths by the file
    they name, relative ones from the current directory)."""
    a, b = flatten(saved), flatten(now)
    keys = sorted(a.keys() | b.keys())
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k) and not same_file(a.get(k), b.get(k))}


def check_resume(saved: dict | None, recipe: dict, world_size: int, force: bool) -> None:
    """saved: the checkpoint's {"recipe", "world_size"} (None: written before this check)."""
    if saved is None:
        log.warning("resume: the checkpoint does not record its recipe; cannot check that this recipe matches it")
        return
    changes = changed_keys({**saved["recipe"], "world_size": saved["world_size"]}, {**recipe, "world_size": world_size})
    breaking = {k: v for k, v in changes.items() if k not in FREE | SCHEDULE}
    for key in changes.keys() & SCHEDULE:
        log.warning("resume: %s changed %r -> %r: the LR schedule changes from the resume point on", key, *changes[key])
    if not breaking:
        return
    listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in breaking.items())
    if force:
        log.warning("resume_force=true: resuming although the recipe changed (%s); the run is no longer exact", listing)
        return
    raise RecipeError(
        f"resume: the recipe differs from the checkpoint's in ways that break an exact "
        f"resume: {listing}. Restore them, or pass resume_force=true to continue anyway"
    )


def resolve_resume(recipe):
    """The recipe with resume true or false: auto resumes when output_dir has a checkpoint (a
    requeued job) and starts otherwise; true without a checkpoint, or false with one, is a
    RecipeError naming the folder (nothing is overwritten, nothing starts from scratch unasked)."""
    out = Path(recipe.output_dir)
    has_checkpoint = (out / "checkpoints" / "latest").exists()
    if recipe.resume == "auto":
        return dataclasses.replace(recipe, resume=has_checkpoint)
    if not recipe.resume and has_checkpoint:
        raise RecipeError(
            f"output_dir {out} holds checkpoints of an earlier run: pass resume=true to "
            "continue it, or choose another output_dir (nothing was overwritten)"
        )
    if recipe.resume and not has_checkpoint:
        raise RecipeError(
            f"resume=true, but {out / 'checkpoints'} has no checkpoint to resume from (no 'latest'): "
            "check output_dir, or use resume=auto to start when there is none"
        )
    return recipe
