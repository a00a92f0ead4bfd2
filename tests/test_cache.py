"""The PACE_fast output store and its rank-local sampler, including 2 real gloo ranks."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pace_llm import OutputCache, ShardedEpochSampler
from pace_llm.distributed.launcher import free_port as _free_port

BF16 = torch.bfloat16


def values_for(sample_id, rows, dim, epoch=0):
    """A deterministic, sample- and epoch-specific block of values (exact in bf16)."""
    base = torch.arange(rows * dim, dtype=torch.float32).view(rows, dim)
    return (base / 8 + sample_id * 100 + epoch * 1000).to(BF16)


def test_round_trip_is_exact_and_sized_by_rows():
    counts, dim = [3, 1, 4, 2], 5
    cache = OutputCache(counts, dim)
    assert cache.path is None  # small: in memory
    assert cache.nbytes == sum(counts) * dim * 2
    out, has = cache.read([0, 1, 2, 3])
    assert out.shape == (10, dim) and out.dtype == BF16 and not has.any()  # never written

    g = torch.Generator().manual_seed(0)
    written = {i: torch.randn(n, dim, generator=g) for i, n in enumerate(counts)}
    cache.write([2, 0], torch.cat([written[2], written[0]]))
    out, has = cache.read([0, 1, 2, 3])
    assert has.tolist() == [True] * 3 + [False] + [True] * 4 + [False] * 2  # per row
    assert torch.equal(out[:3], written[0].to(BF16))
    assert torch.equal(out[4:8], written[2].to(BF16))
    # rows come back in the order of the requested ids
    out, has = cache.read([2, 0])
    assert has.all() and torch.equal(out, torch.cat([written[2], written[0]]).to(BF16))
    # bf16 values written are read back bit for bit; overwrite replaces
    exact = values_for(1, 1, dim)
    cache.write([1], exact)
    cache.write([0], exact.expand(3, dim).float() * 2)
    out, has = cache.read([1, 0])
    assert torch.equal(out[0:1], exact) and torch.equal(out[1:], (exact.expand(3, dim).float() * 2).to(BF16))
    assert has.all()


def test_sample_ids_of_a_shard_and_bad_input():
    cache = OutputCache([2, 1, 3], 4, sample_ids=[10, 4, 7])
    cache.write([7], torch.ones(3, 4))
    out, has = cache.read([4, 7, 10])
    assert has.tolist() == [False, True, True, True, False, False]
    assert torch.equal(out[1:4], torch.ones(3, 4, dtype=BF16))
    with pytest.raises(ValueError):
        cache.write([7], torch.ones(2, 4))  # wrong number of rows for the sample
    with pytest.raises(ValueError):
        cache.write([7], torch.ones(3, 5))  # wrong dim
    with pytest.raises(ValueError):
        cache.write([4, 7], torch.ones(3, 4))  # 1 + 3 rows expected
    with pytest.raises(KeyError):
        cache.read([5])  # not in this shard
    with pytest.raises(KeyError):
        cache.read([11])  # beyond every id
    with pytest.raises(ValueError):
        OutputCache([1, 2], 4, sample_ids=[0])


def test_memory_mapped_mode(tmp_path):
    counts, dim = [2, 3, 1], 8
    cache = OutputCache(counts, dim, memory_budget_bytes=10, disk_dir=str(tmp_path))
    assert cache.path is not None and os.path.dirname(cache.path) == str(tmp_path)
    # unlinked at once: a killed run leaves no file; the open descriptor keeps it, full size
    assert os.listdir(tmp_path) == [] and os.fstat(cache._fd).st_size == cache.nbytes == sum(counts) * dim * 2
    assert not cache.read([0, 1, 2])[1].any()
    blocks = [values_for(i, n, dim) for i, n in enumerate(counts)]
    cache.write([1, 2, 0], torch.cat([blocks[1], blocks[2], blocks[0]]))
    out, has = cache.read([0, 1, 2])
    assert has.all() and torch.equal(out, torch.cat(blocks))
    # the values live in the file itself
    on_disk = torch.frombuffer(bytearray(os.pread(cache._fd, cache.nbytes, 0)), dtype=BF16)
    assert torch.equal(on_disk.view(-1, dim), torch.cat(blocks))
    assert cache.state_dict()["values"].data_ptr() == cache.values.data_ptr()  # checkpointed without a RAM copy
    cache.close()
    cache.close()  # idempotent
    in_memory = OutputCache(counts, dim, memory_budget_bytes=sum(counts) * dim * 2, disk_dir=str(tmp_path))
    assert in_memory.path is None  # exactly at the budget: stays in memory
    assert os.listdir(tmp_path) == []


def test_state_dict_restores_every_rank_across_world_sizes():
    n, dim = 11, 3
    counts = [1 + (i % 4) for i in range(n)]  # variable rows per sample

    def shard_cache(rank, world):
        ids = list(range(rank, n, world))
        return OutputCache([counts[i] for i in ids], dim, sample_ids=ids)

    saved = [shard_cache(r, 2) for r in range(2)]
    written = {i for i in range(n) if i % 3 != 1}  # some samples never seen
    for cache in saved:
        for i in cache.sample_ids.tolist():
            if i in written:
                cache.write([i], values_for(i, counts[i], dim))
    states = [c.state_dict() for c in saved]
    saved[0].write([0], values_for(0, counts[0], dim, epoch=9))  # state_dict is a snapshot
    assert torch.equal(states[0]["values"][: counts[0]], values_for(0, counts[0], dim))

    for rank in range(3):
        cache = shard_cache(rank, 3)
        copied = sum(cache.load_state_dict(s) for s in states)
        mine = cache.sample_ids.tolist()
        assert copied == len([i for i in mine if i in written])
        out, has = cache.read(mine)
        offset = 0
        for i in mine:
            block, got = out[offset : offset + counts[i]], has[offset : offset + counts[i]]
            offset += counts[i]
            if i in written:
                assert got.all() and torch.equal(block, values_for(i, counts[i], dim)), i
            else:
                assert not got.any(), i
    with pytest.raises(ValueError):
        OutputCache([1], dim + 1).load_state_dict(states[0])


def test_sharded_sampler_single_process():
    n, world = 11, 2
    seen = []
    for rank in range(world):
        s = ShardedEpochSampler(n, rank, world, seed=3)
        assert len(s) == 6
        e0 = list(s)
        s.set_epoch(1)
        e1 = list(s)
        assert len(e0) == len(e1) == 6
        assert set(e0) == set(e1) == set(range(rank, n, world))  # a sample never changes rank
        seen += e0
    assert set(seen) == set(range(n))
    unshuffled = ShardedEpochSampler(n, 1, world, shuffle=False)
    assert list(unshuffled) == [1, 3, 5, 7, 9, 1]  # padded with its own samples
    with pytest.raises(ValueError):
        ShardedEpochSampler(1, 0, 2)


# --- data parallelism with 2 real ranks -----------------------------------------------

N_SAMPLES, DIM = 11, 4


def rows_of(i):
    return 1 + i % 3


def _dp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sampler = ShardedEpochSampler(N_SAMPLES, rank, world, seed=0, shuffle=True)
        shard = sampler.shard
        cache = OutputCache([rows_of(i) for i in shard], DIM, sample_ids=shard)
        orders, mismatches, missing = [], [], []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            order = list(sampler)
            orders.append(order)
            visited = set()
            for i in order:  # one sample per step, as a data loader with batch size 1 would
                target, has = cache.read([i])
                # first visit: last epoch's value; a padding repeat: this epoch's first visit
                source = epoch if i in visited else epoch - 1
                visited.add(i)
                if source >= 0:
                    if not has.all():
                        missing.append(i)
                    elif not torch.equal(target, values_for(i, rows_of(i), DIM, source)):
                        mismatches.append(i)
                elif has.any():
                    missing.append(-1 - i)  # epoch 0, first visit: must have no target
                cache.write([i], values_for(i, rows_of(i), DIM, epoch))
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "orders": orders, "mismatches": mismatches, "missing": missing})
        if rank == 0:
            with open(os.path.join(out_dir, "dp.json"), "w") as f:
                json.dump(gathered, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_read_their_own_previous_epoch(tmp_path):
    mp.spawn(_dp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = json.loads((tmp_path / "dp.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["missing"] == [] and r["mismatches"] == []  # every target = that id's epoch-0 value
    for epoch in (0, 1):
        union = [i for r in ranks for i in r["orders"][epoch]]
        assert set(union) == set(range(N_SAMPLES))
        assert len(union) == 2 * 6  # equal lengths per rank (11 is odd: one repeat)
        assert not set(ranks[0]["orders"][epoch]) & set(ranks[1]["orders"][epoch])
    assert [r["orders"][0] for r in ranks] != [r["orders"][1] for r in ranks]  # reshuffled
