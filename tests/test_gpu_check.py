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

    expected = set(gpu_check.SMOKE_RUNS)
    assert {mode for _, _, mode in expected} == set(gpu_check.MODES) and {m for m, _, _ in expected} == set(
        gpu_check.SMOKE_MODELS
    )
    runs = {(r["model"], r["gradient_checkpointing"], r["mode"]): r for r in result["runs"]}
    assert set(runs) == expected
    for key, r in runs.items():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_memory_gb"] > 0, key
        assert r["time_ratio_to_lora"] > 0 and r["memory_ratio_to_lora"] > 0, key
        if key[2] == gpu_check.BASELINE:
            assert r["time_ratio_to_lora"] == r["memory_ratio_to_lora"] == 1.0

    # the table is printed last, one row per run, with the ratio columns
    table = proc.stdout[proc.stdout.rindex("| model") :].strip().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert {"tokens/s", "step ms", "peak GiB", "time / lora", "memory / lora"} <= set(header)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in table[2:]}
    assert {(m, "on" if gc else "off", mode) for m, gc, mode in expected} == {r[:3] for r in rows}
    assert (tmp_path / "results" / "gpu_check_smoke.md").read_text().count("| ok ") == len(expected)

    export = json.loads((tmp_path / "results" / "gpu_export_check_smoke.json").read_text())
    assert export["passed"] and export["max_abs_logit_diff"] <= export["tolerance"]
    assert "export check" in proc.stdout and "passed" in proc.stdout
