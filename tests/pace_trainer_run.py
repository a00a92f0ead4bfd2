"""A PaceTrainer PACE_fast run for tests/test_integrations.py, under torchrun or deepspeed.

    torchrun --nproc_per_node 2 tests/pace_trainer_run.py OUT [--deepspeed CONFIG] [--stop-at N] [--resume]

Writes OUT/log_history.json (rank 0) and OUT/adapter_sum_rank{r}.json (every rank's sum of
its trainable parameters, which must agree across ranks).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import datasets
import transformers

from pace_llm.integrations import PaceArguments, PaceTrainer, cpu_distributed_state
from pace_llm.launcher import exit_now
from pace_llm.tiny import tiny_arithmetic, tiny_model, tiny_tokenizer


def encoded(tokenizer, n: int) -> datasets.Dataset:
    rows = []
    for r in tiny_arithmetic(n):
        prompt = tokenizer(r["question"] + "\n")["input_ids"]
        answer = tokenizer(r["answer"])["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                     "labels": [-100] * len(prompt) + answer})
    return datasets.Dataset.from_list(rows)


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--deepspeed")
    p.add_argument("--stop-at", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    a = p.parse_args()
    state = cpu_distributed_state()  # before TrainingArguments: gloo, or DeepSpeed miscounts ranks on CPU
    tokenizer = tiny_tokenizer()
    args = transformers.TrainingArguments(
        a.out, max_steps=6, per_device_train_batch_size=2, learning_rate=5e-3, logging_steps=1,
        save_steps=3, save_strategy="steps", report_to=[], use_cpu=True, seed=0, deepspeed=a.deepspeed,
        ddp_backend="gloo", dataloader_num_workers=0, disable_tqdm=True)
    trainer = PaceTrainer(model=tiny_model("llama"), args=args, train_dataset=encoded(tokenizer, 8),
                          data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True),
                          callbacks=[StopAt(a.stop_at)] if a.stop_at else None,
                          pace=PaceArguments(mode="fast", lam=0.5, sigma=1.0))
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    out, rank = Path(a.out), trainer.args.process_index
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: each rank holds a shard; sum the whole
        import deepspeed
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gathered:
        total = sum(float(p.detach().double().sum()) for p in params)
    (out / f"adapter_sum_rank{rank}.json").write_text(json.dumps(total))
    if trainer.is_world_process_zero():
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    trainer.close_pace()
    del state


if __name__ == "__main__":
    main()
    exit_now(0)
