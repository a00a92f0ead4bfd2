"""PACE inside transformers.Trainer and TRL's SFTTrainer (pace_llm.integrations), and our
trainer's W&B / MLflow writers. Real TRL, DeepSpeed, W&B (offline) and MLflow (file store)."""
from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest
import torch
import transformers

from pace_llm.integrations import PaceArguments, PaceTrainer
from pace_llm.objectives import PaceObjective
from pace_llm.tiny import tiny_arithmetic, tiny_model, tiny_tokenizer
from pace_llm.launcher import script_command
from trainrun import ROOT, env, launch, metrics, shm_segments

sys.path.insert(0, str(ROOT / "tests"))
from pace_trainer_run import encoded  # noqa: E402

trl = pytest.importorskip("trl")


def conversations(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"messages": [{"role": "user", "content": r["question"]},
                                                     {"role": "assistant", "content": r["answer"]}]}
                                       for r in tiny_arithmetic(n)])


def test_pace_arguments_parse_with_hf_argument_parser(tmp_path):
    parser = transformers.HfArgumentParser((trl.SFTConfig, PaceArguments))
    _, pace = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--bf16", "false", "--mode", "fast", "--lam", "0.05",
         "--target_modules", "q_proj", "v_proj", "--no_train_head"])
    assert (pace.mode, pace.lam, pace.target_modules, pace.train_head) == ("fast", 0.05, ["q_proj", "v_proj"], False)
    assert parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--bf16", "false",
                                               "--target_modules", "all-linear"])[1].target_modules == "all-linear"
    defaults = PaceArguments()
    assert (defaults.mode, defaults.lam, defaults.sigma, defaults.rank) == ("full", 0.1, 1.0, 8)  # PaceConfig's
    with pytest.raises(SystemExit):  # choices come from PaceConfig's Literal
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--mode", "fastest"])
    with pytest.raises(ValueError, match="sigma"):  # and its checks
        PaceArguments(sigma=-1.0)


def test_sft_trainer_full_pace_trains_logs_saves_and_merges(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": False}, learning_rate=1e-2,
                         logging_steps=1, report_to=[], bf16=False, use_cpu=True, save_strategy="no",
                         max_length=64, disable_tqdm=True)
    trainer = trl_trainer(args, conversations(8), pace=PaceArguments(mode="full", lam=0.1, sigma=1.0))
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 4 and all("task_loss" in r for r in rows)
    assert max(r["consistency_loss"] for r in rows) > 0  # LoRA B starts at 0: step 1's is 0
    for r in rows:  # loss = task + λ·consistency, averaged over the window's micro-steps
        assert r["loss"] == pytest.approx(r["task_loss"] + 0.1 * r["consistency_loss"], rel=1e-4)

    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    model.train()
    with torch.no_grad():
        noisy = [model(**batch).logits for _ in range(2)]
    assert (noisy[0] - noisy[1]).abs().max() > 1e-4  # noise in training
    model.eval()
    with torch.no_grad():
        clean = model(**batch).logits
        assert torch.equal(clean, model(**batch).logits)  # none in eval
    first, second = trainer.evaluate(conversations(4)), trainer.evaluate(conversations(4))
    assert first["eval_loss"] == second["eval_loss"]

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "adapter" / "pace_config.json").read_text())["lam"] == 0.1
    import peft
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "adapter")).eval()
    merged = trainer.merge_pace().eval()
    assert type(merged) is transformers.LlamaForCausalLM
    with torch.no_grad():
        a, b = reloaded(**batch).logits, merged(**batch).logits
    assert torch.allclose(a, clean, atol=1e-5) and (a - b).abs().max() <= 1e-5


def trl_trainer(args, train_set, **kwargs):
    from pace_llm.integrations import PaceSFTTrainer
    return PaceSFTTrainer(model=kwargs.pop("model", None) or tiny_model("llama"), args=args,
                          train_dataset=train_set, processing_class=tiny_tokenizer(), **kwargs)


def test_sft_trainer_noises_a_peft_config_lora_and_refuses_packing(tmp_path):
    import peft
    from pace_llm import noise_layers
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], bf16=False, use_cpu=True,
                         max_length=64)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl_trainer(args, conversations(4), peft_config=lora, pace=PaceArguments(sigma=0.5))
    sigmas = {n.rsplit(".", 1)[-1]: h.sigma for n, h in noise_layers(trainer.model).items()}
    assert sorted(sigmas) == ["q_proj", "v_proj"] and trainer.model.peft_config["default"].r == 4
    assert all(h.sigma > 0 for h in noise_layers(trainer.model).values())
    packed = trl.SFTConfig(output_dir=str(tmp_path), packing=True, report_to=[], bf16=False, use_cpu=True,
                           max_length=64)
    with pytest.raises(ValueError, match="Per-sample noise for packed rows"):
        trl_trainer(packed, conversations(4), pace=PaceArguments(mode="full"))


def test_pace_trainer_loss_is_pace_objective(tmp_path):
    tokenizer = tiny_tokenizer()
    train_set = encoded(tokenizer, 4)
    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    pace = PaceArguments(mode="full", lam=0.5, sigma=1.0, dropout=0.1)
    trainer = PaceTrainer(model=tiny_model("llama"), args=args, train_dataset=train_set,
                          data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True), pace=pace)
    with torch.no_grad():  # B ≠ 0, or the consistency term is 0 for both
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = trainer.data_collator([train_set[i] for i in range(4)])
    trainer.model.train()
    torch.manual_seed(1)
    ours = trainer.compute_loss(trainer.model, dict(batch))
    torch.manual_seed(1)
    direct = PaceObjective.from_config(pace)(trainer.model, dict(batch))
    assert direct.consistency_loss > 0
    assert torch.equal(ours, direct.loss)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [None, 2, 3])
def test_pace_trainer_fast_two_ranks_resumes_exactly(tmp_path, zero_stage):
    """PACE_fast, 2 gloo ranks (DDP / the Trainer's DeepSpeed ZeRO-2 and ZeRO-3), 8 samples, 6
    steps (3 epochs: targets from epoch 1 on); a run stopped at step 3 and resumed logs the same
    losses as the uninterrupted one, and both ranks hold the same adapter."""
    ds_json = tmp_path / "zero.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": zero_stage}, "train_micro_batch_size_per_gpu": "auto",
                                   "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                                   "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}))

    def run(out, *flags):
        args = [str(out), *flags, *(["--deepspeed", str(ds_json)] if zero_stage else [])]
        cmd = script_command("torchrun", ROOT / "tests" / "pace_trainer_run.py", args, nproc=2)
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        sums = [json.loads((out / f"adapter_sum_rank{r}.json").read_text()) for r in (0, 1)]
        assert sums[0] == sums[1]
        return {r["step"]: (r["loss"], r["task_loss"], r["consistency_loss"])
                for r in json.loads((out / "log_history.json").read_text()) if "task_loss" in r}

    segments_before = shm_segments()
    whole = run(tmp_path / "whole")
    assert shm_segments() <= segments_before  # DeepSpeed's CPU shm all-reduce is not built (cpu_distributed_state)
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]
    assert whole[1][2] == whole[2][2] == 0 and all(whole[s][2] > 0 for s in (3, 4, 5, 6))
    assert run(tmp_path / "split", "--stop-at", "3") == {s: whole[s] for s in (1, 2, 3)}
    assert (tmp_path / "split" / "checkpoint-3" / "pace_cache_rank1.pt").exists()
    resumed = run(tmp_path / "split", "--resume")
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_our_trainer_reports_to_wandb_and_mlflow_offline(tmp_path, monkeypatch):
    out = tmp_path / "run"
    launch("python", out, "train.max_steps=3", "train.report_to=[wandb,mlflow]",
           extra_env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    logged = metrics(out)
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert not (out / "tensorboard").exists()  # report_to replaces the default

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # an offline run is a protobuf log (no reader ships with wandb): the logged values are in it
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for row in logged:
        for key in ("loss", "task_loss", "consistency_loss"):
            assert json.dumps(row[key]).encode() in record, (key, row[key])
    assert (runs[0] / "files" / "training_curves.png").exists()
    assert b"lazy_every" in record  # the recipe as the run's config

    import mlflow
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the writer sets it for its own store
    client = mlflow.MlflowClient((out / "mlruns").absolute().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("pace-llm").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in logged]
    assert json.loads(run.data.params["pace.mode"]) == "full"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["training_curves.png"]
    assert run.info.status == "FINISHED"
