"""PaceTrainer PACE_fast runs for tests/test_integrations.py, one after another in one launch
(a 2-rank launch's start-up costs more than a tiny run), under torchrun or deepspeed.

    torchrun --nproc_per_node 2 tests/pace_trainer_run.py [--deepspeed CONFIG] RUN [RUN ...]
    RUN: OUT (6 steps) | OUT:stop=N (stopped after step N) | OUT:resume (from OUT's last checkpoint)

Each run writes OUT/log_history.json (rank 0) and OUT/adapter_sum_rank{r}.json (every rank's
sum of its trainable parameters, which must agree across ranks).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
from pathlib import Path

import datasets
import transformers

from pace_llm.assets.tiny import tiny_arithmetic, tiny_model, tiny_tokenizer
from pace_llm.distributed.launcher import exit_now
from pace_llm.integrations import PaceArguments, PaceTrainer, cpu_distributed_state


def encoded(tokenizer, n: int) -> datasets.Dataset:
    rows = []
    for r in tiny_arithmetic(n):
        prompt = tokenizer(r["question"] + "\n")["input_ids"]
        answer = tokenizer(r["answer"])["input_ids"] + [tokenizer.eos_token_id]
        rows.append(
            {
                "input_ids": prompt + answer,
                "attention_mask": [1] * (len(prompt) + len(answer)),
                "labels": [-100] * len(prompt) + answer,
            }
        )
    return datasets.Dataset.from_list(rows)


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(out: str, deepspeed: str | None, stop_at: int | None, resume: bool) -> None:
    """One run on a fresh model and Trainer (which seeds the run as a new process would)."""
    tokenizer = tiny_tokenizer()
    args = transformers.TrainingArguments(
        out,
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        logging_steps=1,
        save_steps=3,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=0,
        deepspeed=deepspeed,
        ddp_backend="gloo",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = PaceTrainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=encoded(tokenizer, 8),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[StopAt(stop_at)] if stop_at else None,
        pace=PaceArguments(mode="fast", lam=0.5, sigma=1.0),
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    rank = trainer.args.process_index
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: each rank holds a shard; sum the whole
        import deepspeed as ds

        gathered = ds.zero.GatheredParameters(params, modifier_rank=None)
    with gathered:
        total = sum(float(p.detach().double().sum()) for p in params)
    folder = Path(out)
    (folder / f"adapter_sum_rank{rank}.json").write_text(json.dumps(total))
    if trainer.is_world_process_zero():
        (folder / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    trainer.close_pace()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="OUT | OUT:stop=N | OUT:resume")
    p.add_argument("--deepspeed")
    p.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    a = p.parse_args()
    state = cpu_distributed_state()  # before TrainingArguments: gloo, or DeepSpeed miscounts ranks on CPU
    for spec in a.runs:
        out, stop, resume = re.fullmatch(r"(.+?)(?::stop=(\d+)|(:resume))?", spec).groups()
        train(out, a.deepspeed, int(stop) if stop else None, resume=bool(resume))
        gc.collect()  # the finished run's engine goes before the next one is built
    del state


if __name__ == "__main__":
    main()
    exit_now(0)
