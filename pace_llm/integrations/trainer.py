"""PACE inside `transformers.Trainer`: `PaceTrainer` (and the mixin PaceSFTTrainer shares).

    trainer = PaceTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                          pace=PaceArguments(mode="full", lam=3.0, sigma=0.5))
    trainer.train()
    trainer.save_model("adapter")          # a PEFT adapter (+ pace_config.json)
    merged = trainer.merge_pace()          # a plain transformers model

What the mixin changes in the Trainer, and nothing else:
  - the model: PACE-LoRA applied (apply_pace), or PACE's noise added to the LoRA of a
    model that already is a PeftModel (built by the user or from TRL's `peft_config`);
  - the training loss: PaceObjective (pace_llm/core/objectives.py) on the batch, its paired
    dropout held across forward and backward (training_step); evaluation keeps the parent's
    loss, in eval mode, without noise;
  - padding-free batches (position_ids restarting at every sample, no attention_mask: TRL's
    padding_free and packing) are read into pace_llm.core.packing's layout before the step, so
    the noise is one draw per sample even inside a row, also in a checkpointed recompute;
  - logging: `task_loss` and `consistency_loss` (means over the logging window and the
    ranks) join the Trainer's own `loss` row, so every `report_to` target gets them;
  - PACE_fast: `sample_id` added to the training set, a ShardedEpochSampler that keeps
    each sample on one rank (accelerate's per-rank split is turned off for it), the
    OutputCache sized from the training set, its state saved in every checkpoint folder
    (pace_cache_rank{r}.pt) and restored by `train(resume_from_checkpoint=...)`. A row TRL
    packed holds several samples: the cache has an entry per sample (first_sample_keys).

A causal LM's rows (TokenOutputs) run the decoder on the unwrapped model, which bypasses
DDP's forward, and with it DDP's gradient hooks: under DDP the trainer averages the
(LoRA-only) gradients itself at each synchronising step. DeepSpeed reduces gradients
through its own hooks and needs nothing.

CPU: with DeepSpeed, create accelerate's state with the gloo backend before the
Trainer (`cpu_distributed_state()`), else DeepSpeed miscounts the processes.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
import transformers
from torch.utils.data import Dataset

from pace_llm.core.adapters import add_lora_noise, apply_pace, merge_pace
from pace_llm.core.cache import OutputCache, ShardedEpochSampler, build_output_cache
from pace_llm.core.objectives import PaceObjective, fast_epochs_warning
from pace_llm.core.outputs import TokenOutputs, outputs_for_model
from pace_llm.core.pace_config import PaceConfig
from pace_llm.core.packing import from_position_ids, is_packed
from pace_llm.distributed.process_group import skip_deepspeed_shm_allreduce
from pace_llm.export import PACE_CONFIG
from pace_llm.integrations.arguments import PaceArguments

log = logging.getLogger("pace_llm.integrations")
CACHE_FILE = "pace_cache_rank{rank}.pt"


def cpu_distributed_state():
    """accelerate's process state on the gloo backend, for CPU runs under torchrun/deepspeed.
    Call it before building TrainingArguments' Trainer; a no-op in a single process. It also
    keeps DeepSpeed from building its CPU shared-memory all-reduce, which leaks /dev/shm
    (process_group.skip_deepspeed_shm_allreduce)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        from accelerate import PartialState

        skip_deepspeed_shm_allreduce()
        return PartialState(backend="gloo")
    return None


class _WithSampleIds(Dataset):
    """A map-style dataset whose items gain `sample_id` (their index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "sample_id": i}


def with_sample_ids(dataset):
    if "sample_id" in getattr(dataset, "column_names", ()):
        return dataset
    if hasattr(dataset, "add_column"):  # datasets.Dataset
        return dataset.add_column("sample_id", list(range(len(dataset))))
    return _WithSampleIds(dataset)


class _KeepSampleIds:
    """Wraps a data collator: `sample_id` bypasses it (TRL's collator drops unknown keys)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        if "sample_id" not in examples[0]:  # an evaluation set
            return self.collator(examples)
        ids = [e["sample_id"] for e in examples]
        batch = self.collator([{k: v for k, v in e.items() if k != "sample_id"} for e in examples])
        batch["sample_id"] = torch.tensor(ids, dtype=torch.long)
        return batch


def first_sample_keys(dataset) -> Optional[torch.Tensor]:
    """PACE_fast cache keys of a dataset TRL packed: its `seq_lengths` column lists the samples
    in each row, and row i's samples get keys first[i] .. first[i+1]-1, numbered once over the
    dataset. TRL packs the dataset once, so a row and its samples keep their keys across epochs
    and resumes. None for a dataset of single samples (the key is the item's index)."""
    if "seq_lengths" not in getattr(dataset, "column_names", ()):
        return None
    per_row = torch.tensor([len(lengths) for lengths in dataset["seq_lengths"]], dtype=torch.long)
    return torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])


def _is_peft(model) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


class PaceMixin:
    """The PACE parts of PaceTrainer / PaceSFTTrainer; see the module docstring."""

    pace: PaceConfig

    def _pace_init(self, parent_init, model, args, kwargs, pace: Optional[PaceConfig]):
        self.pace = pace if pace is not None else PaceArguments()
        if not isinstance(self.pace, PaceConfig):
            raise TypeError(f"pace= takes a PaceArguments / PaceConfig, got {type(self.pace).__name__}")
        if (
            isinstance(model, torch.nn.Module)
            and not _is_peft(model)
            and kwargs.get("peft_config") is None
            and not hasattr(model, "pace_config")
        ):
            model = apply_pace(model, self.pace)
        parent_init(model=model, args=args, **kwargs)
        if not hasattr(self.model, "pace_config"):  # a LoRA someone else built, or a model id TRL loaded
            if _is_peft(self.model):
                add_lora_noise(self.model, self.pace)
            else:
                self.model = self.model_wrapped = apply_pace(self.model, self.pace)
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides by the GA steps
        self._pace_outputs = outputs_for_model(self.model)
        self._pace_window = torch.zeros(3)  # sums of task loss, consistency, micro-steps since the last log
        self.pace_cache = self._pace_first_keys = None
        if self.pace.mode == "fast":
            if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
                raise ValueError("pace.mode=fast needs a map-style train_dataset (a per-sample cache)")
            self.train_dataset = with_sample_ids(self.train_dataset)
            self.data_collator = _KeepSampleIds(self.data_collator)
            self._pace_first_keys = first_sample_keys(self.train_dataset)
            self.pace_cache = self._build_cache()
            epochs = self.args.num_train_epochs if self.args.max_steps <= 0 else None
            if epochs is not None and self.args.process_index == 0 and (warning := fast_epochs_warning(epochs)):
                log.warning(warning)
        self.pace_objective = PaceObjective.from_config(self.pace, self.pace_cache, self._pace_outputs)

    # --- data ----------------------------------------------------------------------------
    def _shard(self) -> ShardedEpochSampler:
        return ShardedEpochSampler(
            len(self.train_dataset), self.args.process_index, self.args.world_size, seed=self.args.seed
        )

    def _samples(self, i: int, example: dict):
        """(cache key, labels) of each sample in dataset item i: the item, or each sample of a row
        TRL packed, whose first label the padding-free batch masks (output_count skips it too)."""
        labels = example.get("labels")
        if labels is None and isinstance(self._pace_outputs, TokenOutputs):  # TRL: labels = input_ids
            labels = example["input_ids"]
        if self._pace_first_keys is None:
            return [(i, labels)]
        starts = [0, *itertools.accumulate(example["seq_lengths"])]
        return [(int(self._pace_first_keys[i]) + k, labels[a:b]) for k, (a, b) in enumerate(zip(starts, starts[1:]))]

    def _build_cache(self) -> OutputCache:
        def samples():  # (cache key, sample) of every sample in this rank's shard of the dataset
            for i in self._shard().shard:
                example = self.train_dataset[i]
                for key, labels in self._samples(i, example):
                    yield key, {**example, "labels": labels}

        return build_output_cache(
            self._pace_outputs,
            samples(),
            self.model,
            self.args.process_index,
            self.pace.cache_memory_gb,
            disk_dir=self.args.output_dir if os.path.isdir(self.args.output_dir) else None,
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.pace.mode == "fast" and "sample_id" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "sample_id"]

    def _get_train_sampler(self, train_dataset=None):
        if self.pace.mode != "fast":
            return super()._get_train_sampler(train_dataset)
        sampler = self._shard()
        # A mid-epoch resume iterates accelerate's skip-wrapper, whose set_epoch does not reach
        # this sampler: it starts at the checkpoint's epoch (trainer_state.json), as the Trainer
        # does; later epochs get set_epoch through the plain loader.
        sampler.set_epoch(getattr(self, "_pace_resume_epoch", 0))
        return sampler

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self.pace.mode == "fast":  # the sampler is rank-aware: accelerate must not split it again
            sharded = getattr(loader, "batch_sampler", None)
            if hasattr(sharded, "num_processes"):
                sharded.num_processes, sharded.process_index = 1, 0
        return loader

    # --- loss ----------------------------------------------------------------------------
    def _packed(self, inputs: dict) -> dict:
        """A padding-free batch (position_ids restarting at every sample, no attention_mask: TRL's
        padding_free and packing) in pace_llm.core.packing's layout, so PACE sees its samples: noise
        per sample, rows counted per sample, [x; x] copies as new samples. PACE_fast's batch
        names dataset items (sample_id): their samples' cache keys take its place."""
        if "position_ids" not in inputs or "attention_mask" in inputs or is_packed(inputs):
            return inputs
        keys = inputs.get("sample_id")
        if keys is not None and self._pace_first_keys is not None:
            first = self._pace_first_keys
            keys = torch.cat([torch.arange(first[i], first[i + 1]) for i in keys.tolist()]).to(keys.device)
        return from_position_ids(inputs, keys)

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = self._packed(inputs)
        # paired dropout and per-sample noise of packed rows, through the (checkpointed) backward
        with self.pace_objective.scope(self.state.global_step, inputs):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if (
            isinstance(model, torch.nn.parallel.DistributedDataParallel)
            and self.accelerator.sync_gradients
            and isinstance(self._pace_outputs, TokenOutputs)
        ):
            self._average_gradients()
        return loss

    def _average_gradients(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or return_outputs:  # evaluation: the parent's loss, no noise
            inputs = {k: v for k, v in inputs.items() if k != "sample_id"}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        out = self.pace_objective(model, inputs, self.state.global_step)
        self._pace_window += torch.tensor([out.task_loss.item(), out.consistency_loss.item(), 1.0])
        return out.loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs and self._pace_window[2] > 0:  # a training row: every rank is here
            window = self._pace_window.to(self.args.device)
            if dist.is_initialized():
                dist.all_reduce(window)
            logs["task_loss"] = round(float(window[0] / window[2]), 6)
            logs["consistency_loss"] = round(float(window[1] / window[2]), 6)
            self._pace_window.zero_()
        return super().log(logs, *args, **kwargs)

    # --- checkpoints and outputs -----------------------------------------------------------
    def _save_rng_state(self, output_dir: str) -> None:
        """The PACE_fast cache goes into the checkpoint with the RNG states, on every rank, before
        transformers rotates old checkpoints away: a crash after the rotation must not leave the
        newest checkpoint without its cache."""
        super()._save_rng_state(output_dir)
        if self.pace_cache is not None:
            os.makedirs(output_dir, exist_ok=True)
            path = os.path.join(output_dir, CACHE_FILE.format(rank=self.args.process_index))
            torch.save(self.pace_cache.state_dict(), path)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir}")
        if self.pace_cache is not None and resume_from_checkpoint:
            self._load_cache(resume_from_checkpoint)
            saved = transformers.TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            self._pace_resume_epoch = int(saved.epoch or 0)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_cache(self, checkpoint: str) -> None:
        """Every rank reads every saved shard and keeps its own samples (any world size)."""
        files = sorted(glob.glob(os.path.join(checkpoint, CACHE_FILE.format(rank="*"))))
        if not files:
            raise FileNotFoundError(
                f"{checkpoint} holds no PACE_fast cache ({CACHE_FILE.format(rank='*')}): "
                "was it written by a PaceTrainer in mode fast?"
            )
        copied = sum(self.pace_cache.load_state_dict(torch.load(f, weights_only=True)) for f in files)
        log.info("PACE_fast cache: %d entries restored from %s", copied, checkpoint)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        with open(os.path.join(output_dir, PACE_CONFIG), "w") as f:
            json.dump(dataclasses.asdict(self.pace), f, indent=2)

    def merge_pace(self):
        """The trained model with its adapters merged (fp32 merge, cast back): a plain
        transformers model. Modifies the trainer's model: call it after training and saving."""
        if (
            getattr(self.accelerator.state, "deepspeed_plugin", None) is not None
            and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            raise RuntimeError(
                "merge_pace under ZeRO-3: save_model, then merge from the saved adapter "
                "(pace_llm.export.load_adapter + merge_pace) on an unpartitioned base"
            )
        return merge_pace(self.accelerator.unwrap_model(self.model))

    def close_pace(self) -> None:
        if self.pace_cache is not None:
            self.pace_cache.close()


class PaceTrainer(PaceMixin, transformers.Trainer):
    """`transformers.Trainer` plus `pace=PaceArguments(...)`; see the module docstring."""

    def __init__(self, model=None, args=None, *, pace: Optional[PaceConfig] = None, **kwargs):
        self._pace_init(super().__init__, model, args, kwargs, pace)


__all__ = ["PaceTrainer", "PaceMixin", "cpu_distributed_state"]
