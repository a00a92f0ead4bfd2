"""The CUDA path in one run (issue #15): tests, PACE on the device, trainer throughput and
memory per mode, and the bf16 merge/export check. bench/gpu_check.sh is the entry point
(it installs the carried wheels first); its header has the exact commands.

    python bench/gpu_check.py                 # on a GPU: bench/results/gpu_check.{json,md}
    python bench/gpu_check.py --cpu-smoke     # tiny models on a CPU, results in a temp folder

Phases, each printed with its elapsed time; when the time budget (--budget-s, env
PACE_GPU_CHECK_BUDGET_S) runs out, the remaining phases and runs are skipped and listed:
  1. tests     the suite's CUDA-relevant files, as they are (they build CPU tensors: with
               CUDA visible they check the carried stack, not CUDA kernels; see 2)
  2. core      PACE on the device: every objective's loss with σ=0 equals the CPU fp32 one,
               σ>0 losses and adapter gradients are finite in bf16, PACE_fast's cache
               round-trips device tensors, the noise has mean 1 and std σ
  3. models    Phi-3-mini-shaped (3.8B) and Llama-3.2-1B-shaped (tied embeddings) folders:
               config + random bf16 safetensors + the tiny character tokenizer (ids < 102,
               inside both vocabularies); throughput does not depend on the weights
  4. train     `python launch/train.py RECIPE overrides` (world size 1, DeepSpeed ZeRO-2,
               NCCL on CUDA) for each model x gradient checkpointing x mode, sequences of
               exactly --seq-len tokens (no padding); tokens/s and step time from each
               run's metrics.jsonl after --warmup steps, peak memory from a wrapper around
               the run (torch.cuda.max_memory_allocated; CPU: peak RSS), ratios to the
               LoRA baseline (pace.mode=off, σ=0) of the same model and checkpointing.
               The Llama full-mode run without checkpointing also merges and exports
               (bf16 export check, on a short held-out batch). Then, on the first model
               without checkpointing, EXTRA_RUNS: the other consistency forms (kl, raw_sum),
               train.compile on and off, and token-budget packing (sdpa, and segment_sdpa:
               attention per packed sample) against padded batches on chat-like lengths
               (log-normal, median seq_len/8), each against its own baseline.
  5. overhead  bench/train_overhead.py on the first model (bf16, interleaved rounds in one
               process): the noise fused into PEFT's LoRA forward (`noise`) against the former
               lora_B hook (`noise_hook`) and `off`, and each variant compiled.
Modes: lora (off: PEFT's LoRA, no noise), noise (the noise alone, no consistency term),
fast, lazy_half, full. Timing runs stop with train.stop_after,
which skips the merged export (7.6 GB per Phi-3 run otherwise). The table puts the paper's
Table 9/10 ratios (ViT-B/16, CIFAR-100: fast ~1.00x time and ~1.01x memory of the baseline,
full ~1.8x and ~2.0x) beside ours; mfu is the trainer's (training/mfu.py), on CUDA bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: this script's folder is first on sys.path

from pace_llm.distributed.launcher import exit_now

ROOT = common.ROOT
# Shapes from the models' published configs (rope scaling left out: it does not change the cost).
MODELS = {
    "llama3.2-1b": dict(
        arch="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "phi3-mini": dict(
        arch="phi3",
        hidden_size=3072,
        num_hidden_layers=32,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}
SMOKE_MODELS = {  # the same two architectures, CPU-sized (GQA and tied embeddings kept)
    "llama-tiny": dict(
        arch="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "phi3-tiny": dict(
        arch="phi3",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
}
MODES = {
    "lora": ["pace.mode=off"],
    "noise": ["pace.mode=noise"],
    "fast": ["pace.mode=fast"],
    "lazy_half": ["pace.mode=lazy_half"],
    "full": ["pace.mode=full"],
}
BASELINE = "lora"
# The CPU smoke proves the path, not every combination: each mode once, checkpointing and the
# second architecture once each against their own baseline (7 runs instead of 20: the suite's time).
SMOKE_RUNS = [("llama-tiny", False, mode) for mode in MODES] + [
    ("phi3-tiny", True, BASELINE),
    ("phi3-tiny", True, "full"),
]
# name -> (overrides, baseline), on the first model without checkpointing; "{varied}" and
# "{budget}" are the chat-like data file and its token budget (write_varied_data)
EXTRA_RUNS = {
    "full_kl": (["pace.mode=full", "pace.consistency=kl"], BASELINE),
    "full_raw_sum": (["pace.mode=full", "pace.consistency=raw_sum", "pace.lam=0.1"], BASELINE),
    "lora_compile": (["pace.mode=off", "train.compile=true"], BASELINE),
    "full_compile": (["pace.mode=full", "train.compile=true"], BASELINE),
    "lora_varied_padded": (["pace.mode=off", "data.train={varied}"], "lora_varied_padded"),
    "lora_varied_budget": (
        ["pace.mode=off", "data.train={varied}", "data.packing=true", "train.micro_batch_tokens={budget}"],
        "lora_varied_padded",
    ),
    "lora_varied_budget_segment": (
        ["pace.mode=off", "data.train={varied}", "data.packing=true", "train.micro_batch_tokens={budget}"]
        + ["model.attn_implementation=segment_sdpa"],
        "lora_varied_padded",
    ),
}
# not lora_compile: a cold inductor compile on this CPU can take minutes in a fresh clone
# (tests/test_train.py and test_objectives.py test train.compile)
SMOKE_EXTRA = ["full_kl", "lora_varied_padded", "lora_varied_budget", "lora_varied_budget_segment"]
PAPER = {"fast": "~1.00 / ~1.01", "full": "~1.8 / ~2.0"}  # Table 9/10: time / memory over the baseline
EXPORT_RUN = ("full", False)  # (mode, gradient checkpointing) of the run that also exports, first
# model (Llama: its merged folder is 2.5 GB, Phi-3's 7.6)
# What the trainer's metrics.jsonl lacks for this check (the wrapper measures it meanwhile).
MISSING_METRICS = [
    "peak_memory_gb (torch.cuda.max_memory_allocated since the previous logged step)",
    "step_s (wall time of the optimizer step; derived here from tokens_per_s)",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models, a few steps, on this CPU")
    p.add_argument("--out", default=None, help="results folder (default bench/results; smoke: a temp folder)")
    p.add_argument("--work", default=None, help="models, data and runs (default: a folder in /tmp)")
    p.add_argument("--copy-to", default=None, help="also copy the results and a tarball of the run logs here")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting phases/runs after this many seconds (env PACE_GPU_CHECK_BUDGET_S; default 450, smoke 300)",
    )
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="micro batch (lazy_half needs >= 2)")
    p.add_argument("--warmup", type=int, default=2, help="logged steps not measured")
    p.add_argument("--steps", type=int, default=4, help="measured steps (even: lazy_half alternates)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="model.dtype (this CPU has bf16 too)")
    p.add_argument("--tests", nargs="*", default=None, help="test files / pytest args")
    p.add_argument("--tests-timeout-s", type=float, default=120, help="(66 tests: ~13 s on 2 CPU cores)")
    p.add_argument("--parallel", type=int, default=1, help="trainer runs at a time (CPU smoke only)")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = float(os.environ.get("PACE_GPU_CHECK_BUDGET_S", 300 if args.cpu_smoke else 450))
    if args.cpu_smoke:
        args.seq_len, args.batch, args.warmup, args.steps, args.rank = 64, 2, 1, 2, 4
        args.parallel = max(args.parallel, 2)
        args.out = args.out or tempfile.mkdtemp(prefix="gpu_check_smoke_")
        args.tests = args.tests or ["tests/test_cache.py", "-k", "round_trip or memory_mapped or sampler_single"]
    args.tests = args.tests or [
        "tests/test_noise.py",
        "tests/test_objectives.py",
        "tests/test_cache.py",
        "tests/test_adapters.py",
    ]
    args.device = "cpu" if args.cpu_smoke else "cuda"
    args.models = SMOKE_MODELS if args.cpu_smoke else MODELS
    # smoke: a fresh folder per call, so concurrent smokes (a test beside a manual run) never share runs
    args.work = Path(
        args.work
        or (
            tempfile.mkdtemp(prefix="gpu_check_smoke_work_")
            if args.cpu_smoke
            else Path(tempfile.gettempdir()) / "pace-gpu-check"
        )
    )
    args.name = "gpu_check_smoke" if args.cpu_smoke else "gpu_check"
    if args.steps % 2 or args.batch < 2:
        p.error("--steps must be even and --batch >= 2 (lazy_half)")
    return args


class Clock:
    """Elapsed time per phase, and the budget the phases and runs draw from."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s, self.phases, self.skipped = time.monotonic(), budget_s, {}, []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def phase(self, name: str, needs_s: float = 0.0):
        """A context that times the phase; yields False (and records a skip) when out of budget."""
        clock = self

        class _Phase:
            def __enter__(self):
                self.ok = clock.left() > needs_s
                self.t0 = time.monotonic()
                if not self.ok:
                    clock.skip(name, f"budget: {clock.left():.0f} s left, needs ~{needs_s:.0f} s")
                else:
                    print(f"\n== {name} (budget left {clock.left():.0f} s)", flush=True)
                return self.ok

            def __exit__(self, *exc):
                if self.ok:
                    clock.phases[name] = round(time.monotonic() - self.t0, 1)
                    print(f"== {name}: {clock.phases[name]:.1f} s", flush=True)

        return _Phase()

    def skip(self, what: str, why: str) -> None:
        self.skipped.append({"what": what, "why": why})
        print(f"-- skipped {what}: {why}", flush=True)


def child_env(args) -> dict:
    env = dict(
        os.environ,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        HF_DATASETS_CACHE=str(args.work / "hf-datasets"),
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # two runs share this machine's two cores
    return env


# --------------------------------------------------------------------------- 1. tests


def run_tests(args, clock) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests]
    print("$ " + " ".join(cmd[2:]), flush=True)
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=child_env(args),
            capture_output=True,
            text=True,
            timeout=max(10, min(args.tests_timeout_s, clock.left() - 60)),
        )
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        rc, log_text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        summary, rc, log_text = "timed out", None, str(err.stdout or "")
    (args.work / "tests.log").write_text(log_text)
    print(summary, flush=True)
    return {
        "command": " ".join(cmd[2:]),
        "returncode": rc,
        "summary": summary,
        "note": "the files build CPU tensors: on a GPU machine they test the carried stack, not CUDA",
    }


# --------------------------------------------------------------------------- 2. core on the device


def check_core(device: str) -> dict:
    import torch

    import pace_llm
    from pace_llm.assets.tiny import tiny_model
    from pace_llm.core.pace import multiplicative_noise

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "sample_id": torch.arange(4)}

    def losses(mode, dev, dtype, sigma):
        base = tiny_model("phi3", eos_token_id=2, bos_token_id=2)  # ids inside its 256-token vocabulary
        model = pace_llm.apply_pace(base, pace_llm.PaceConfig(rank=4, sigma=sigma))
        torch.manual_seed(1)
        with torch.no_grad():  # non-zero adapters, as after some training
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape) * 0.1)
        model = model.to(dev, dtype).train()
        cache = None
        if mode == "fast":
            cache = pace_llm.OutputCache(pace_llm.supervised_counts(labels).tolist(), pace_llm.cache_dim(model))
        objective = pace_llm.PaceObjective(mode, lam=0.1, cache=cache)
        on_dev = {k: v.to(dev) for k, v in batch.items()}
        out = [objective(model, on_dev, step) for step in (0, 1)]  # fast: the second reads the cache
        out[-1].loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads), f"{mode}: adapter gradients"
        assert any(gr.abs().sum() > 0 for gr in grads), f"{mode}: all adapter gradients zero"
        return [o.loss.item() for o in out], [o.consistency_loss.item() for o in out]

    result = {}
    for mode in pace_llm.MODES:
        cpu, _ = losses(mode, "cpu", torch.float32, 0.0)
        dev, _ = losses(mode, device, torch.float32, 0.0)
        noisy, cons = losses(mode, device, torch.bfloat16, 1.0)
        assert all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(cpu, dev)), f"{mode}: {cpu} vs {dev}"
        assert all(map(lambda x: x == x and abs(x) < float("inf"), noisy + cons)), f"{mode}: {noisy} {cons}"
        if mode in ("fast", "full"):
            assert cons[-1] > 0, f"{mode}: no consistency with σ=1 ({cons})"
        result[mode] = {
            "cpu_fp32_sigma0": cpu,
            f"{device}_fp32_sigma0": dev,
            f"{device}_bf16_sigma1": noisy,
            "consistency_bf16_sigma1": cons,
        }
    z = multiplicative_noise(torch.ones(1024, 1024, device=device), 0.5)  # (B, d_out) draws
    mean, std = float(z.mean()), float(z.std())
    assert abs(mean - 1) < 0.01 and abs(std - 0.5) < 0.01, (mean, std)
    result["noise_mean_std_sigma0.5"] = [mean, std]
    return result


# --------------------------------------------------------------------------- 3. models and data


def build_model(spec: dict, folder: Path, device: str, dtype: str) -> None:
    """config.json + random-weight safetensors + tokenizer, written once (marked by config.json)."""
    if (folder / "config.json").exists():
        return
    import torch
    import transformers

    from pace_llm.assets.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    spec = dict(spec)
    config_cls = {"phi3": transformers.Phi3Config, "llama": transformers.LlamaConfig}[spec.pop("arch")]
    config = config_cls(
        **spec,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    with torch.device(device):  # initialised on the GPU: seconds for 3.8B parameters
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    del model


def random_text(rng, n: int) -> str:
    """n characters the tiny character tokenizer encodes one token each."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     0123456789") for _ in range(n))


def write_data(work: Path, seq_len: int, n_rows: int) -> tuple[Path, Path]:
    """Rows longer than seq_len, so data.max_length=seq_len cuts every one to exactly seq_len
    tokens (no padding); the answer starts half-way. Short held-out rows for the export check."""
    import random

    rng = random.Random(0)
    row = lambda q, a: json.dumps({"question": random_text(rng, q), "answer": random_text(rng, a)}) + "\n"  # noqa: E731
    train, held_out = work / "train.jsonl", work / "held_out.jsonl"
    train.write_text("".join(row(seq_len // 2, seq_len) for _ in range(n_rows)))
    held_out.write_text("".join(row(24, 24) for _ in range(4)))
    return train, held_out


def write_varied_data(work: Path, seq_len: int, n_rows: int, batch: int) -> tuple[Path, int]:
    """Chat-like rows: bench/packing.py's log-normal lengths (median seq_len/8, σ 0.8, at most
    seq_len, the last 40% supervised) as text; and the token budget that holds about `batch`
    of them (at least seq_len)."""
    import random

    from packing import lognormal_lengths  # bench/packing.py, beside this script

    lengths = lognormal_lengths(n_rows, seq_len / 8, 0.8, seq_len, seed=1)
    rng = random.Random(1)
    rows = []
    for n, answer in lengths:
        text = random_text(rng, n)
        rows.append(json.dumps({"question": text[: n - answer], "answer": text[n - answer :]}) + "\n")
    path = work / "varied.jsonl"
    path.write_text("".join(rows))
    return path, max(seq_len, round(batch * sum(n for n, _ in lengths) / len(lengths)))


def write_recipe(args, train_file: Path) -> Path:
    import yaml

    recipe = {
        "output_dir": str(args.work / "runs" / "unnamed"),
        "resume": False,
        "model": {"task": "causal_lm", "dtype": args.dtype},
        "pace": {"lam": 0.01, "sigma": 1.0, "rank": args.rank, "alpha": 2.0 * args.rank},
        "data": {
            "train": str(train_file),
            "eval": None,
            "prompt_template": "{question}",
            "answer_field": "answer",
            "max_length": args.seq_len,
        },
        "train": {
            "max_steps": args.warmup + args.steps,
            "micro_batch_size": args.batch,
            "lr": 1e-4,
            "warmup_steps": 0,
            "log_every": 1,
            "save_every": 0,
            "keep_checkpoints": 1,
        },
        "deepspeed": {"zero_stage": 2},
    }
    path = args.work / "gpu_check.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------- 4. train


def child_train(out: str, train_argv: list[str]) -> int:
    """`launch/train.py ARGS` in this process, then its peak memory into OUT/peak_memory.json."""
    from pace_llm.training import main as train_main

    rc = train_main(train_argv)
    import torch

    if torch.cuda.is_available():
        peak = {
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
            "measure": "cuda max allocated",
        }
    else:  # ru_maxrss is KiB on Linux
        peak = {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "measure": "peak RSS"}
    Path(out, "peak_memory.json").write_text(json.dumps(peak))
    return rc


def plan_runs(args, recipe: Path, folders: dict, held_out: Path, varied: tuple[Path, int]) -> list[dict]:
    """Order: no checkpointing on both models first (the headline ratios), then checkpointing,
    then EXTRA_RUNS on the first model."""
    runs = []
    for gc in (False, True):
        for i, model in enumerate(args.models):
            for mode, overrides in MODES.items():
                if args.cpu_smoke and (model, gc, mode) not in SMOKE_RUNS:
                    continue
                out = args.work / "runs" / f"{model}_{'gc' if gc else 'nogc'}_{mode}"
                export = i == 0 and (mode, gc) == EXPORT_RUN
                extra = [f"data.eval={held_out}"] if export else [f"train.stop_after={args.warmup + args.steps}"]
                argv = [
                    str(recipe),
                    f"model.name={folders[model]}",
                    f"model.gradient_checkpointing={str(gc).lower()}",
                    *overrides,
                    f"output_dir={out}",
                    *extra,
                ]
                runs.append(
                    {
                        "model": model,
                        "gradient_checkpointing": gc,
                        "mode": mode,
                        "baseline": BASELINE,
                        "export": export,
                        "out": out,
                        "argv": argv,
                    }
                )
    model = next(iter(args.models))
    for name, (overrides, baseline) in EXTRA_RUNS.items():
        if args.cpu_smoke and name not in SMOKE_EXTRA:
            continue
        out = args.work / "runs" / f"{model}_nogc_{name}"
        overrides = [o.format(varied=varied[0], budget=varied[1]) for o in overrides]
        argv = [str(recipe), f"model.name={folders[model]}", *overrides, f"output_dir={out}"]
        argv.append(f"train.stop_after={args.warmup + args.steps}")
        run = dict(model=model, gradient_checkpointing=False, mode=name, baseline=baseline, export=False)
        runs.append({**run, "out": out, "argv": argv})
    return runs


def start_run(args, run: dict, timeout: float) -> subprocess.Popen:
    shutil.rmtree(run["out"], ignore_errors=True)
    run["out"].mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-train", str(run["out"]), "--", *run["argv"]]
    run["command"] = "python launch/train.py " + " ".join(run["argv"])
    print(f"$ {run['command']}", flush=True)
    run["t0"], run["deadline"] = time.monotonic(), time.monotonic() + timeout
    log = open(run["out"] / "train.log", "w")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(args), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish_run(args, run: dict, proc: subprocess.Popen) -> dict:
    """Status, measured throughput and memory of a finished run (metrics.jsonl + the wrapper)."""
    rc = proc.returncode
    row = {k: run[k] for k in ("model", "gradient_checkpointing", "mode", "baseline", "command")}
    row["wall_s"] = round(time.monotonic() - run["t0"], 1)
    metrics_file = run["out"] / "metrics.jsonl"
    steps = (
        [r for r in map(json.loads, metrics_file.read_text().splitlines()) if "loss" in r]
        if metrics_file.exists()
        else []
    )
    measured = [r for r in steps if r["step"] > args.warmup]
    if rc == 0 and measured:
        tokens_per_s = common.median([r["tokens_per_s"] for r in measured])  # real (non-padding) tokens
        row.update(status="ok", tokens_per_s=tokens_per_s, steps_measured=len(measured), loss_last=measured[-1]["loss"])
        if "varied" not in run["mode"]:  # every row is exactly seq_len tokens: a step's time follows
            row["step_ms"] = 1000 * args.batch * args.seq_len / tokens_per_s
        if all("mfu" in r for r in measured):
            row["mfu"] = common.median([r["mfu"] for r in measured])
    else:
        row["status"] = "timeout" if rc is None or rc < 0 else f"failed (exit {rc})"
        row["log_tail"] = (run["out"] / "train.log").read_text()[-3000:]
        print(row["log_tail"], flush=True)
    peak = run["out"] / "peak_memory.json"
    if peak.exists():
        row.update(json.loads(peak.read_text()))
    if run["export"]:
        check = run["out"] / "export_check.json"
        row["export_check"] = json.loads(check.read_text()) if check.exists() else None
    print(
        f"   {row['status']} in {row['wall_s']:.0f} s: "
        + (
            f"{row['tokens_per_s']:,.0f} tokens/s, "
            f"{row.get('step_ms', float('nan')):.1f} ms/step, peak {row.get('peak_memory_gb', float('nan')):.2f} GiB"
            if row["status"] == "ok"
            else ""
        ),
        flush=True,
    )
    return row


def train_all(args, clock, runs: list[dict]) -> list[dict]:
    """Each run in its own process (one at a time on a GPU); a run starts only while the
    budget covers the longest run so far of its model."""
    results, active, longest = [], [], {}
    pending = list(runs)
    while pending or active:
        while pending and len(active) < args.parallel:
            run = pending.pop(0)
            need = longest.get(run["model"], max(longest.values(), default=0.0))
            if clock.left() < need + 5:
                clock.skip(
                    f"train {run['model']} gc={run['gradient_checkpointing']} {run['mode']}",
                    f"budget: {clock.left():.0f} s left, a run takes ~{need:.0f} s",
                )
                continue
            active.append((run, start_run(args, run, timeout=clock.left())))
        time.sleep(0.2)
        for run, proc in list(active):
            if proc.poll() is None and time.monotonic() < run["deadline"]:
                continue
            if proc.poll() is None:  # out of budget: end the run's process group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            active.remove((run, proc))
            results.append(finish_run(args, run, proc))
            longest[run["model"]] = max(longest.get(run["model"], 0.0), results[-1]["wall_s"])
    return results


def add_ratios(rows: list[dict]) -> None:
    """time / memory / tokens-per-s of each run over its baseline run (LoRA of its model and
    checkpointing; padded LoRA on the same lengths for the token-budget run)."""
    ok = {(r["model"], r["gradient_checkpointing"], r["mode"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        b = ok.get((r["model"], r["gradient_checkpointing"], r["baseline"]))
        if r["status"] != "ok" or b is None:
            continue
        r["tokens_per_s_ratio_to_baseline"] = r["tokens_per_s"] / b["tokens_per_s"]
        if r.get("step_ms") and b.get("step_ms"):
            r["time_ratio_to_baseline"] = r["step_ms"] / b["step_ms"]
        if r.get("peak_memory_gb") and b.get("peak_memory_gb"):
            r["memory_ratio_to_baseline"] = r["peak_memory_gb"] / b["peak_memory_gb"]


def table(rows: list[dict]) -> str:
    order = {m: i for i, m in enumerate([*MODES, *EXTRA_RUNS])}
    rows = sorted(rows, key=lambda r: (r["model"], r["gradient_checkpointing"], order[r["mode"]]))
    cells = [
        [
            r["model"],
            "on" if r["gradient_checkpointing"] else "off",
            r["mode"],
            r["baseline"],
            r.get("tokens_per_s"),
            r.get("step_ms"),
            r.get("peak_memory_gb"),
            r.get("mfu"),
            r.get("tokens_per_s_ratio_to_baseline"),
            r.get("time_ratio_to_baseline"),
            r.get("memory_ratio_to_baseline"),
            PAPER.get(r["mode"], ""),
            r["status"],
        ]
        for r in rows
    ]
    return common.markdown_table(
        [
            "model",
            "grad ckpt",
            "mode",
            "baseline",
            "tokens/s",
            "step ms",
            "peak GiB",
            "mfu",
            "tokens/s / baseline",
            "time / baseline",
            "memory / baseline",
            "paper time / memory",
            "status",
        ],
        cells,
    )


def run_overhead(args, clock, folder: Path) -> dict:
    """bench/train_overhead.py on `folder`: fused noise vs the lora_B hook, compiled variants."""
    out = args.work / "overhead"
    cmd = [sys.executable, str(ROOT / "bench" / "train_overhead.py"), "--model", str(folder)]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch)]
    cmd += ["--seq-len", str(args.seq_len), "--variants", "peft,off,noise,noise_hook,full"]
    cmd += [] if args.cpu_smoke else ["--compile"]  # on a GPU only: see SMOKE_EXTRA
    cmd += ["--rounds", "2" if args.cpu_smoke else "3", "--steps", "2", "--no-memory", "--out", str(out)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=child_env(args), capture_output=True, text=True, timeout=max(1.0, clock.left())
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-3000:], flush=True)
        return {"status": f"failed (exit {proc.returncode})", "log_tail": proc.stderr[-3000:]}
    print(proc.stdout[proc.stdout.rfind("\n|") - 400 :], flush=True)
    found = sorted(out.glob("train_overhead_*.json"))
    return {"status": "ok", **json.loads(found[-1].read_text())} if found else {"status": "no results"}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child-train"]:
        exit_now(child_train(argv[1], argv[3:]))
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke on a CPU", file=sys.stderr)
        return 2
    result = {
        "machine": common.machine_info(args.device),
        "command": common.command_line(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "models"},
        "models": args.models,
        "missing_from_metrics_jsonl": MISSING_METRICS,
    }

    with clock.phase("tests", needs_s=30) as ok:
        if ok:
            result["tests"] = run_tests(args, clock)
    with clock.phase("core on " + args.device, needs_s=20) as ok:
        if ok:
            try:
                result["core"] = {"passed": True, **check_core(args.device)}
            except AssertionError as err:
                result["core"] = {"passed": False, "error": str(err)}
            print(f"core checks passed: {result['core']['passed']}", flush=True)
    rows = []
    with clock.phase("models and data", needs_s=30) as ok:
        if ok:
            folders = {}
            for name, spec in args.models.items():
                folders[name] = args.work / "models" / name
                build_model(spec, folders[name], args.device, args.dtype)
            if args.device == "cuda":  # the parent keeps only its context while the runs train
                torch.cuda.empty_cache()
            train_file, held_out = write_data(
                args.work, args.seq_len, n_rows=2 * args.batch
            )  # fast: cache hits from step 3
            recipe = write_recipe(args, train_file)
            varied = write_varied_data(args.work, args.seq_len, n_rows=16 * args.batch, batch=args.batch)
    if ok:
        with clock.phase("train") as ok:
            rows = train_all(args, clock, plan_runs(args, recipe, folders, held_out, varied))
        with clock.phase("overhead", needs_s=60) as ok:
            if ok:
                result["overhead"] = run_overhead(args, clock, folders[next(iter(args.models))])
    add_ratios(rows)
    result.update(runs=rows, phases_s=clock.phases, skipped=clock.skipped)
    export = next((r.get("export_check") for r in rows if "export_check" in r), None)
    if export:
        export["passed"] = export["max_abs_logit_diff"] <= export["tolerance"]
    result["export_check"] = export
    text = table(rows)
    path = common.save(args.name, result, text, args.out)
    (path.parent / f"gpu_export_check{'_smoke' if args.cpu_smoke else ''}.json").write_text(
        json.dumps(export, indent=2) + "\n"
    )
    if args.copy_to:
        copy_results(args, path)
    total = time.monotonic() - clock.start
    print(
        f"\nresults: {path}, runs in {args.work}  ({total:.0f} s; phases {clock.phases}; {len(clock.skipped)} skipped)"
    )
    for s in clock.skipped:
        print(f"  skipped {s['what']}: {s['why']}")
    if export:
        print(
            f"export check (merged vs trained, {args.dtype}): max |Δlogit| {export['max_abs_logit_diff']:.3g}, "
            f"tolerance {export['tolerance']:.3g}: {'passed' if export['passed'] else 'FAILED'}"
        )
    print(
        f"\n{args.name}: {args.device} {result['machine'].get('gpu', '')}, {args.dtype}, ZeRO-2, batch "
        f"{args.batch} x {args.seq_len} tokens, LoRA rank {args.rank}, {args.steps} steps after {args.warmup}"
    )
    print(text, flush=True)
    return 0


def copy_results(args, path: Path) -> None:
    """Results + one tarball of every run's log, metrics and recipe (the device returns 8 files)."""
    dest = Path(args.copy_to)
    dest.mkdir(parents=True, exist_ok=True)
    for f in path.parent.glob("gpu_*"):
        shutil.copy(f, dest / f.name)
    with tarfile.open(dest / f"{args.name}_logs.tar.gz", "w:gz") as tar:
        for f in [args.work / "tests.log", *args.work.glob("runs/*/*.log"), *args.work.glob("runs/*/*.json*")]:
            if f.exists():
                tar.add(f, arcname=str(f.relative_to(args.work)))


if __name__ == "__main__":
    sys.exit(main())
