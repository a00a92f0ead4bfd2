"""The benchmark scripts (bench/) in their --smoke mode: each runs with one command, writes
its results and prints its table last, with the rows BENCHMARKS.md reports."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pace_llm.distributed.launcher import launch_env

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, script, *args, timeout=600):
    out = tmp_path / "results"
    env = launch_env(threads=None, TMPDIR=tmp_path)  # the scripts set their own threads (--threads)
    cmd = [sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, out


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of the rows of the markdown table printed last (header and rule dropped)."""
    lines = stdout.rstrip().splitlines()
    assert lines and lines[-1].startswith("|"), stdout[-2000:]
    start = len(lines)
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start + 2 :]]


def test_train_overhead_smoke(tmp_path):
    stdout, out = run(tmp_path, "train_overhead.py")
    rows = table_rows(stdout)
    assert [r[0] for r in rows] == ["peft", "off", "noise", "noise_hook", "fast", "fast_nogram", "lazy_half", "full"]
    assert rows[0][3] == "1.000"  # the baseline's ratio to itself
    assert all(float(r[3]) > 0 for r in rows)
    result = json.loads((out / "train_overhead_tiny_cpu_fp32_smoke.json").read_text())
    assert result["memory"]["peft"]["peak_bytes"] > 0 and result["memory"]["fast"]["peak_ratio_to_peft"] > 0


@pytest.mark.slow
def test_train_overhead_deepspeed_smoke(tmp_path):
    stdout, out = run(tmp_path, "train_overhead.py", "--deepspeed", "2")
    rows = table_rows(stdout)
    assert [r[0] for r in rows] == ["peft", "off", "noise", "noise_hook", "fast", "fast_nogram", "lazy_half", "full"]
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)  # plain and ZeRO-2 ratios
    assert (out / "train_overhead_tiny_cpu_fp32_zero2_smoke.json").exists()


def test_cache_size_smoke(tmp_path):
    stdout, out = run(tmp_path, "cache_size.py")
    rows = table_rows(stdout)
    assert [r[0] for r in rows] == ["in memory", "memory-mapped, steady state", "memory-mapped, first epoch"]
    result = json.loads((out / "cache_size_smoke.json").read_text())
    sizes = result["sizes_bytes"]
    ours = [v for k, v in sizes.items() if "ours" in k]
    naive = [v for k, v in sizes.items() if "logits, bf16" in k]
    assert ours and all(n / o == pytest.approx(256 / 64) for o, n in zip(ours, naive))  # V / d


def test_eval_throughput_smoke(tmp_path):
    stdout, _ = run(tmp_path, "eval_throughput.py")
    backends = [r[0] for r in table_rows(stdout)]
    assert backends == (["hf", "vllm"] if importlib.util.find_spec("vllm") else ["hf"])
    if len(backends) == 2:
        assert "4/4 identical completions" in stdout  # greedy fp32: the backends agree


def test_analyses_smoke(tmp_path):
    stdout, out = run(tmp_path, "analyses.py")
    rows = table_rows(stdout)  # (c), the last table
    assert [(r[0], r[1]) for r in rows] == [("16", "lora"), ("16", "pace_full"), ("16", "pace_fast")]
    assert all(0.0 <= float(r[3]) <= 100.0 for r in rows)
    assert "(a) gradient norm" in stdout and "(b) final FP-distance" in stdout
    for plot in ("gradnorm", "fp_distance", "accuracy"):
        assert (out / f"analyses_smoke_{plot}.png").stat().st_size > 0


def test_packing_smoke(tmp_path):
    stdout, out = run(tmp_path, "packing.py")
    rows = table_rows(stdout)
    assert [(r[0], r[1]) for r in rows] == [("gsm", "8"), ("gsm", "2"), ("chat", "8"), ("chat", "2")]
    result = json.loads((out / "packing_smoke.json").read_text())
    for key, r in result["results"].items():
        assert r["packed"]["padding"] <= r["padded"]["padding"], key  # the same samples, fewer pad tokens
        assert r["packed_ratio"] > 0 and r["budget_ratio"] > 0 and r["segment_ratio"] > 0
        assert len(r["segment_ratio_per_round"]) == 2
        raw = result["raw"][key]
        for padded, packed in zip(raw["padded"], raw["packed"], strict=True):
            assert (padded["tokens"], padded["supervised"]) == (packed["tokens"], packed["supervised"])
        for budgeted in raw["budget"]:  # one row of the budget, never over it
            assert budgeted["shape"][0] == 1 and budgeted["tokens"] <= raw["budget_tokens"]


def test_consistency_calibration_smoke(tmp_path):
    """Every form's value and gradient ratio at λ = 1, full and fast, on a tiny Llama: finite
    and positive; the raw sum over the vocabulary pulls hardest, the centred per-logit form
    V times less than the raw sum's squared size would suggest (here V = 256)."""
    _, out = run(tmp_path, "consistency_calibration.py")
    forms = json.loads((out / "consistency_calibration_smoke.json").read_text())["forms"]
    assert set(forms) == {"raw_sum", "centred_mse", "kl"}
    for summary in forms.values():
        for key in ("value_full", "ratio_full", "value_fast", "ratio_fast"):
            assert 0 < summary[key] < float("inf"), (key, summary)
    assert forms["raw_sum"]["ratio_full"] > 10 * forms["centred_mse"]["ratio_full"]
    for summary in forms.values():  # the bf16 cache: a rounding floor above 0, far below the term
        assert 0 < summary["bf16_floor"] < 0.01 * summary["value_fast"], summary
        assert summary["bf16_error"] < 0.01, summary
    assert (out / "consistency_calibration_smoke.md").read_text().count("|") > 20
