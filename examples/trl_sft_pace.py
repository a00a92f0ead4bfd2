"""TRL's SFT quick-start with PACE: the two marked lines are all that differ from TRL's.

    pip install "pace-llm[trl]"
    accelerate launch examples/trl_sft_pace.py          # or: python / torchrun / deepspeed
    python examples/trl_sft_pace.py --tiny              # offline smoke run: tiny model and data

PACE adds its noise to the LoRA that TRL builds from `peft_config`, trains with the PACE
loss, and logs `task_loss` and `consistency_loss` next to `loss` to every `report_to`
target. `PaceArguments` also parses from the command line with HfArgumentParser; its
fields are the recipe's `pace:` section (pace_llm/core/pace_config.py).
"""

import sys

from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig

from pace_llm.integrations import PaceArguments, PaceSFTTrainer  # PACE (1 of 2)

model, dataset = "Qwen/Qwen2.5-0.5B-Instruct", "trl-lib/Capybara"
tokenizer = None
if "--tiny" in sys.argv:  # no hub: a tiny chat model and conversations built locally
    import datasets

    from pace_llm.assets.tiny import tiny_arithmetic, tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    train_dataset = datasets.Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in tiny_arithmetic(32)
        ]
    )
else:
    train_dataset = load_dataset(dataset, split="train")

trainer = PaceSFTTrainer(  # PACE (2 of 2): SFTTrainer -> PaceSFTTrainer, plus pace=
    model=model,
    args=SFTConfig(
        **{
            "output_dir": "Qwen2.5-0.5B-SFT-PACE",
            "report_to": "wandb",
            **(dict(max_steps=4, report_to="none", use_cpu=True, bf16=False) if tokenizer else {}),
        }
    ),
    train_dataset=train_dataset,
    processing_class=tokenizer,
    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    pace=PaceArguments(mode="full", lam=3.0, sigma=0.5),  # centred per-logit consistency: BENCHMARKS.md §5
)
trainer.train()
trainer.save_model()  # a PEFT adapter, plus pace_config.json
