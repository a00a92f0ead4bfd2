"""The recipe schema: typed sections, validated before any heavy work.

A recipe is YAML with the sections below; `section.key=value` overrides follow the
recipe path on the command line. An unknown key is an error naming it and the closest
valid key; a wrong type or value names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pace_llm.core.pace_config import PaceConfig


class RecipeError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: `off`/`yes` stay strings (pace.mode: off), 1e-3 is a float."""


_Loader.yaml_implicit_resolvers = {
    ch: [r for r in resolvers if r[0] not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass
class ModelSection:
    name: str = "tiny:phi3"  # hub id, local folder, or tiny:{phi3,llama,roberta,vit}
    task: str = "causal_lm"  # a key of pace_llm.tasks.TASKS
    num_labels: Optional[int] = None  # classifiers: required by task kinds with needs_num_labels
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    quantization: Optional[Literal["nf4", "int8"]] = None
    # transformers' attention (sdpa, eager, flash_attention_2, ...), or segment_sdpa: causal
    # attention per packed sample, Σ n² instead of T² per packed row (core/segment_attention.py)
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False


def per_source(default):
    """A `data:` key that a mixture source (`data.train` / `data.eval` as a list) may also set
    for itself: DataSource is built from the keys marked so, so a new one is declared once."""
    return dataclasses.field(default=default, metadata={"per_source": True})


@dataclasses.dataclass
class DataSection:
    train: Union[str, list[DataSource]] = "tiny:arithmetic"  # a file, hub id, tiny:*, or a mixture
    train_split: str = "train"
    eval: Union[str, list[DataSource], None] = None
    eval_split: str = "test"
    hub_config: Optional[str] = per_source(None)  # e.g. "main" for openai/gsm8k, the task for glue
    # causal_lm: auto picks the format from the columns; the others are the names of
    # pace_llm/tasks/data_formats.py's FORMATS (checked by validate: the registry is there)
    format: str = per_source("auto")
    train_on: Literal["assistant", "last", "all"] = "assistant"  # all = every token but padding
    prompt_template: str = per_source("{question}")  # prompt_answer: the user turn, fields in {braces}
    answer_field: str = per_source("answer")  # prompt_answer: the supervised answer
    messages_field: str = per_source("messages")  # messages: [{role, content}]
    conversations_field: str = per_source("conversations")  # sharegpt: [{from, value}]
    instruction_field: str = per_source("instruction")  # alpaca
    input_field: str = per_source("input")
    output_field: str = per_source("output")
    system_field: str = per_source("system")
    chat_template: Optional[str] = None  # a Jinja file for a tokenizer without one (also exported)
    skip_invalid: bool = False  # skip (and count) rows a format cannot read, instead of failing
    text_fields: list[str] = dataclasses.field(default_factory=lambda: ["sentence"])  # seq_cls
    image_field: str = "image"  # image_cls
    image_size: int = 224
    augment: Literal["none", "crop_flip"] = "none"  # image_cls: the authors' few-shot crop + flip
    label_field: str = "label"
    max_length: int = 512  # tokens per sample (truncated); with packing, per packed row
    # causal_lm: pack each micro-batch's train.micro_batch_size samples into rows of up to
    # max_length tokens (best-fit-decreasing, pace_llm/core/packing.py): no padding but row tails
    packing: bool = False
    limit: Optional[int] = None  # first N training rows (smoke runs)
    # train on N rows of data.train drawn with train.seed (a new subset per seed, the same in every
    # epoch and on resume), N / classes per class of data.label_field for classifiers: few-shot sets
    sample: Optional[int] = None
    eval_limit: Optional[int] = None

    def sources(self, which: str) -> list[DataSource]:
        """`train` or `eval` as a list of sources (a plain string is one source)."""
        value = getattr(self, which)
        if value is None:
            return []
        default = DataSource(path=value) if isinstance(value, str) else None
        split, limit = getattr(self, f"{which}_split"), self.limit if which == "train" else self.eval_limit
        return [
            dataclasses.replace(s, split=s.split or split, limit=s.limit if s.limit is not None else limit)
            for s in ([default] if default else value)
        ]

    def for_source(self, source: DataSource) -> DataSection:
        """This section with the source's own keys (format, field names, hub_config) in force."""
        own = {k: getattr(source, k) for k in SOURCE_KEYS if getattr(source, k) is not None}
        return dataclasses.replace(self, **own)


# The data keys a source may set for itself (marked per_source above), unset (None) by default.
SOURCE_KEYS = [f.name for f in dataclasses.fields(DataSection) if f.metadata.get("per_source")]
DataSource = dataclasses.make_dataclass(
    "DataSource",
    [
        ("path", str, dataclasses.field(default="")),  # local file, hub id, or tiny:* (required)
        (
            "weight",
            float,
            dataclasses.field(default=1.0),
        ),  # repetitions per epoch; a fraction samples rows with train.seed
        ("split", Optional[str], dataclasses.field(default=None)),  # default: data.train_split / data.eval_split
        ("limit", Optional[int], dataclasses.field(default=None)),  # default: data.limit / data.eval_limit
        # the section's annotations are strings (postponed evaluation), resolved in this module
        *[
            (f.name, f"Optional[{f.type}]", dataclasses.field(default=None))
            for f in dataclasses.fields(DataSection)
            if f.name in SOURCE_KEYS
        ],
    ],
)
DataSource.__module__ = __name__  # where get_type_hints resolves those annotations, and pickle finds it
DataSource.__doc__ = """One source of a mixture (`data.train` / `data.eval` as a list): its path, weight,
split and limit, and any of the data section's per_source keys; unset keys take the data
section's value."""


@dataclasses.dataclass
class TrainSection:
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; sets the schedule when given
    stop_after: Optional[int] = None  # end this invocation after step k (checkpointed)
    micro_batch_size: int = 4  # per rank
    # tokens per micro-batch and rank instead (causal_lm with data.packing; >= data.max_length):
    # samples are grouped into micro-batches of at most this many tokens, each packed into rows
    # of this length (usually one), so every micro-batch fills the same memory whatever the
    # sample lengths (pace_llm/core/token_batches.py). micro_batch_size then only sizes the
    # held-out batches (evaluation, fp_distance); the batch count per epoch follows the data
    micro_batch_tokens: Optional[int] = None
    gradient_accumulation: int = 1  # an epoch's last step may hold fewer micro-batches
    # What the task loss and consistency are averaged over: "step" = every supervised row of the
    # optimizer step (all micro-batches, all ranks), so packing, micro-batch size and
    # accumulation do not change the gradient; "micro_batch" = each micro-batch's own mean,
    # averaged (token-budget micro-batches hold different sample counts: step suits them).
    # null: step with data.packing (and micro_batch_tokens), micro_batch without (the unpacked behaviour)
    loss_normalization: Optional[Literal["step", "micro_batch"]] = None
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: Optional[float] = None  # fraction of all steps (ceil), instead of warmup_steps
    lr_schedule: Literal["cosine", "linear"] = "cosine"  # decay to min_lr after the warmup
    grad_clip: float = 0.0  # 0 = off
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; with data.eval, also before training and at the end
    eval_at_start: bool = True  # the eval before training (false: sweeps, whose runs all share it)
    fp_distance: bool = False  # log ‖f(θ) − f(θ0)‖² on a fixed held-out batch
    # log consistency_grad_ratio = ‖∇(λ·consistency)‖ / ‖∇task‖ on a training batch at every eval
    # and every this many steps (0: at evals only): above 1 the consistency steers the update
    grad_ratio_every: int = 0
    # NEFTune: uniform noise α / sqrt(L·d) on the input embeddings, L each sample's length
    # (pace_llm/core/neftune.py); 0 = off. Its paper's values: 5, 10, 15
    neftune_alpha: float = 0.0
    # torch.compile each transformer block (pace_llm/training/compile.py); the first steps
    # compile (seconds to minutes), the log reports graphs and graph breaks; not with ZeRO-3
    compile: bool = False
    dist_timeout_minutes: float = 30.0  # a collective's wait for the slowest rank before the run fails
    export_check: bool = True  # compare merged-model logits with the trained model's
    # trackers besides metrics.jsonl (always): tensorboard, wandb, mlflow (training/metrics.py)
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])


@dataclasses.dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    config: Optional[str] = None  # a DeepSpeed JSON file; replaces the generated config


@dataclasses.dataclass
class Recipe:
    output_dir: str = "outputs/run"
    resume: Union[bool, Literal["auto"]] = False  # auto: resume when output_dir has a checkpoint, else start
    resume_force: bool = False  # resume even though the recipe changed in ways that break exactness
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    pace: PaceConfig = dataclasses.field(default_factory=PaceConfig)  # pace_llm/core/pace_config.py
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = dataclasses.field(default_factory=DeepSpeedSection)


def _check_type(key: str, value: Any, tp) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(key, value, arg)
            except RecipeError:
                if _same_shape(value, arg):  # e.g. a list given for a list arm: its error names the item
                    raise
        raise RecipeError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping ({tp.__name__}), got {value!r}")
        return _build(tp, value, f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        tp is bool
        and not isinstance(value, bool)
        or tp in (int, float)
        and isinstance(value, bool)
        or not isinstance(value, tp)
    ):
        raise RecipeError(f"{key}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _same_shape(value, tp) -> bool:
    return (
        isinstance(value, list)
        and typing.get_origin(tp) is list
        or isinstance(value, dict)
        and dataclasses.is_dataclass(tp)
    )


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + str(list(args))
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return "null" if tp is type(None) else tp.__name__


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise RecipeError(f"unknown recipe key {full!r}{hint}; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{full}: expected a section (mapping), got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _check_type(full, value, tp)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own checks (PaceConfig) name the field: add the section
        raise RecipeError(f"{prefix}{err}") from None


def _set_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise RecipeError(f"override {override!r} is not of the form section.key=value")
    path, raw = override.split("=", 1)
    try:
        value = _yaml(raw) if raw != "" else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(
            f"override {override!r}: the value is not valid YAML ({problem}); quote it as a string"
        ) from None
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_recipe(path: Optional[str] = None, overrides: list[str] = ()) -> Recipe:
    tree: dict = {}
    if path is not None:
        try:
            tree = _yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RecipeError(f"recipe file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise RecipeError(f"recipe {path} must be a mapping of sections")
    for override in overrides:
        _set_override(tree, override)
    recipe = _build(Recipe, tree)
    validate(recipe)
    return recipe


def validate(r: Recipe) -> None:
    """Value checks the types cannot express."""

    def need(cond, key, what):
        if not cond:
            raise RecipeError(f"{key}: expected {what}, got {eval_key(r, key)!r}")

    # the registries live with what they register (and import torch): read here, not at import
    from pace_llm.tasks import TASKS
    from pace_llm.tasks.data_formats import FORMATS

    need(r.model.task in TASKS, "model.task", f"one of {list(TASKS)}")
    kind = TASKS[r.model.task]
    from pace_llm.training.metrics import REPORT_TO

    need(set(r.train.report_to) <= set(REPORT_TO), "train.report_to", f"a list of {list(REPORT_TO)}")
    need(0 <= r.deepspeed.zero_stage <= 3, "deepspeed.zero_stage", "0, 1, 2 or 3")
    need(r.train.micro_batch_size >= 1, "train.micro_batch_size", "an integer >= 1")
    need(r.train.gradient_accumulation >= 1, "train.gradient_accumulation", "an integer >= 1")
    need(0 < r.train.lr < float("inf"), "train.lr", "a finite value > 0")  # also false for nan
    need(r.train.epochs >= 1, "train.epochs", "an integer >= 1")
    need(r.train.log_every >= 1, "train.log_every", "an integer >= 1")
    need(r.train.eval_every >= 0, "train.eval_every", "an integer >= 0 (0: at the end only)")
    need(r.train.save_every >= 0, "train.save_every", "an integer >= 0 (0: at the end only)")
    need(r.train.keep_checkpoints >= 0, "train.keep_checkpoints", "an integer >= 0 (0: keep all)")
    need(
        r.train.warmup_ratio is None or 0 <= r.train.warmup_ratio < 1,
        "train.warmup_ratio",
        "a fraction in [0, 1) or null",
    )
    need(
        r.train.warmup_ratio is None or r.train.warmup_steps == 0,
        "train.warmup_steps",
        "0 when train.warmup_ratio is set (set one of them)",
    )
    need(r.train.max_steps is None or r.train.max_steps >= 1, "train.max_steps", "an integer >= 1")
    need(r.train.stop_after is None or r.train.stop_after >= 1, "train.stop_after", "an integer >= 1")
    need(r.train.grad_ratio_every >= 0, "train.grad_ratio_every", "an integer >= 0")
    need(r.train.neftune_alpha >= 0, "train.neftune_alpha", "a value >= 0")
    need(
        r.model.attn_implementation != "segment_sdpa" or r.model.task == "causal_lm",
        "model.attn_implementation",
        f"not segment_sdpa for model.task={r.model.task} (it is causal attention per packed sample)",
    )
    need(
        not (r.train.compile and r.deepspeed.zero_stage == 3),
        "train.compile",
        "false with deepspeed.zero_stage=3 (ZeRO-3 gathers parameters in module hooks that torch.compile "
        "would trace; use zero_stage <= 2)",
    )
    need(0 < r.train.dist_timeout_minutes < float("inf"), "train.dist_timeout_minutes", "minutes > 0")
    need(
        not r.train.neftune_alpha or kind.uses_tokenizer,
        "train.neftune_alpha",
        f"0 for model.task={r.model.task} (NEFTune noises token embeddings)",
    )
    need(
        r.pace.mode != "lazy_half" or r.train.micro_batch_size >= 2,
        "train.micro_batch_size",
        ">= 2 with pace.mode=lazy_half (it halves the batch)",
    )
    for which in ("train", "eval"):
        sources = getattr(r.data, which)
        need(sources != [], f"data.{which}", "a source or a non-empty list of sources")
        for i, source in enumerate(sources if isinstance(sources, list) else []):
            need(source.path, f"data.{which}[{i}].path", "a file, hub id or tiny:* source")
            need(source.weight > 0, f"data.{which}[{i}].weight", "a value > 0")
            need(
                source.format in (None, "auto", *FORMATS),
                f"data.{which}[{i}].format",
                f"one of {['auto', *FORMATS]} or null",
            )
    need(r.data.format in ("auto", *FORMATS), "data.format", f"one of {['auto', *FORMATS]}")
    need(r.data.sample is None or r.data.sample >= 1, "data.sample", "an integer >= 1 or null")
    need(
        r.data.sample is None or not isinstance(r.data.train, list),
        "data.sample",
        "null with a list of data.train sources (a fractional weight draws a share of one)",
    )
    packers = [name for name, k in TASKS.items() if k.supports_packing]
    need(
        not r.data.packing or kind.supports_packing,
        "data.packing",
        f"false for model.task={r.model.task} (packing is for {', '.join(packers)})",
    )
    check_token_budget(r, kind, need)
    need(
        not kind.needs_num_labels or r.model.num_labels,
        "model.num_labels",
        f"the number of classes for model.task={r.model.task}",
    )


def check_token_budget(r: Recipe, kind, need) -> None:
    """train.micro_batch_tokens: budgets group causal-LM samples that packing then puts in
    rows of the budget, and a sample of data.max_length tokens must fit in one."""
    tokens = r.train.micro_batch_tokens
    if tokens is None:
        return
    key = "train.micro_batch_tokens"
    need(kind.supports_packing, key, f"null for model.task={r.model.task} (a token budget is for packed causal_lm)")
    need(r.data.packing, key, "null without data.packing=true (token-budget micro-batches are packed)")
    need(
        tokens >= r.data.max_length,
        key,
        f">= data.max_length ({r.data.max_length}), so that a sample of max_length tokens fits",
    )
    need(
        r.pace.mode != "lazy_half",
        key,
        "null with pace.mode=lazy_half (it halves a micro-batch by packed rows, and a token-budget "
        "micro-batch is one row; use train.micro_batch_size, or pace.mode=full)",
    )


def loss_normalization(r: Recipe) -> str:
    """train.loss_normalization with its default filled in: step when packing (token budgets
    included), else micro_batch."""
    packed = r.data.packing or r.train.micro_batch_tokens is not None
    return r.train.loss_normalization or ("step" if packed else "micro_batch")


def eval_key(r: Recipe, key: str):
    node = r
    for part in key.split("."):
        name, *index = re.split(r"[\[\]]", part)  # data.train[1].weight
        node = getattr(node, name)
        if index:
            node = node[int(index[0])]
    return node


def to_dict(r: Recipe) -> dict:
    return dataclasses.asdict(r)
