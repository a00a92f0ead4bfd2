"""The PACE_fast output store (paper App. C) and the sampler that keeps it rank-local.

PACE_fast's consistency target for a sample is its own noisy output from the previous
epoch. The store keeps, per sample id, a block of rows × dim values in bf16:
  - classifiers: one row, the logits;
  - causal LMs: one row per supervised token, the final hidden state h. With a frozen
    bias-free lm_head W the logits are W·h, so h determines them exactly at d/V of the
    size (Phi-3: 3,072 vs 32,064 per token). If the head trains, store logits instead.
An entry that was never written has no target (`read` says so): no zero targets.

Data parallelism: `ShardedEpochSampler` gives every rank a fixed shard of the sample ids
(reshuffled within the shard each epoch), so each rank's store holds only its own samples
and needs no communication. `state_dict` carries the ids, so a resume, even with another
world size, restores every rank's entries from all saved shards.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import tempfile
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

DTYPE = torch.bfloat16  # the default; OutputCache(dtype=torch.float32) keeps targets unrounded
_RAW = {2: torch.int16, 4: torch.int32}  # same-size integer views for os.pwrite
log = logging.getLogger(__name__)


class OutputCache:
    def __init__(
        self,
        row_counts: Sequence[int],
        dim: int,
        sample_ids: Optional[Sequence[int]] = None,
        memory_budget_bytes: int = 2 << 30,
        disk_dir: Optional[str] = None,
        dtype: torch.dtype = DTYPE,
    ):
        self.dtype = dtype
        ids = torch.as_tensor(
            list(range(len(row_counts))) if sample_ids is None else list(sample_ids), dtype=torch.long
        )
        if len(ids) != len(row_counts):
            raise ValueError(f"{len(ids)} sample ids but {len(row_counts)} row counts")
        self.sample_ids = ids
        self.row_counts = torch.as_tensor(list(row_counts), dtype=torch.long)
        self.offsets = torch.cumsum(self.row_counts, 0) - self.row_counts
        self.dim = int(dim)
        self.slot_of = torch.full((int(ids.max()) + 1 if len(ids) else 0,), -1, dtype=torch.long)
        self.slot_of[ids] = torch.arange(len(ids))
        self.filled = torch.zeros(len(ids), dtype=torch.bool)
        total = int(self.row_counts.sum()) * self.dim
        self.path = None
        if total * dtype.itemsize > memory_budget_bytes:  # memory-mapped file on disk
            fd, self.path = tempfile.mkstemp(prefix="pace_cache_", suffix=".bin", dir=disk_dir)
            try:  # disk blocks reserved now: a full disk fails here, and first writes are faster
                os.posix_fallocate(fd, 0, total * dtype.itemsize)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    os.remove(self.path)
                    raise
                os.ftruncate(fd, total * dtype.itemsize)  # no fallocate here: a sparse file
            os.close(fd)
            flat = torch.from_file(self.path, shared=True, size=total, dtype=dtype)
            # writes go through this descriptor (os.pwrite) into the page cache the mapping
            # reads from, not first-touch writes through the mapping (slower: BENCHMARKS.md §2)
            self._fd = os.open(self.path, os.O_RDWR)
            # the mapping and the descriptor keep the file alive: unlinked now, a killed run
            # (SIGKILL, OOM) leaves no cache file behind, and its disk space returns with the process
            os.unlink(self.path)
        else:
            flat = torch.zeros(total, dtype=dtype)
        self.values = flat.view(-1, self.dim)

    @property
    def nbytes(self) -> int:
        """Bytes of stored outputs (rows × dim × 2); the id/offset tables are O(samples)."""
        return self.values.numel() * self.values.element_size()

    def _spans(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(slots, [(first row, row count)] per sample): each sample's rows are contiguous."""
        sample_ids = torch.as_tensor(sample_ids, dtype=torch.long).cpu()
        if len(sample_ids) and (sample_ids.max() >= len(self.slot_of) or (self.slot_of[sample_ids] < 0).any()):
            raise KeyError(f"sample ids {sample_ids.tolist()} are not all in this cache's shard")
        slots = self.slot_of[sample_ids]
        return slots, list(zip(self.offsets[slots].tolist(), self.row_counts[slots].tolist()))

    # read / write copy each sample's contiguous block (memcpy) rather than index row by row
    # (several times faster: BENCHMARKS.md §2)
    def read(self, sample_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets [rows, dim] in bf16, has_target [rows] bool), rows in sample-id order."""
        slots, spans = self._spans(sample_ids)
        filled = self.filled[slots].tolist()
        has = torch.repeat_interleave(self.filled[slots], self.row_counts[slots])
        if not spans:
            return self.values[:0].clone(), has
        # never-written entries are not read: on a memory-mapped file they are holes, and
        # touching them costs a page fault per 4 KiB
        return torch.cat(
            [self.values[o : o + n] if f else self.values.new_zeros(n, self.dim) for (o, n), f in zip(spans, filled)]
        ), has

    def write(self, sample_ids, outputs: torch.Tensor) -> None:
        slots, spans = self._spans(sample_ids)
        total = sum(n for _, n in spans)
        if outputs.shape != (total, self.dim):
            raise ValueError(
                f"cache write of shape {tuple(outputs.shape)}, expected {(total, self.dim)}: "
                "the rows per sample changed since the cache was sized (max_length? data?)"
            )
        outputs = outputs.detach().to("cpu", self.dtype).contiguous()
        start = 0
        raw = outputs.view(_RAW[self.dtype.itemsize]).numpy() if self.path else None
        for o, n in spans:
            if raw is not None:  # the file: pwrite, not page faults through the mapping
                data, offset = memoryview(raw[start : start + n]).cast("B"), o * self.dim * self.dtype.itemsize
                while len(data):
                    written = os.pwrite(self._fd, data, offset)
                    data, offset = data[written:], offset + written
            else:
                self.values[o : o + n].copy_(outputs[start : start + n])
            start += n
        self.filled[slots] = True

    def clear(self) -> None:
        """Forget every entry (a resume that falls back to an older checkpoint reloads them)."""
        self.filled.zero_()

    def state_dict(self) -> dict:
        return {
            "sample_ids": self.sample_ids,
            "row_counts": self.row_counts,
            "dim": self.dim,
            "filled": self.filled,
            # the file-backed store is not copied into RAM (it lives on disk because it did not fit);
            # torch.save reads it through the mapping
            "values": self.values if self.path else self.values.clone(),
        }

    def load_state_dict(self, state: dict) -> int:
        """Copy the entries of `state` (from any shard) whose ids this cache holds; returns how many."""
        if state["dim"] != self.dim:
            raise ValueError(f"cache dim {state['dim']} in the checkpoint, {self.dim} here")
        offsets = (torch.cumsum(state["row_counts"], 0) - state["row_counts"]).tolist()
        copied = 0
        for slot, sid in enumerate(state["sample_ids"].tolist()):
            if state["filled"][slot] and sid < len(self.slot_of) and self.slot_of[sid] >= 0:
                start, count = offsets[slot], int(state["row_counts"][slot])
                self.write([sid], state["values"][start : start + count])
                copied += 1
        return copied

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if self.path and os.path.exists(self.path):
            os.remove(self.path)


def build_output_cache(
    outputs, samples: Iterable[tuple[int, dict]], model, rank: int, memory_gb: float, disk_dir: Optional[str] = None
) -> OutputCache:
    """The PACE_fast store of one rank's samples, as the Trainer and PaceTrainer both build it.

    `outputs`: the task's Outputs kind (TokenOutputs, SampleOutputs), which says how many
    rows a sample stores (`output_count`, from its labels) and how wide a row is
    (`cache_dim` of `model`); `samples`: (sample id, encoded sample) of each sample this
    rank trains on (its ShardedEpochSampler shard). Beyond `memory_gb` the values live in a
    file in `disk_dir` (the system's temporary folder when None)."""
    ids, counts = [], []
    for sample_id, sample in samples:
        ids.append(int(sample_id))
        counts.append(outputs.output_count(sample))
    cache = OutputCache(
        counts, outputs.cache_dim(model), sample_ids=ids, disk_dir=disk_dir, memory_budget_bytes=int(memory_gb * 2**30)
    )
    log.info("PACE_fast cache: %d samples on rank %d, %.1f MiB", len(ids), rank, cache.nbytes / 2**20)
    return cache


class ShardedEpochSampler(Sampler[int]):
    """Rank r always gets the samples r, r+W, r+2W, ... (padded by repeating its own
    samples to equal length), in a new order each epoch (seed + epoch).

    Unlike DistributedSampler, a sample never moves to another rank, so a rank-local
    PACE_fast cache always holds the target for every sample its rank will see.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be spread over {world_size} ranks")
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.shard = list(range(rank, num_samples, world_size))
        self.length = math.ceil(num_samples / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def order(self, epoch: int) -> list[int]:
        """This rank's shard in `epoch`'s order, each sample once (no padding repeats): what
        the token-budget batches (core/token_batches.py) group."""
        if not self.shuffle:
            return list(self.shard)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return [self.shard[i] for i in torch.randperm(len(self.shard), generator=g).tolist()]

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        order += order[: self.length - len(order)]
        return iter(order)
