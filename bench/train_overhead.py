"""Training step time and peak memory of PACE's modes against plain LoRA through PEFT alone.

    python bench/train_overhead.py                       # SmolLM2-135M-Instruct, CPU, fp32 (~7 min)
    python bench/train_overhead.py --model tiny          # a tiny Llama from a config (seconds)
    python bench/train_overhead.py --model PATH --device cuda --dtype bf16 --batch 4 --seq-len 512
    python bench/train_overhead.py --deepspeed 2         # 2 ranks (OMP_NUM_THREADS=1 deepspeed
    python bench/train_overhead.py --deepspeed 3         #   --num_gpus 2 ...), ZeRO-2 / ZeRO-3
    python bench/train_overhead.py --smoke               # tiny model, a few steps (the test)

Variants, all on the same base weights, LoRA targets, rank and batch:
  peft       peft.get_peft_model + `model(**inputs, labels=labels, use_cache=False).loss`: what
             one would write instead of pace-llm (HF's loss computes logits at every position)
  off        pace_llm.apply_pace(σ=0) + PaceObjective("off"): our loop without PACE
  noise      σ>0 + PaceObjective("off"): PACE's noise alone, no consistency term (what
             fast costs beyond it is the cache and the consistency term); the noise fused
             into PEFT's LoRA forward (pace_llm/core/noisy_lora.py)
  noise_hook noise as a forward hook on each lora_B, as before the fusion: the before/after
  fast       σ>0 + PaceObjective("fast") with an OutputCache (filled during warm-up)
  fast_nogram  fast with the consistency computed as ‖W(h − h_o)‖² through the lm_head, as
             before the WᵀW form (PaceObjective(head_gram=False)): the fix, measured
  lazy_half  σ>0 + PaceObjective("lazy_half", lazy_every=2): time is the mean over a cycle
  full       σ>0 + PaceObjective("full"): one forward on [x; x]
  X_compiled with --compile (peft, off, noise, full, fast): X with each transformer block
             compiled as train.compile does (pace_llm/training/compile.py); compilation
             happens in the untimed warm-up

Step = forward + loss + backward + AdamW step + zero_grad. Timing is interleaved: in each
round every variant runs `--steps` steps, the order rotates from round to round, a round's
time per step is the mean over its steps, and the ratio column is the median over rounds of
(variant / peft in that round). Peak memory: each variant in a fresh subprocess; CPU: peak
RSS (VmHWM, reset through /proc/self/clear_refs after the model is loaded) during warm-up and
steps, reported as the total and as the increase over the RSS before the first step; CUDA:
torch.cuda.max_memory_allocated. Under --deepspeed the same variants run once as plain
per-rank loops (no engine, no communication) and once inside a ZeRO-N engine, interleaved,
so both ratio columns come from the same run; memory is not measured there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import common  # bench/common.py: this script's folder is first on sys.path

VARIANTS = ["peft", "off", "noise", "noise_hook", "fast", "fast_nogram", "lazy_half", "full"]
COMPILED = ["peft_compiled", "off_compiled", "noise_compiled", "full_compiled", "fast_compiled"]  # --compile
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--model", default="smollm2", help="tiny | smollm2 | a causal-LM folder")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample (prompt + answer)")
    p.add_argument("--answer-len", type=int, default=None, help="supervised tokens (default: half)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round (even)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--compile", action="store_true", help="add the compiled variants (" + ", ".join(COMPILED) + ")")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-steps", type=int, default=2, help="steps after warm-up in a memory run")
    p.add_argument("--deepspeed", type=int, default=0, choices=[0, 2, 3], help="ZeRO stage, 2 ranks")
    common.add_run_args(p, threads_default=None, smoke_help="tiny model, 2 rounds of 2 steps")  # None: 1 on CPU
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.rounds, args.steps, args.seq_len, args.memory_steps = "tiny", 2, 2, 32, 1
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.answer_len is None:
        args.answer_len = args.seq_len // 2
    if not 0 < args.answer_len < args.seq_len:
        p.error("--answer-len must be in 1..seq-len-1")
    if args.steps % 2:
        p.error("--steps must be even (lazy_half alternates paired and plain steps)")
    args.variants = [v for v in args.variants.split(",") if v]
    if args.compile:
        args.variants += [v for v in COMPILED if v not in args.variants]
    bad = [v for v in args.variants if v not in VARIANTS + COMPILED]
    if bad or "peft" not in args.variants:
        p.error(f"--variants must include peft and come from {VARIANTS + COMPILED}")
    if args.name is None:
        label = Path(args.model).name if args.model not in ("tiny", "smollm2") else args.model
        args.name = (
            f"train_overhead_{label}_{args.device}_{args.dtype}"
            + (f"_zero{args.deepspeed}" if args.deepspeed else "")
            + ("_smoke" if args.smoke else "")
        )
    return args


# --------------------------------------------------------------------------- building


def model_source(spec: str):
    if spec == "tiny":
        return None
    if spec == "smollm2":
        from pace_llm.assets import smollm2_dir

        return smollm2_dir()
    return spec


def load_model(args):
    import torch
    import transformers

    dtype = getattr(torch, DTYPES[args.dtype])
    source = model_source(args.model)
    torch.manual_seed(0)
    if source is None:
        from pace_llm.assets.tiny import tiny_config

        model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if args.device == "cuda" and not any(getattr(p, "ds_id", None) is not None for p in model.parameters()):
        model = model.to("cuda")
    return model


def make_data(args, vocab: int, n_samples: int, id_offset: int = 0, id_stride: int = 1):
    """n_samples fixed rows: random ids, the last answer_len positions supervised."""
    import torch

    g = torch.Generator().manual_seed(1234 + id_offset)
    ids = torch.randint(3, vocab, (n_samples, args.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : args.seq_len - args.answer_len] = -100
    sample_ids = torch.arange(n_samples) * id_stride + id_offset
    return ids, labels, sample_ids


def batches(args, data, device):
    """An endless cycle of batches over the rows, in a fixed order (an epoch = n/B steps)."""
    import torch

    ids, labels, sample_ids = data
    n = len(ids)
    step = 0
    while True:
        sel = torch.arange(step * args.batch, (step + 1) * args.batch) % n
        yield {
            "input_ids": ids[sel].to(device),
            "attention_mask": torch.ones_like(ids[sel]).to(device),
            "labels": labels[sel].to(device),
            "sample_id": sample_ids[sel],
        }
        step += 1


class Variant:
    """One model + its loss + optimizer (+ DeepSpeed engine); `step()` runs and times one step."""

    def __init__(self, name: str, args, data, ds_config: dict | None = None):
        import peft
        import torch

        import pace_llm

        self.name, self.args = name, args
        self.device = args.device
        compiled = name.endswith("_compiled")
        name = name.removesuffix("_compiled")
        model = load_model(args)
        torch.manual_seed(1)  # identical LoRA initialisation in every variant
        if name == "peft":
            model = peft.get_peft_model(model, peft_lora_config(model, args))
            self.objective = None
        else:
            model = pace_llm.apply_pace(
                model, pace_llm.PaceConfig(rank=args.rank, alpha=args.alpha, sigma=0.0 if name == "off" else args.sigma)
            )
            if name == "noise_hook":
                unfuse_noise(model)
            mode = {"noise": "off", "noise_hook": "off", "fast_nogram": "fast"}.get(name, name)
            cache = None
            if mode == "fast":
                counts = pace_llm.supervised_counts(data[1]).tolist()
                cache = pace_llm.OutputCache(counts, pace_llm.cache_dim(model), sample_ids=data[2].tolist())
            self.objective = pace_objective(mode, args, cache, model, head_gram=name != "fast_nogram")
        model.train()
        if compiled:
            compile_variant(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.engine = None
        if ds_config is not None:
            import deepspeed

            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
            model = self.engine
        self.model, self.optimizer = model, optimizer
        self.batches = batches(args, data, "cpu" if ds_config is not None and args.device == "cpu" else args.device)
        self.step_index = 0

    def loss(self, batch):
        if self.objective is None:
            inputs = {k: v for k, v in batch.items() if k != "sample_id"}
            return self.model(**inputs, use_cache=False).loss  # as our objectives: no KV cache built
        return self.objective(self.model, batch, self.step_index).loss

    def step(self) -> float:
        import torch

        batch = next(self.batches)
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = self.loss(batch)
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.step_index += 1
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: non-finite loss at step {self.step_index}")
        return time.perf_counter() - start


def peft_lora_config(model, args):
    """PEFT's LoRA on the layers apply_pace adapts, listed as apply_pace lists them."""
    from pace_llm import PaceConfig
    from pace_llm.core.adapters import peft_lora_config as lora_config

    return lora_config(model, PaceConfig(rank=args.rank, alpha=args.alpha, dropout=0.0, train_head=False))


def compile_variant(model) -> None:
    """Each transformer block compiled as train.compile does, keeping the graphs of the variants
    built before, with room for every variant's recompilations in one process."""
    import torch

    from pace_llm.training.compile import compile_blocks

    torch._dynamo.config.recompile_limit = 64
    compile_blocks(model, fresh=False)


def unfuse_noise(model) -> None:
    """The noise as a forward hook on lora_B (what add_lora_noise did before NoisyLora)."""
    from pace_llm.core.noisy_lora import add_noise, is_fused

    for module in model.modules():
        if is_fused(module):
            module.lora_variant.clear()
            add_noise(module, module.pace_noise.sigma, fused=False)


def pace_objective(mode: str, args, cache, model, head_gram: bool = True):
    """PaceObjective(mode); head_gram=False: PACE_fast's consistency through the lm_head
    itself, ‖W(h − h_o)‖², instead of the WᵀW form."""
    import pace_llm

    return pace_llm.PaceObjective(mode, lam=args.lam, lazy_every=2, cache=cache, head_gram=head_gram)


def n_samples(args) -> int:
    return 2 * args.batch  # an epoch is 2 steps: the fast cache is full after warm-up


def warmup_steps(args) -> int:
    return n_samples(args) // args.batch + 1


# --------------------------------------------------------------------------- timing


def measure_rounds(variants: dict, args, log=print) -> dict:
    """{name: [seconds per step, one per round]}: warm-up, then rounds in a rotating order
    (the same order on every rank, as DeepSpeed variants run collectives)."""
    names = list(variants)
    for name in names:
        for _ in range(warmup_steps(args)):
            variants[name].step()
    per_round = {n: [] for n in names}
    for r in range(args.rounds):
        for name in common.rotated(names, r):
            per_round[name].append(sum(variants[name].step() for _ in range(args.steps)) / args.steps)
        log(
            f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {per_round[n][-1] * 1e3:.1f} ms" for n in names),
            flush=True,
        )
    return per_round


def time_interleaved(variants: dict, args, log=print) -> dict:
    """{name: {"per_round": [s/step per round], "ratio_per_round": [...]}}."""
    per_round = measure_rounds(variants, args, log)
    names = list(variants)
    return {
        n: {"per_round_s": per_round[n], "ratio_per_round": [a / b for a, b in zip(per_round[n], per_round["peft"])]}
        for n in names
    }


def timing_rows(timing: dict) -> dict:
    off = timing.get("off")
    out = {}
    for name, t in timing.items():
        q1, q3 = common.quartiles(t["per_round_s"])
        out[name] = {
            "median_ms": common.median(t["per_round_s"]) * 1e3,
            "q1_ms": q1 * 1e3,
            "q3_ms": q3 * 1e3,
            "ratio_to_peft": common.median(t["ratio_per_round"]),
            "ratio_to_off": common.median([a / b for a, b in zip(t["per_round_s"], off["per_round_s"])])
            if off
            else None,
        }
    return out


# --------------------------------------------------------------------------- memory


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_child(args) -> dict:
    """In a fresh process: build one variant, then peak memory over warm-up + a few steps."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args, vocab_size(args), n_samples(args))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        variant = Variant(args.memory_child, args, data)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        variant = Variant(args.memory_child, args, data)
        before = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = [variant.step() for _ in range(warmup_steps(args) + args.memory_steps)]
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kb("VmHWM") * 1024
    return {
        "variant": args.memory_child,
        "before_bytes": before,
        "peak_bytes": peak,
        "delta_bytes": peak - before,
        "last_step_s": times[-1],
        "measure": "cuda max_memory_allocated" if args.device == "cuda" else "VmHWM (peak RSS)",
    }


def vocab_size(args) -> int:
    import transformers

    source = model_source(args.model)
    if source is None:
        from pace_llm.assets.tiny import tiny_config

        return tiny_config("llama").vocab_size
    return transformers.AutoConfig.from_pretrained(source).vocab_size


def measure_memory(args, argv: list[str]) -> dict:
    """Each variant in its own subprocess, two at a time (a process's peak RSS is its own)."""
    procs, results = {}, {}
    # smoke: two subprocesses (the path is what the test checks), not one per variant
    pending = [v for v in args.variants if v in ("peft", "fast")] if args.smoke else list(args.variants)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    while pending or procs:
        while pending and len(procs) < 2:
            name = pending.pop(0)
            cmd = [sys.executable, __file__, *argv, "--memory-child", name]
            procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        name = next(iter(procs))
        out, err = procs[name].communicate()
        if procs.pop(name).returncode != 0:
            raise RuntimeError(f"memory run of {name} failed:\n{err[-3000:]}")
        results[name] = json.loads(out.strip().splitlines()[-1])
    base = results["peft"]
    for r in results.values():
        r["peak_ratio_to_peft"] = r["peak_bytes"] / base["peak_bytes"]
        r["delta_ratio_to_peft"] = r["delta_bytes"] / base["delta_bytes"] if base["delta_bytes"] > 0 else None
    return results


# --------------------------------------------------------------------------- runs


def single_process(args, argv) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args, vocab_size(args), n_samples(args))
    print(f"building {len(args.variants)} variants of {args.model} ({args.dtype}, {args.device})", flush=True)
    variants = {name: Variant(name, args, data) for name in args.variants}
    timing = time_interleaved(variants, args)
    del variants
    compiled = None
    if any(v.endswith("_compiled") for v in args.variants):
        from pace_llm.training.compile import compile_report

        compiled = compile_report()
        print(compiled, flush=True)
    memory = None if args.no_memory else measure_memory(args, argv)
    return {
        "timing": timing_rows(timing),
        "raw_timing": timing,
        "memory": memory,
        "compile": compiled,
        "torch_threads": torch.get_num_threads(),
    }


def table_single(result: dict) -> str:
    rows = []
    for name, t in result["timing"].items():
        m = (result["memory"] or {}).get(name, {})
        mib = lambda b: None if b is None else b / 2**20  # noqa: E731
        rows.append(
            [
                name,
                t["median_ms"],
                f"{t['q1_ms']:.4g}-{t['q3_ms']:.4g}",
                f"{t['ratio_to_peft']:.3f}",
                f"{t['ratio_to_off']:.3f}" if t["ratio_to_off"] else "n/a",
                mib(m.get("peak_bytes")),
                f"{m['peak_ratio_to_peft']:.3f}" if m else "n/a",
                mib(m.get("delta_bytes")),
                f"{m['delta_ratio_to_peft']:.3f}" if m and m.get("delta_ratio_to_peft") else "n/a",
            ]
        )
    return common.markdown_table(
        [
            "variant",
            "step ms (median)",
            "IQR ms",
            "time / peft",
            "time / off",
            "peak MiB",
            "peak / peft",
            "training MiB",
            "training / peft",
        ],
        rows,
    )


def launch_deepspeed(args, argv) -> int:
    """Re-run this script under `deepspeed --num_gpus 2` (1 OpenMP thread per rank on CPU)."""
    from pace_llm.distributed.launcher import launch_env, script_command

    env = launch_env(threads=1, offline=False, BENCH_COMMAND=common.command_line())
    cmd = script_command("deepspeed", __file__, argv, nproc=2)
    print(
        "$ OMP_NUM_THREADS=1 "
        + " ".join(cmd[0:1] + [os.path.relpath(c, common.ROOT) if c == __file__ else c for c in cmd[1:]]),
        flush=True,
    )
    rc = subprocess.run(cmd, env=env, cwd=common.ROOT).returncode
    if rc == 0:  # the table last, after the launcher's own log lines
        print("\n" + (Path(args.out or common.RESULTS) / f"{args.name}.md").read_text())
    return rc


def ds_config(args, world: int) -> dict:
    """The config launch/train.py would build for this batch, ZeRO stage and dtype."""
    from pace_llm.config import load_recipe
    from pace_llm.distributed import deepspeed_engine

    recipe = load_recipe(
        None,
        [f"train.micro_batch_size={args.batch}", f"deepspeed.zero_stage={args.deepspeed}", f"model.dtype={args.dtype}"],
    )
    return deepspeed_engine.build_config(recipe, world)


def distributed(args) -> dict | None:
    import torch
    import torch.distributed as dist

    from pace_llm.distributed import deepspeed_engine
    from pace_llm.distributed.process_group import all_reduce_scalars, init_distributed

    rank, world = init_distributed()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    config = ds_config(args, world)
    vocab = vocab_size(args)
    # rank r holds the samples r, r+W, ... (as ShardedEpochSampler): its own cache shard
    data = make_data(args, vocab, n_samples(args), id_offset=rank, id_stride=world)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(
        f"building {len(args.variants)} variants x (plain, ZeRO-{args.deepspeed}) of {args.model} on {world} ranks",
        flush=True,
    )
    variants = {f"{n}/plain": Variant(n, args, data) for n in args.variants}
    hf_config = deepspeed_engine.zero3_context(config)  # models built partitioned under ZeRO-3
    for n in args.variants:
        variants[f"{n}/zero{args.deepspeed}"] = Variant(n, args, data, ds_config=config)
    if hf_config is not None:
        deepspeed_engine.unset_zero3()
    names = list(variants)
    per_round = measure_rounds(variants, args, log)
    # the slowest rank's time per round (an engine step waits for both anyway)
    rounds = len(per_round[names[0]])
    flat = all_reduce_scalars([x for n in names for x in per_round[n]], dist.ReduceOp.MAX)
    per_round = {n: flat[i * rounds : (i + 1) * rounds] for i, n in enumerate(names)}
    dist.barrier()
    if rank != 0:
        return None
    out = {}
    for kind in ("plain", f"zero{args.deepspeed}"):
        timing = {
            n: {
                "per_round_s": per_round[f"{n}/{kind}"],
                "ratio_per_round": [a / b for a, b in zip(per_round[f"{n}/{kind}"], per_round[f"peft/{kind}"])],
            }
            for n in args.variants
        }
        out[kind] = timing_rows(timing)
    return {"timing": out, "world_size": world, "torch_threads": torch.get_num_threads(), "ds_config": config}


def table_distributed(result: dict, stage: int) -> str:
    plain, zero = result["timing"]["plain"], result["timing"][f"zero{stage}"]
    rows = [
        [
            n,
            plain[n]["median_ms"],
            f"{plain[n]['ratio_to_peft']:.3f}",
            zero[n]["median_ms"],
            f"{zero[n]['ratio_to_peft']:.3f}",
            f"{zero[n]['ratio_to_peft'] / plain[n]['ratio_to_peft']:.3f}",
        ]
        for n in plain
    ]
    return common.markdown_table(
        ["variant", "plain ms", "plain / peft", f"ZeRO-{stage} ms", f"ZeRO-{stage} / peft", "ratio ZeRO / plain"], rows
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("pace_llm").setLevel(logging.ERROR)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    if args.deepspeed and "RANK" not in os.environ:
        return launch_deepspeed(args, argv)
    machine = common.machine_info(args.device)
    settings = {k: v for k, v in vars(args).items() if k not in ("memory_child", "local_rank")}
    if args.deepspeed:
        result = distributed(args)
        if result is None:
            return 0
        table = table_distributed(result, args.deepspeed)
    else:
        result = single_process(args, argv)
        table = table_single(result)
    result = {"machine": machine, "command": common.command_line(), "settings": settings, **result}
    common.save(args.name, result, table, args.out)
    print(
        f"\n{args.name} ({args.model}, {args.dtype}, {args.device}, batch {args.batch} x {args.seq_len} tokens, "
        f"{args.answer_len} supervised; {args.rounds} rounds x {args.steps} steps, interleaved; "
        f"load average {machine['load_average_at_start']})"
    )
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
