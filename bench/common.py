"""Helpers the benchmark scripts share: machine/version header, interleaved timing, tables.

Timing on a shared machine: every script compares a variant against its baseline *in the
same run*, interleaved (rounds that alternate the variants, in a rotating order), and
reports medians and the median of per-round ratios, so a background job that slows one
round slows both sides of that round's ratio.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    import importlib.metadata

    for dist in (module, module.replace("_", "-"), f"{module}-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_info(device: str = "cpu") -> dict:
    """What a result was measured on: CPU/GPU, cores, load, library versions, commit, date."""
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "transformers", "peft", "deepspeed", "vllm")},
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def command_line() -> str:
    """The command as typed (a launcher's re-run passes it on in BENCH_COMMAND)."""
    if os.environ.get("BENCH_COMMAND"):
        return os.environ["BENCH_COMMAND"]
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + args)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def quartiles(xs):
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"),) * 2
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


THREADS_HELP = (
    "torch threads (1: on this shared 2-core machine two OpenMP threads collapse, up to 100x "
    "slower, whenever another job holds a core)"
)


def add_run_args(parser, threads_default=1, smoke_help: str = "a tiny, seconds-long run (the tests)") -> None:
    """The options every bench script takes: threads, smoke mode, where results go."""
    parser.add_argument("--threads", type=int, default=threads_default, help=THREADS_HELP)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--name", default=None, help="results file stem")


def rotated(items: list, k: int) -> list:
    """The k-th rotation of `items`: round k starts with a different variant."""
    k %= max(1, len(items))
    return items[k:] + items[:k]


def fmt(x, digits=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if x != x:
            return "n/a"
        return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"
    return str(x)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def save(name: str, result: dict, table: str, out_dir: str | os.PathLike | None = None) -> Path:
    """bench/results/NAME.json (everything) and NAME.md (the table with its header)."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result.get("machine", {})
    header = (
        f"<!-- {m.get('date')} | {m.get('cpu')} x{m.get('cores')} | torch {m.get('versions', {}).get('torch')}"
        f" | load {m.get('load_average_at_start')} -> {result['load_average_at_end']} -->\n"
        f"`{result.get('command', '')}`\n\n"
    )
    (out / f"{name}.md").write_text(header + table + "\n")
    return out / f"{name}.json"
