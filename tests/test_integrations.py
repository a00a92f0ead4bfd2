"""PACE inside transformers.Trainer and TRL's SFTTrainer (pace_llm.integrations), and our
trainer's W&B / MLflow writers. Real TRL, DeepSpeed, W&B (offline) and MLflow (file store)."""

from __future__ import annotations

import json
import subprocess

import datasets
import pytest
import torch
import transformers
from pace_trainer_run import encoded
from trainrun import ROOT, env, launch, metrics, shm_segments

from pace_llm.assets.tiny import tiny_arithmetic, tiny_model, tiny_tokenizer
from pace_llm.core.noisy_lora import NoisyLora, is_fused
from pace_llm.core.objectives import PaceObjective
from pace_llm.core.outputs import TokenOutputs
from pace_llm.core.pace import noise_segments
from pace_llm.core.packing import from_position_ids
from pace_llm.distributed.launcher import script_command
from pace_llm.integrations import PaceArguments, PaceTrainer

trl = pytest.importorskip("trl")


def conversations(n: int, seed: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in tiny_arithmetic(n, seed)
        ]
    )


def test_pace_arguments_parse_with_hf_argument_parser(tmp_path):
    parser = transformers.HfArgumentParser((trl.SFTConfig, PaceArguments))
    _, pace = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--bf16",
            "false",
            "--mode",
            "fast",
            "--lam",
            "0.05",
            "--target_modules",
            "q_proj",
            "v_proj",
            "--no_train_head",
        ]
    )
    assert (pace.mode, pace.lam, pace.target_modules, pace.train_head) == ("fast", 0.05, ["q_proj", "v_proj"], False)
    assert (
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--bf16", "false", "--target_modules", "all-linear"]
        )[1].target_modules
        == "all-linear"
    )
    defaults = PaceArguments()
    assert (defaults.mode, defaults.lam, defaults.sigma, defaults.rank) == (
        "full",
        None,
        1.0,
        8,
    )  # PaceConfig's: λ None = the form's default
    with pytest.raises(SystemExit):  # choices come from PaceConfig's Literal
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--mode", "fastest"])
    with pytest.raises(ValueError, match="sigma"):  # and its checks
        PaceArguments(sigma=-1.0)


def test_sft_trainer_full_pace_trains_logs_saves_and_merges(tmp_path):
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        max_length=64,
        disable_tqdm=True,
    )
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

    return PaceSFTTrainer(
        model=kwargs.pop("model", None) or tiny_model("llama"),
        args=args,
        train_dataset=train_set,
        processing_class=tiny_tokenizer(),
        **kwargs,
    )


def test_sft_trainer_noises_a_peft_config_lora(tmp_path):
    import peft

    from pace_llm import noise_layers

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], bf16=False, use_cpu=True, max_length=64)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl_trainer(args, conversations(4), peft_config=lora, pace=PaceArguments(sigma=0.5))
    sigmas = {n.rsplit(".", 1)[-1]: h.sigma for n, h in noise_layers(trainer.model).items()}
    assert sorted(sigmas) == ["q_proj", "v_proj"] and trainer.model.peft_config["default"].r == 4
    assert all(h.sigma > 0 for h in noise_layers(trainer.model).values())


# TRL's padding-free batches: one row per micro-batch, samples told apart by position_ids
LAYOUTS = {
    "unpacked": dict(max_length=1024),
    "padding_free": dict(padding_free=True, max_length=None),
    "packing": dict(packing=True, max_length=128),
}  # 8 conversations of ~44 tokens: 4 packed rows


def sft_args(out, layout: str, **kwargs) -> trl.SFTConfig:
    """A micro-batch of 8: all 8 conversations (or all their packed rows) in every step."""
    return trl.SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        **LAYOUTS[layout],
        **kwargs,
    )


def logged(trainer, key: str) -> list[float]:
    return [r[key] for r in trainer.state.log_history if "task_loss" in r]


def test_trl_padding_free_batch_reads_as_packed_samples():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=16)
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]},  # a packed row
        {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "seq_lengths": [4]},
    ]
    batch = collate(rows)  # one row: 9 tokens, 7 of padding (position 0 each)
    out = from_position_ids(batch, torch.tensor([10, 11, 12]))
    assert out["segment_index"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2] + [-1] * 7]
    assert out["sample_id"].tolist() == [10, 11, 12] and "attention_mask" not in batch
    assert out["labels"][0, :9].tolist() == [-100, 6, 7, -100, 9, -100, 2, 3, 4]
    assert from_position_ids(batch)["segment_index"].max() == 9  # unnamed: padding tokens are empty samples
    with pytest.raises(ValueError, match="2 sample ids for a batch whose position_ids start 10 samples"):
        from_position_ids(batch, torch.tensor([10, 11]))  # the third sample has labels: not padding
    labelled = {"position_ids": torch.tensor([[0, 1, 2, 0, 1]]), "labels": torch.tensor([[1, 2, 3, 4, 5]])}
    assert from_position_ids(labelled)["labels"].tolist() == [[-100, 2, 3, -100, 5]]  # no target across samples


def test_sft_packed_at_sigma_zero_logs_the_unpacked_losses(tmp_path):
    """padding_free and packing vs unpacked, the same 8 conversations in each step: the same losses
    step by step (off unpacked, full PACE at σ = 0 packed: [x; x] of packed rows) and the same
    held-out loss. mode=noise on packed rows: consistency 0, step 1 the same (LoRA B = 0), then not."""
    held_out = conversations(4, seed=1)

    def run(layout, **pace):
        trainer = trl_trainer(
            sft_args(tmp_path / layout, layout, max_steps=3), conversations(8), pace=PaceArguments(**pace)
        )
        trainer.train()
        return trainer, logged(trainer, "loss")

    unpacked, losses = run("unpacked", mode="off")
    eval_loss = unpacked.evaluate(held_out)["eval_loss"]
    for layout in ("padding_free", "packing"):
        trainer, packed = run(layout, mode="full", sigma=0.0)
        assert (len(trainer.train_dataset) < 8) == (layout == "packing")  # several conversations a row
        assert packed == pytest.approx(losses, rel=1e-5), layout
        assert logged(trainer, "consistency_loss") == [0.0] * 3
        assert trainer.evaluate(held_out)["eval_loss"] == pytest.approx(eval_loss, rel=1e-5), layout
    trainer, noisy = run("packing", mode="noise", sigma=1.0)
    assert logged(trainer, "consistency_loss") == [0.0] * 3
    assert noisy[0] == pytest.approx(losses[0], rel=1e-5)
    assert all(abs(a - b) > 1e-4 for a, b in zip(noisy[1:], losses[1:]))


def test_sft_full_pace_on_packed_rows_draws_noise_per_sample(tmp_path):
    """TRL packing, a peft_config LoRA, gradient checkpointing: positive consistency; in a training
    step every sample of the packed row has its own Z, shared by its tokens and drawn again the
    same in the checkpointed recompute; a sample's logits ignore its row neighbours; eval: no noise."""
    import peft

    args = sft_args(
        tmp_path,
        "packing",
        max_steps=3,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl_trainer(args, conversations(8), peft_config=lora, pace=PaceArguments(mode="full", sigma=1.0))
    trainer.train()
    consistency = logged(trainer, "consistency_loss")
    assert consistency[0] == 0 and min(consistency[1:]) > 0  # step 1: LoRA B = 0, so no noise yet

    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # TRL: one flattened row
    packed = trainer._packed(batch)
    assert len(packed["sample_id"]) == 8
    segment = trainer.pace_objective.forward_batch(packed, 0)["segment_index"]  # [x; x]: 16 samples, 2 rows
    q_proj = trainer.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert is_fused(q_proj)  # PACE's noise inside PEFT's LoRA forward (core/noisy_lora.py)
    seen = []  # (s·Z ⊙ Δh, s·Δh) per forward, read inside the variant (added to zeros: exact)

    class Recording(NoisyLora):
        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            update = NoisyLora.forward(module, active_adapter, x, torch.zeros_like(result))
            clean = module.lora_B[active_adapter](module.lora_A[active_adapter](x)) * module.scaling[active_adapter]
            seen.append((update.detach(), clean.detach()))
            return result + update

    q_proj.lora_variant["default"] = Recording()
    trainer.training_step(trainer.model, batch)
    q_proj.lora_variant["default"] = NoisyLora()
    assert len(seen) == 2 and torch.equal(seen[0][0], seen[1][0])  # forward, then the recompute: the same Z
    noisy, clean = seen[0]
    z = [
        (noisy[segment == k] * clean[segment == k]).sum(0) / clean[segment == k].square().sum(0) for k in range(16)
    ]  # least-squares Z of sample k, per channel
    for k in range(16):
        torch.testing.assert_close(noisy[segment == k], clean[segment == k] * z[k], rtol=1e-4, atol=1e-6)
    assert min((z[k] - z[k + 1]).abs().mean() for k in range(15)) > 0.1  # neighbours: other draws

    rows, model = TokenOutputs(), trainer.model
    changed = dict(packed, input_ids=packed["input_ids"].clone())
    changed["input_ids"][packed["segment_index"] == 1] = 7  # sample 1 rewritten, in the row's middle
    f = []
    for b in (packed, changed):
        torch.manual_seed(0)  # the same draws: noise on, as in training
        with torch.no_grad(), noise_segments(b["segment_index"]):
            out = rows.forward(model, b)
        f.append(out.f.split(out.counts.tolist()))
    assert all(torch.equal(a, b) == (k != 1) for k, (a, b) in enumerate(zip(*f)))  # exactly

    held_out = conversations(4, seed=1)
    assert trainer.evaluate(held_out)["eval_loss"] == trainer.evaluate(held_out)["eval_loss"]


@pytest.mark.parametrize("consistency", ["raw_sum", "kl"])
def test_sft_fast_pace_on_packed_rows_caches_per_sample(tmp_path, consistency):
    """TRL packing, PACE_fast: 4 packed rows, 8 cached samples; one step per epoch, so steps 2
    and 3 read the previous epoch's outputs, sample by sample (kl: through the frozen head)."""
    trainer = trl_trainer(
        sft_args(tmp_path, "packing", max_steps=3),
        conversations(8),
        pace=PaceArguments(mode="fast", lam=0.5, sigma=1.0, consistency=consistency),
    )
    assert len(trainer.train_dataset) < 8 and trainer.pace_cache.sample_ids.tolist() == list(range(8))
    trainer.train()
    consistency = logged(trainer, "consistency_loss")
    assert consistency[0] == 0 and min(consistency[1:]) > 0
    trainer.close_pace()


@pytest.mark.parametrize("consistency", ["raw_sum", "centred_mse", "kl"])
def test_pace_trainer_loss_is_pace_objective(tmp_path, consistency):
    tokenizer = tiny_tokenizer()
    train_set = encoded(tokenizer, 4)
    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    pace = PaceArguments(mode="full", lam=0.5, sigma=1.0, dropout=0.1, consistency=consistency)
    trainer = PaceTrainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=train_set,
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True),
        pace=pace,
    )
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
    assert trainer.pace_objective.form.name == consistency


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [None, 2, 3])
def test_pace_trainer_fast_two_ranks_resumes_exactly(tmp_path, zero_stage):
    """PACE_fast, 2 gloo ranks (DDP / the Trainer's DeepSpeed ZeRO-2 and ZeRO-3), 8 samples, 6
    steps (3 epochs: targets from epoch 1 on); a run stopped at step 3 and resumed logs the same
    losses as the uninterrupted one, and both ranks hold the same adapter."""
    ds_json = tmp_path / "zero.json"
    ds_json.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": zero_stage},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
            }
        )
    )

    whole, split = tmp_path / "whole", tmp_path / "split"
    segments_before = shm_segments()
    # One launch: the whole run, the same run stopped after step 3, then resumed from checkpoint-3
    args = [*(["--deepspeed", str(ds_json)] if zero_stage else []), str(whole), f"{split}:stop=3", f"{split}:resume"]
    cmd = script_command("torchrun", ROOT / "tests" / "pace_trainer_run.py", args, nproc=2)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert shm_segments() <= segments_before  # DeepSpeed's CPU shm all-reduce is not built (cpu_distributed_state)

    def logged(out):
        sums = [json.loads((out / f"adapter_sum_rank{r}.json").read_text()) for r in (0, 1)]
        assert sums[0] == sums[1]
        return {
            r["step"]: (r["loss"], r["task_loss"], r["consistency_loss"])
            for r in json.loads((out / "log_history.json").read_text())
            if "task_loss" in r
        }

    uninterrupted, resumed = logged(whole), logged(split)
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    assert uninterrupted[1][2] == uninterrupted[2][2] == 0 and all(uninterrupted[s][2] > 0 for s in (3, 4, 5, 6))
    assert (split / "checkpoint-3" / "pace_cache_rank1.pt").exists()
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # the resumed run's history carries steps 1-3 over
    for step in (1, 2, 3):  # the stopped run logged these itself
        assert resumed[step] == uninterrupted[step]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_our_trainer_reports_to_wandb_and_mlflow_offline(tmp_path, monkeypatch):
    out = tmp_path / "run"
    launch(
        "python",
        out,
        "train.max_steps=3",
        "train.report_to=[wandb,mlflow]",
        extra_env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
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


def test_transformers_neftune_flag_is_applied_once(tmp_path):
    """TrainingArguments(neftune_noise_alpha=...) keeps working under PaceTrainer: during
    training the embeddings carry transformers' NEFTune hook and no second one of ours
    (train.neftune_alpha is our own trainer's)."""
    from pace_llm.core.neftune import NEFTuneHook

    tokenizer = tiny_tokenizer()
    args = transformers.TrainingArguments(
        str(tmp_path), report_to=[], use_cpu=True, max_steps=1, neftune_noise_alpha=5.0, save_strategy="no"
    )
    trainer = PaceTrainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=encoded(tokenizer, 4),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True),
        pace=PaceArguments(mode="full", lam=0.5, sigma=1.0),
    )
    seen = []

    def probe(module, inputs, output):
        if module.training:
            seen.append([hook for hook in module._forward_hooks.values() if hook is not probe])

    handle = trainer.model.get_input_embeddings().register_forward_hook(probe)
    trainer.train()
    handle.remove()
    assert seen and all(len(hooks) == 1 for hooks in seen), seen
    assert getattr(seen[0][0], "__name__", "") == "neftune_post_forward_hook"
    assert not any(isinstance(hook, NEFTuneHook) for hooks in seen for hook in hooks)
