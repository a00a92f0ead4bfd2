"""launch/train.py under real DeepSpeed (2 gloo ranks on this CPU), with recipes/tiny.yaml."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from trainrun import ROOT, env, eval_losses, free_port, launch, launch_many, metrics, shm_segments

from pace_llm.config import RecipeError, load_recipe, to_dict
from pace_llm.core.outputs import TokenOutputs
from pace_llm.distributed import deepspeed_engine
from pace_llm.tasks import get_task
from pace_llm.training import run
from pace_llm.training.resume import check_resume

pytestmark = pytest.mark.slow
MODES = ["off", "full", "fast", "lazy_half"]
EVAL_15 = ["data.eval_limit=15"]  # odd: one rank's eval shard is padded with a sample that must not count


# ZeRO-3 without `off`: its plain LoRA path is the ZeRO-2 one plus what full/fast/lazy_half exercise
MATRIX = [(2, mode) for mode in MODES] + [(3, mode) for mode in MODES if mode != "off"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank run per (ZeRO stage, mode) of MATRIX and (2, noise), and a full-PACE run
    stopped after step 5 (test_stop_and_resume resumes it): {name: folder}, all made on first use by one
    torchrun launch (tests/train_many.py: a launch's start-up, ~25 s, costs more than a tiny run)."""
    outs = launch_many(
        tmp_path_factory.mktemp("runs"),
        [
            *[
                (f"zero{stage}-{mode}", [f"deepspeed.zero_stage={stage}", f"pace.mode={mode}", *EVAL_15])
                for stage, mode in [*MATRIX, (2, "noise")]
            ],
            ("stopped", ["deepspeed.zero_stage=2", "pace.mode=full", "train.stop_after=5"]),
            # each consistency form where its cached target takes another path than the default
            # centred_mse's: kl through the head, raw_sum through its own Gram form gathered under ZeRO-3
            ("zero3-full-kl", ["deepspeed.zero_stage=3", "pace.mode=full", "pace.consistency=kl", *EVAL_15]),
            ("zero3-fast-raw_sum", ["deepspeed.zero_stage=3", "pace.mode=fast", "pace.consistency=raw_sum", *EVAL_15]),
            (
                "zero2-fast-kl",
                ["deepspeed.zero_stage=2", "pace.mode=fast", "pace.consistency=kl", "data.packing=true", *EVAL_15],
            ),
            ("zero2-neftune", ["deepspeed.zero_stage=2", "pace.mode=off", "train.neftune_alpha=5", *EVAL_15]),
            (
                "zero2-neftune-packed",
                ["deepspeed.zero_stage=2", "pace.mode=off", "train.neftune_alpha=5", "data.packing=true", *EVAL_15],
            ),
            ("eval-schedule", ["deepspeed.zero_stage=2", "train.log_every=3", "train.eval_every=4", *EVAL_15]),
            # train.compile: plain LoRA against zero2-off; full; fast on packed rows (segments)
            *[
                (f"compile-{mode}", ["deepspeed.zero_stage=2", f"pace.mode={mode}", "train.compile=true", *EVAL_15])
                for mode in ("off", "full")
            ],
            (
                "compile-fast-packed",
                ["deepspeed.zero_stage=2", "pace.mode=fast", "data.packing=true", "train.compile=true", *EVAL_15],
            ),
        ],
    )
    return outs


def eval_logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("stage, mode", MATRIX)
def test_deepspeed_two_ranks_trains_and_exports(runs, stage, mode):
    out = runs[f"zero{stage}-{mode}"]
    if stage == 3:
        assert re.search(r"ZeRO-3: model built partitioned \((\d+) of \1 tensors\)", (out / "train.log").read_text())
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    for key in ("step", "epoch", "loss", "task_loss", "consistency_loss", "grad_norm", "lr", "tokens_per_s"):
        assert all(key in r for r in rows), key
    first, last = rows[:4], rows[-4:]
    assert sum(r["task_loss"] for r in last) < sum(r["task_loss"] for r in first) - 0.4  # it learns
    consistency = [r["consistency_loss"] for r in rows]
    if mode == "off":
        assert all(c == 0 for c in consistency)
    elif mode == "fast":  # no target in epoch 0 (steps 1-8), targets from epoch 1 on
        assert all(c == 0 for c in consistency[:8]) and all(c > 0 for c in consistency[8:])
    elif mode == "lazy_half":  # paired on even steps (0-based), plain otherwise
        assert all(c > 0 for c in consistency[2::2]) and all(c == 0 for c in consistency[1::2])
    else:
        assert all(c > 0 for c in consistency[1:])  # step 1: lora_B = 0, so no noise effect yet
    # the calibration signal, measured before the last step (the eval step) on every rank
    ratio = rows[-1].get("consistency_grad_ratio")
    assert (ratio is None) if mode == "off" else (math.isfinite(ratio) and ratio > 0), ratio

    # adapter (PEFT format, never empty under ZeRO-3) and merged folder exist and agree
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert weights and all(v.numel() > 0 for v in weights.values())
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())
    assert json.loads((out / "export_check.json").read_text())["max_abs_logit_diff"] <= 1e-4
    ids = torch.randint(6, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    adapted = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(out / "tiny-base"), out / "adapter"
    )
    assert (eval_logits(merged, ids) - eval_logits(adapted, ids)).abs().max() <= 1e-5
    assert (out / "training_curves.png").stat().st_size > 1000

    # held-out loss before training and once at the end, sharded over the 2 ranks: equal to
    # the merged model's mean answer-token loss over all 15 eval samples, each counted once
    evals = eval_losses(out)
    assert [step for step, _ in evals] == [0, 16] and evals[1][1] < evals[0][1]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "merged")
    task = get_task(load_recipe(str(ROOT / "recipes" / "tiny.yaml"), EVAL_15), tokenizer)
    _, eval_set = task.datasets()
    batch = task.collate([eval_set[i] for i in range(len(eval_set))])
    merged.eval()
    with torch.no_grad():
        rows = TokenOutputs()
        assert evals[1][1] == pytest.approx(rows.loss(rows.forward(merged, batch)).item(), rel=1e-4)
    assert json.loads((out / "run_status.json").read_text()) == {"status": "done"}


@pytest.mark.parametrize("name", ["zero3-full-kl", "zero3-fast-raw_sum", "zero2-fast-kl"])
def test_every_consistency_form_trains_under_zero(runs, name):
    """The forms besides the default centred_mse (kl's PACE_fast target through the frozen head,
    packed too; raw_sum's through its own Gram form, gathered under ZeRO-3) train, and log their
    term and its gradient ratio."""
    rows = metrics(runs[name])
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert sum(r["task_loss"] for r in rows[-4:]) < sum(r["task_loss"] for r in rows[:4]) - 0.4
    consistency = [r["consistency_loss"] for r in rows]
    if "fast" in name:  # targets from epoch 1 (step 9) on
        assert all(c == 0 for c in consistency[:8]) and all(c > 0 for c in consistency[8:])
    else:
        assert all(c > 0 for c in consistency[1:])
    assert math.isfinite(rows[-1]["consistency_grad_ratio"]) and rows[-1]["consistency_grad_ratio"] > 0
    assert json.loads((runs[name] / "recipe.json").read_text())["pace"]["consistency"] == name.split("-")[-1]


@pytest.mark.parametrize("name", ["zero2-neftune", "zero2-neftune-packed"])
def test_neftune_trains_padded_and_packed(runs, name):
    """train.neftune_alpha noises the embeddings in training: the run learns, and its losses
    differ from plain LoRA's from step 1 on (no PACE noise: the embeddings' noise does it)."""
    rows, plain = metrics(runs[name]), metrics(runs["zero2-off"])
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert sum(r["task_loss"] for r in rows[-4:]) < sum(r["task_loss"] for r in rows[:4]) - 0.4
    if "packed" not in name:
        assert rows[0]["loss"] != plain[0]["loss"]
    assert all(r["consistency_loss"] == 0 for r in rows)


@pytest.mark.parametrize("name", ["compile-off", "compile-full", "compile-fast-packed"])
def test_compiled_blocks_train_in_every_mode_without_graph_breaks(runs, name):
    """train.compile (torch.compile of each block, inductor): no graph breaks with PACE's noise,
    paired dropout and packed segments; plain LoRA logs zero2-off's losses (fp32; inductor's
    fused kernels round differently); PACE's modes learn and log their term; the export check passes."""
    rows, log = metrics(runs[name]), (runs[name] / "train.log").read_text()
    assert re.search(r"after step 1: torch.compile: [1-9]\d* graphs, 0 graph breaks", log), log[-3000:]
    assert re.search(r"at the end: torch.compile: \d+ graphs, 0 graph breaks", log)
    assert [r["step"] for r in rows] == list(range(1, 17))
    if name == "compile-off":
        plain = metrics(runs["zero2-off"])
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in plain], rel=1e-4)
    else:
        assert sum(r["task_loss"] for r in rows[-4:]) < sum(r["task_loss"] for r in rows[:4]) - 0.4
        first = 8 if "fast" in name else 1  # PACE_fast: targets from epoch 1 (step 9) on
        assert all(r["consistency_loss"] > 0 for r in rows[first:])
    check = json.loads((runs[name] / "export_check.json").read_text())
    assert check["max_abs_logit_diff"] <= check["tolerance"]


def test_evaluation_keeps_its_schedule_between_log_steps(runs):
    """eval_every 4 with log_every 3: evaluations at 4, 8, 12 and 16 (the last step), each in a
    row of its own step; training rows at every third step and the last."""
    rows = metrics(runs["eval-schedule"])
    assert [step for step, _ in eval_losses(runs["eval-schedule"])] == [0, 4, 8, 12, 16]
    assert [r["step"] for r in rows if "task_loss" in r] == [3, 4, 6, 8, 9, 12, 15, 16]
    ratios = [r["step"] for r in rows if "consistency_grad_ratio" in r]
    assert ratios == [4, 8, 12, 16]  # measured for each evaluation, logged in its row


def test_stop_and_resume_logs_the_same_losses(runs):
    """Full PACE stopped after step 5 under torchrun and resumed under the deepspeed launcher
    (the README's command), against the uninterrupted run: the resumed noise and dropout draws
    are the uninterrupted ones (PACE_fast's resume: the kill test below and test_train_chat)."""
    reference = {r["step"]: r for r in metrics(runs["zero2-full"])}
    out = runs["stopped"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    assert json.loads((out / "run_status.json").read_text()) == {"status": "stopped"}
    assert not (out / "merged").exists()
    launch("deepspeed", out, "deepspeed.zero_stage=2", "pace.mode=full", "resume=true")
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    for r in rows:  # steps 6-16 cross an epoch boundary
        for key in ("loss", "task_loss", "consistency_loss", "lr"):
            assert r[key] == pytest.approx(reference[r["step"]][key], rel=1e-5, abs=1e-6), (r["step"], key)


def test_kill_during_checkpoint_save_leaves_a_resumable_run(runs, tmp_path):
    out = tmp_path / "killed"
    segments_before = shm_segments()
    proc = launch(
        "torchrun",
        out,
        "deepspeed.zero_stage=2",
        "pace.mode=fast",
        check=False,
        script=ROOT / "tests" / "kill_in_save.py",
        extra_env={"KILL_AT_STEP": "8"},
    )
    assert proc.returncode != 0
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000004"  # the save of step 8 never landed
    assert list(checkpoints.glob("step-00000008.tmp-*"))  # its unique temporary folder
    assert shm_segments() <= segments_before  # a killed run leaks no /dev/shm memory (distributed.init_distributed)
    launch("torchrun", out, "deepspeed.zero_stage=2", "pace.mode=fast", "resume=true")
    reference = {r["step"]: r for r in metrics(runs["zero2-fast"])}
    assert [r["step"] for r in metrics(out)] == list(range(1, 17))  # steps 5-8, logged before the kill, once
    final = metrics(out)[-1]
    assert final["loss"] == pytest.approx(reference[16]["loss"], rel=1e-5)
    assert (out / "merged" / "model.safetensors").exists()
    assert not list(checkpoints.glob("step-*.tmp-*"))  # tidied by the resumed run, under its folder lock


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    """Stopped after step 4 with checkpoints at 2 and 4; step 4's RNG/cache file is then
    truncated. The resume warns, continues from step 2, logs steps 3-6 once each, and ends with
    the uninterrupted run's losses."""
    fast = ["deepspeed.zero_stage=0", "pace.mode=fast", "train.max_steps=6", "train.save_every=2"]
    launch("python", tmp_path / "whole", *fast)
    out = tmp_path / "damaged"
    launch("python", out, *fast, "train.stop_after=4")
    damaged = out / "checkpoints" / "step-00000004" / "pace_rank0.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    proc = launch("python", out, *fast, "resume=true")
    assert f"checkpoint {out / 'checkpoints' / 'step-00000004'} failed to load" in proc.stdout + proc.stderr
    assert "at step 2" in proc.stdout + proc.stderr
    rows, whole = metrics(out), metrics(tmp_path / "whole")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["loss"] == pytest.approx(whole[-1]["loss"], rel=1e-5)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / "sigterm"
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "recipes/tiny.yaml",
        f"output_dir={out}",
        "train.max_steps=400",
        "train.save_every=0",
        "deepspeed.zero_stage=0",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        assert proc.poll() is None and time.time() < deadline, (
            proc.stdout.read() if proc.poll() is not None else "timeout"
        )
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    last = metrics(out)[-1]["step"]
    assert last < 400
    assert (out / "checkpoints" / "latest").read_text() == f"step-{last:08d}"
    assert json.loads((out / "run_status.json").read_text()) == {"status": "stopped"}


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "nan"  # lr 1e30: step 1 is finite, its update blows the weights up
    proc = launch(
        "python",
        out,
        "deepspeed.zero_stage=0",
        "train.max_steps=12",
        "train.save_every=1",
        "train.lr=1e30",
        "train.warmup_steps=0",
        check=False,
    )
    assert proc.returncode == 1
    assert "non-finite loss at step" in proc.stderr and "last good checkpoint" in proc.stderr
    rows = metrics(out)
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step-{rows[-1]['step']:08d}"  # the last finite step's checkpoint is intact
    assert (out / "checkpoints" / latest / "pace_rank0.pt").exists()
    assert not (out / "merged").exists()
    assert f"the last good checkpoint, {out / 'checkpoints' / latest}, is finite" in proc.stderr


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """Step 3's update leaves a weight at inf with its loss finite (tests/inf_weights.py): the
    checkpoint due after it is refused by name, so `latest` stays at step 2's finite one."""
    out = tmp_path / "inf"
    proc = launch(
        "python",
        out,
        "deepspeed.zero_stage=0",
        "train.max_steps=5",
        "train.save_every=1",
        check=False,
        script=ROOT / "tests" / "inf_weights.py",
        extra_env={"INF_AT_STEP": "3"},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "the weights after step 3 are not finite (the update diverged): not checkpointed" in proc.stderr
    assert f"the last good checkpoint, {out / 'checkpoints' / 'step-00000002'}, is finite" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002"
    assert not (out / "checkpoints" / "step-00000003").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("pace.lamda=0.1", "unknown recipe key 'pace.lamda' (did you mean pace.lam?)"),  # more in test_config.py
        ("pace.target_modules=[qkv]", "target_modules=['qkv'] matched no linear module of Phi3ForCausalLM"),
        ("data.answer_field=solution", "field 'solution' is missing from the data tiny:arithmetic"),
        ("model.name=/no/such/model", "model.name='/no/such/model': no such folder"),
    ],
)
def test_bad_recipes_fail_fast_naming_the_problem(tmp_path, override, message):
    started = time.time()
    proc = launch("python", tmp_path / "bad", override, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    assert time.time() - started < 120


def test_qlora_nf4_trains_on_cpu(tmp_path):
    import bitsandbytes as bnb

    import pace_llm
    from pace_llm.assets.tiny import tiny_model
    from pace_llm.config import load_recipe
    from pace_llm.tasks import get_task

    tiny_model("llama").save_pretrained(tmp_path / "base")
    recipe = load_recipe("recipes/tiny.yaml", ["model.quantization=nf4"])
    model = get_task(recipe).load_model(tmp_path / "base")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model = pace_llm.apply_pace(model, pace_llm.PaceConfig(rank=4))
    model.train()  # before any forward: the CPU repacking trap of environment.md
    ids = torch.randint(6, 100, (2, 10))
    batch = {"input_ids": ids, "labels": ids.clone(), "sample_id": torch.arange(2)}
    for form in ("raw_sum", "centred_mse", "kl"):  # every consistency form through the 4-bit layers
        model.zero_grad()
        pace_llm.PaceObjective("full", lam=0.01, consistency=form)(model, batch).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), form

    run = tmp_path / "qlora-run"
    launch("python", run, "model.name=tiny:llama", "model.quantization=nf4", "deepspeed.zero_stage=0")
    rows = metrics(run)
    assert sum(r["task_loss"] for r in rows[-4:]) < sum(r["task_loss"] for r in rows[:4]) - 0.4
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "merged")
    assert getattr(merged.config, "quantization_config", None) is None  # dequantized + adapter
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert json.loads((run / "export_check.json").read_text())["max_abs_logit_diff"] < 1e-3


def test_two_node_torchrun_launch(tmp_path):
    """Two `torchrun --nnodes 2 --node_rank {0,1}` launches, one rank each, rendezvous on
    127.0.0.1, as launch/slurm/multi_node.sbatch starts them."""
    out = tmp_path / "two-node"
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                str(ROOT / ".venv" / "bin" / "torchrun") if (ROOT / ".venv").exists() else "torchrun",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(ROOT / "launch" / "train.py"),
                "recipes/tiny.yaml",
                f"output_dir={out}",
                "pace.mode=fast",
                "deepspeed.zero_stage=2",
                "train.fp_distance=true",
            ],
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    # FP-distance to the pre-trained model (paper Fig. 3b): 0 before the adapters move, then > 0
    assert all(r["fp_distance"] >= 0 for r in rows) and rows[-1]["fp_distance"] > 0
    assert (out / "checkpoints" / "latest").read_text() == "step-00000016"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "export_check.json").read_text())["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize(
    "status, srun_rc, requeued, rc", [("stopped", 1, True, 0), ("done", 0, False, 0), (None, 3, False, 3)]
)
def test_slurm_requeues_on_the_runs_status_not_on_the_exit_code(tmp_path, status, srun_rc, requeued, rc):
    """torchrun exits non-zero after forwarding Slurm's SIGUSR1, so multi_node.sbatch decides from
    run_status.json: "stopped" requeues (and the job ends 0), anything else ends with srun's code.
    srun and scontrol are stand-ins on PATH that record their arguments."""
    bin_dir, out = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    out.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho srun "$@" >> {tmp_path}/calls\nexit {srun_rc}\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho scontrol "$@" >> {tmp_path}/calls\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    if status:
        (out / "run_status.json").write_text(json.dumps({"status": status}))
    proc = subprocess.run(
        ["bash", "launch/slurm/multi_node.sbatch", "recipes/tiny.yaml", f"output_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env(PATH=f"{bin_dir}:{os.environ['PATH']}", PACE_PYTHON=sys.executable, SLURM_JOB_ID="77"),
    )
    assert proc.returncode == rc, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("srun --kill-on-bad-exit=1")
    assert (calls[1:] == ["scontrol requeue 77"]) == requeued, calls


def test_slurm_dry_run_prints_one_torchrun_per_node():
    proc = subprocess.run(
        ["bash", "launch/slurm/multi_node.sbatch", "recipes/gsm8k.yaml", "pace.lam=0.05"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env(
            PACE_DRY_RUN="1",
            SLURM_JOB_NODELIST="gpu[07-08]",
            SLURM_NNODES="2",
            SLURM_GPUS_ON_NODE="4",
            SLURM_JOB_ID="1234",
            PACE_PYTHON=sys.executable,
        ),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for rank, (host, line) in enumerate(zip(["gpu07", "gpu08"], lines)):
        assert line.startswith(f"[{host}] ") and "torchrun" in line
        for part in (
            "--nnodes=2",
            "--nproc_per_node=4",
            f"--node_rank={rank}",
            "--master_addr=gpu07",
            "--master_port=29734",
            "SIGUSR1",
            "--shutdown-timeout=280",  # torchrun's 30 s would kill a large checkpoint mid-write
            "launch/train.py recipes/gsm8k.yaml pace.lam=0.05 resume=auto",
        ):
            assert part in line, (part, line)


def test_nodelist_expansion():
    from pace_llm.distributed.slurm import expand_nodelist

    assert expand_nodelist("gpu[01-03,07],login1,cn[9-10]") == [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu07",
        "login1",
        "cn9",
        "cn10",
    ]


def test_fresh_run_refuses_to_overwrite_checkpoints(runs):
    """Before any heavy work (in this process; a RecipeError is exit 2 with its message on the
    command line: test_bad_recipes_fail_fast_naming_the_problem)."""
    out = runs["zero2-off"]
    with pytest.raises(RecipeError, match="holds checkpoints of an earlier run: pass resume=true"):
        run(load_recipe("recipes/tiny.yaml", [f"output_dir={out}", "deepspeed.zero_stage=0"]))
    assert [r["step"] for r in metrics(out)] == list(range(1, 17))  # nothing was touched


def test_resume_true_needs_a_checkpoint_and_auto_decides(runs, tmp_path):
    """resume=true with no checkpoint stops, naming the folder (it used to train from scratch);
    resume=auto starts in a folder without one and resumes one with a checkpoint (a requeued job)."""
    from pace_llm.training import resolve_resume

    def recipe(folder, resume):
        return load_recipe("recipes/tiny.yaml", [f"output_dir={folder}", f"resume={resume}"])

    with pytest.raises(RecipeError, match=f"resume=true, but {tmp_path / 'checkpoints'} has no checkpoint"):
        run(recipe(tmp_path, "true"))
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    assert resolve_resume(recipe(tmp_path, "auto")).resume is False
    assert resolve_resume(recipe(runs["zero2-off"], "auto")).resume is True
    assert resolve_resume(recipe(runs["zero2-off"], "true")).resume is True
    with pytest.raises(RecipeError, match=r"resume: expected bool or one of \['auto'\], got 'sometimes'"):
        recipe(tmp_path, "sometimes")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """One process, ZeRO-0, stopped (and checkpointed) after step 3 of 16."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    launch("python", out, "deepspeed.zero_stage=0", "train.stop_after=3")
    return out


@pytest.mark.parametrize(
    "override, listed",
    [
        ("pace.mode=off", "pace.mode: 'full' -> 'off'"),
        ("train.micro_batch_size=2", "train.micro_batch_size: 4 -> 2"),
        ("train.seed=1", "train.seed: 0 -> 1"),
        ("data.limit=32", "data.limit: None -> 32"),
    ],
)
def test_resume_refuses_a_change_that_breaks_exactness(stopped_run, override, listed):
    """Each change is refused by name (check_resume against the checkpoint's recipe, in this
    process); the first also through launch/train.py, as a user meets it."""
    saved = deepspeed_engine.saved_recipe(stopped_run)
    changed = to_dict(
        load_recipe(
            "recipes/tiny.yaml",
            [f"output_dir={stopped_run}", "deepspeed.zero_stage=0", "train.stop_after=3", "resume=true", override],
        )
    )
    with pytest.raises(RecipeError) as refused:
        check_resume(saved, changed, saved["world_size"], force=False)
    assert "break an exact resume" in str(refused.value) and listed in str(refused.value)
    assert "resume_force=true" in str(refused.value)
    if override == "pace.mode=off":
        proc = launch("python", stopped_run, "deepspeed.zero_stage=0", "resume=true", override, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "break an exact resume" in proc.stderr and listed in proc.stderr and "resume_force=true" in proc.stderr
        assert [r["step"] for r in metrics(stopped_run)] == [1, 2, 3]  # nothing trained, nothing overwritten


def test_resume_force_and_harmless_changes(stopped_run, tmp_path):
    import shutil

    forced = tmp_path / "forced"
    shutil.copytree(stopped_run, forced)
    proc = launch(
        "python",
        forced,
        "deepspeed.zero_stage=0",
        "resume=true",
        "resume_force=true",
        "train.lr=0.005",
        "train.stop_after=5",
    )
    assert "resume_force=true: resuming although the recipe changed (train.lr: 0.01 -> 0.005)" in proc.stdout
    assert [r["step"] for r in metrics(forced)] == [1, 2, 3, 4, 5]
    # logging / eval / save frequencies change silently; the run length with a warning
    proc = launch(
        "python",
        stopped_run,
        "deepspeed.zero_stage=0",
        "resume=true",
        "train.log_every=2",
        "train.save_every=0",
        "train.max_steps=12",
    )
    assert "train.max_steps changed 16 -> 12: the LR schedule changes from the resume point on" in proc.stdout
    assert "break an exact resume" not in proc.stdout + proc.stderr
    assert [r["step"] for r in metrics(stopped_run)] == [1, 2, 3, 4, 6, 8, 10, 12]


def test_noise_mode_trains_with_noise_and_no_consistency(runs):
    """pace.mode=noise: PACE's noise alone (the paper's ablation), against off (σ = 0)."""
    logged = {mode: metrics(runs[f"zero2-{mode}"]) for mode in ("noise", "off")}
    assert all(r["consistency_loss"] == 0.0 for r in logged["noise"])
    assert logged["noise"][0]["loss"] == logged["off"][0]["loss"]  # step 1: adapters at zero, noise acts on 0
    assert all(abs(a["loss"] - b["loss"]) > 1e-6 for a, b in zip(logged["noise"][1:], logged["off"][1:]))
    assert json.loads((runs["zero2-noise"] / "export_check.json").read_text())["max_abs_logit_diff"] <= 1e-4
