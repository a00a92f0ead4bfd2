"""bench/gpu_check.sh end to end on this CPU (--cpu-smoke): the path a lent GPU will run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gpu_check  # bench/gpu_check.py (pytest's pythonpath)
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_smoke_measures_every_run_and_passes_the_export_check(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "bench" / "gpu_check.sh"),
            "--cpu-smoke",
            "--out",
            str(tmp_path / "results"),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "results" / "gpu_check_smoke.json").read_text())
    assert result["tests"]["returncode"] == 0 and result["core"]["passed"], (result["tests"], result["core"])
    assert not result["skipped"]

    first = next(iter(gpu_check.SMOKE_MODELS))
    extra = {(first, False, name) for name in gpu_check.SMOKE_EXTRA}
    expected = set(gpu_check.SMOKE_RUNS) | extra
    assert {mode for _, _, mode in gpu_check.SMOKE_RUNS} == set(gpu_check.MODES)
    assert {m for m, _, _ in gpu_check.SMOKE_RUNS} == set(gpu_check.SMOKE_MODELS)
    runs = {(r["model"], r["gradient_checkpointing"], r["mode"]): r for r in result["runs"]}
    assert set(runs) == expected
    for key, r in runs.items():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0, key
        assert r["tokens_per_s_ratio_to_baseline"] > 0 and r["memory_ratio_to_baseline"] > 0, key
        if key[2] == r["baseline"]:
            assert r["tokens_per_s_ratio_to_baseline"] == r["memory_ratio_to_baseline"] == 1.0
        if "varied" not in key[2]:  # rows of exactly seq_len tokens: a step time
            assert r["step_ms"] > 0 and r["time_ratio_to_baseline"] > 0, key
    assert runs[(first, False, "lora_varied_budget")]["baseline"] == "lora_varied_padded"

    # the table is printed last, one row per run, with the ratio columns and the paper's
    table = proc.stdout[proc.stdout.rindex("| model") :].strip().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert {"tokens/s", "step ms", "peak GiB", "mfu", "time / baseline", "paper time / memory"} <= set(header)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in table[2:]}
    assert {(m, "on" if gc else "off", mode) for m, gc, mode in expected} == {r[:3] for r in rows}
    assert (tmp_path / "results" / "gpu_check_smoke.md").read_text().count("| ok ") == len(expected)

    # the interleaved overhead phase: fused noise against the hook (compiled variants on a GPU only)
    overhead = result["overhead"]
    assert overhead["status"] == "ok", overhead
    assert {"peft", "off", "noise", "noise_hook", "full"} == set(overhead["timing"])

    export = json.loads((tmp_path / "results" / "gpu_export_check_smoke.json").read_text())
    assert export["passed"] and export["max_abs_logit_diff"] <= export["tolerance"]
    assert "export check" in proc.stdout and "passed" in proc.stdout
