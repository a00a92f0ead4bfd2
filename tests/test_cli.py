"""The `pace-llm` console script (pace_llm/cli): the installed command in a subprocess, as a
user runs it; its help, its errors, a short training run, and launch/serve.sh through it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from trainrun import ROOT, env, metrics

from pace_llm.cli import COMMANDS, EVAL_COMMANDS
from pace_llm.cli.serve import ServeError, plan_server

PACE_LLM = Path(sys.executable).with_name("pace-llm")  # the venv's console script (pip install -e .)

# Each subcommand's --help: the flags of the script it stands for, exactly (argparse usage
# lines), or, for the commands with a hand-written help, text that must be there.
FLAGS = {
    "eval gsm8k": {
        "--model",
        "--adapter",
        "--backend",
        "--base-url",
        "--served-model",
        "--data",
        "--limit",
        "--max-new-tokens",
        "--batch-size",
        "--dtype",
        "--output",
        "--quiet",
    },
    "eval glue": {
        "--task",
        "--model",
        "--adapter",
        "--tokenizer",
        "--data",
        "--hub-config",
        "--split",
        "--text-fields",
        "--label-field",
        "--limit",
        "--batch-size",
        "--max-length",
        "--dtype",
        "--device",
        "--name",
        "--output",
        "--save-predictions",
        "--quiet",
        "--table",
        "--by-task",
    },
    "eval vision": {
        "--model",
        "--adapter",
        "--num-labels",
        "--data",
        "--hub-config",
        "--split",
        "--image-field",
        "--label-field",
        "--image-size",
        "--augment",
        "--limit",
        "--seed",
        "--batch-size",
        "--device",
        "--name",
        "--output",
    },
    "sweep": {
        "--grid",
        "--seeds",
        "--metric",
        "--direction",
        "--sweep-dir",
        "--storage",
        "--study",
        "--launcher",
        "--nproc",
        "--n-trials",
        "--retry-failed",
        "--heartbeat-interval",
        "--grace-period",
    },
    "inspect": {"--n", "--json", "--batches"},
    "demo": {"--limit", "--steps", "--mode", "--max-new-tokens", "--output-dir"},
    "demo polarity": {"--seeds", "--jobs", "--launcher", "--output-dir", "--train-size", "--test-size"},
    "demo fashion": {"--seeds", "--jobs", "--launcher", "--output-dir", "--shots", "--test-per-class"},
}
TEXT = {
    "train": [
        "usage: pace-llm train RECIPE [section.key=value ...]",
        "runs in this process",
        "deepspeed --num_gpus 8 launch/train.py",
        "torchrun --nproc_per_node 8 launch/train.py",
    ],
    "serve": [
        "usage: pace-llm serve MERGED_DIR [PORT] [extra vLLM arguments...]",
        "--dtype",
        "--enforce-eager",
        "VLLM_CPU_KVCACHE_SPACE",
        "--host 0.0.0.0",
    ],
    "eval": [f"  {name}" for name in EVAL_COMMANDS],
}


def pace_llm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    assert PACE_LLM.exists(), f"{PACE_LLM} missing: pip install -e . installs the console script"
    return subprocess.run(
        [str(PACE_LLM), *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=kwargs.pop("timeout", 120),
        **kwargs,
    )


ERRORS = [
    (
        ["trian"],
        "unknown command 'trian' (choose from train, eval, sweep, inspect, serve, demo); did you mean 'train'?",
    ),
    (["eval", "squad"], "pace-llm eval: error: unknown command 'squad' (choose from gsm8k, glue, vision)"),
    (["demo", "mnist"], "unknown demo 'mnist' (choose from gsm8k, polarity, fashion)"),
    ([], "usage: pace-llm <command> [args...]"),
    (["train"], "usage: pace-llm train RECIPE"),
    (["serve", "no-such-folder"], "serve: no-such-folder/config.json not found (expected a merged model folder)"),
]


@pytest.fixture(scope="module")
def ran() -> dict[tuple, subprocess.CompletedProcess]:
    """`pace-llm [COMMAND] --help` for the top level and every command, and the usage errors,
    4 processes at a time (each spends ~1.5 s importing torch through pace_llm)."""
    argvs = [(*c.split(), "--help") for c in ["", *FLAGS, *TEXT]] + [tuple(args) for args, _ in ERRORS]
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(argvs, pool.map(lambda argv: pace_llm(*argv), argvs)))


@pytest.fixture
def helps(ran) -> dict[str, subprocess.CompletedProcess]:
    return {" ".join(argv[:-1]): proc for argv, proc in ran.items() if argv[-1:] == ("--help",)}


def usage_flags(text: str) -> set[str]:
    usage = text.split("\n\n", 1)[0]
    assert usage.startswith("usage: "), text[:500]
    return set(re.findall(r"(--[a-z][a-z-]*)", usage))


def test_top_level_help_lists_every_command_with_its_script(helps):
    proc = helps[""]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "usage: pace-llm <command> [args...]"
    for name in ("train", "eval", "sweep", "inspect", "serve", "demo"):
        line = next((line for line in lines if line.startswith(f"  {name} ")), None)
        assert line is not None, proc.stdout
        assert line.rstrip().endswith(f"({COMMANDS[name].script})") and COMMANDS[name].summary in line


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_subcommand_help_shows_the_scripts_flags(helps, command):
    proc = helps[command]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: pace-llm {command} ")
    assert usage_flags(proc.stdout) == FLAGS[command]


@pytest.mark.parametrize("command", sorted(TEXT))
def test_hand_written_help(helps, command):
    proc = helps[command]
    assert proc.returncode == 0, proc.stderr
    for text in TEXT[command]:
        assert text in proc.stdout, (text, proc.stdout)


@pytest.mark.parametrize("args, message", ERRORS)
def test_usage_errors_exit_2_and_say_why(ran, args, message):
    proc = ran[tuple(args)]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr and proc.stdout == ""


def test_eval_result_is_exit_0(tmp_path):
    """`pace-llm eval glue --table`: a command whose main returns its result dict to Python
    callers exits 0, and prints what eval/glue.py prints."""
    path = tmp_path / "rte.json"
    path.write_text(
        json.dumps(
            {
                "name": "PACE",
                "task": "rte",
                "main_metric": "accuracy",
                "main": 0.75,
                "metrics": {"accuracy": 0.75},
                "n": 10,
            }
        )
    )
    proc = pace_llm("eval", "glue", "--table", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "RTE (Acc)" in proc.stdout and "75.0" in proc.stdout


def test_train_runs_a_recipe_in_one_process(tmp_path):
    """A real (tiny) run: the steps asked for, logged, and the adapter exported."""
    out = tmp_path / "run"
    proc = pace_llm(
        "train", "recipes/tiny.yaml", "train.max_steps=2", "deepspeed.zero_stage=0", f"output_dir={out}", timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "merged" / "config.json").exists()
    assert json.loads((out / "run_status.json").read_text()) == {"status": "done"}


def test_serve_sh_runs_pace_llm_serve(tmp_path):
    """launch/serve.sh keeps its arguments: here, a folder without config.json is refused by
    `python -m pace_llm.cli serve` (the server itself: tests/test_gsm8k_eval.py)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "serve.sh"), str(tmp_path), "8001"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and f"serve: {tmp_path}/config.json not found" in proc.stderr


def test_serve_command_adds_the_defaults_the_user_did_not_set(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    cpu = {"PATH": str(tmp_path), "PYTHON": "/opt/py/bin/python"}  # no nvidia-smi on this PATH: vLLM's CPU build
    server = plan_server([str(tmp_path)], cpu)
    assert server.command == [
        "/opt/py/bin/python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tmp_path),
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--dtype",
        "float32",
        "--enforce-eager",
    ]
    assert server.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    mine = plan_server(
        [str(tmp_path), "8001", "--dtype=bfloat16", "--enforce-eager", "--host", "0.0.0.0"],
        {**cpu, "VLLM_CPU_KVCACHE_SPACE": "4"},
    )
    assert mine.port == "8001" and mine.added == [] and mine.env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert mine.command[-4:] == ["--dtype=bfloat16", "--enforce-eager", "--host", "0.0.0.0"]  # last: theirs win
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "torch.bfloat16"}))
    assert plan_server([str(tmp_path)], cpu).added[:2] == ["--dtype", "bfloat16"]
    with pytest.raises(ServeError, match="config.json not found"):
        plan_server([str(tmp_path / "missing")], cpu)


@pytest.mark.parametrize("demo", [[], ["polarity"], ["fashion"]])
def test_a_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path, demo):
    """Each demo starts by emptying its output folder: one holding someone else's files stops it
    at once (exit 2, the folder named, nothing deleted, nothing prepared)."""
    (tmp_path / "notes.txt").write_text("mine")
    proc = pace_llm("demo", *demo, "--output-dir", str(tmp_path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"{tmp_path} exists and was not made by a pace-llm demo" in proc.stderr and proc.stdout == ""
    assert (tmp_path / "notes.txt").read_text() == "mine"
