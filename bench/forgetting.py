"""What a fine-tuned causal LM lost and how far it moved from its base (the study's probes, #23 item 5).

    python bench/forgetting.py --run outputs/study/smollm2_gsm_forms/final-lora/runs/<run>
    python bench/forgetting.py --run RUN --out RUN/probe.json --completions OUT/generic_completions.json

RUN is a training run's folder (recipe.json, merged/); its base is the recipe's model.name. Three
numbers, each a mean per token, written as JSON:

  polarity_nll  NLL of 64 Pang & Lee polarity sentences (pace_llm.assets.polarity_split's test
                rows) as plain text: general English the fine-tuning never saw. Also the base's
                (base_polarity_nll), so the increase is the forgetting.
  kl_to_base    KL(base ‖ tuned) of the next-token distributions along the base model's own greedy
                completions (48 tokens) of 16 generic chat prompts: how much of the model's ordinary
                behaviour changed. The completions are made once and kept in --completions.
  fp_distance   on the run's own training samples (its recipe's data.sample draw), the centred
                per-logit squared difference between tuned and base logits on the answer tokens
                (of at most 32 samples):
                PACE's FP-distance ‖f_θ(x) − f_θ0(x)‖² in the units of pace.consistency=centred_mse.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

GENERIC_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what photosynthesis is in two sentences.",
    "Give me three tips for sleeping better.",
    "What is the capital of France, and what is it known for?",
    "Describe a cat to someone who has never seen one.",
    "How do I make a cup of tea?",
    "Summarize the plot of Romeo and Juliet.",
    "What are the benefits of regular exercise?",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Write a friendly email inviting a colleague to lunch.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a small bakery.",
    "Explain recursion to a beginner programmer.",
    "What should I pack for a weekend camping trip?",
    "Tell me a fun fact about octopuses.",
]
COMPLETION_TOKENS = 48
POLARITY_SENTENCES = 64
TRAIN_SAMPLES = 32  # fp_distance on at most this many (the study's runs train on 12)


def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def base_completions(base, tokenizer, path: Path) -> list[list[int]]:
    """Token ids (prompt + greedy completion) of every generic prompt, made once under a lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return json.loads(path.read_text())["sequences"]
        sequences = []
        for prompt in GENERIC_PROMPTS:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            out = base.generate(
                ids, max_new_tokens=COMPLETION_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
            sequences.append({"prompt_tokens": ids.shape[1], "ids": out[0].tolist()})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"prompts": GENERIC_PROMPTS, "sequences": sequences}))
        os.replace(tmp, path)
        return sequences


@torch.no_grad()
def kl_to_base(base, tuned, sequences) -> float:
    total, count = 0.0, 0
    for seq in sequences:
        ids = torch.tensor([seq["ids"]])
        start = seq["prompt_tokens"] - 1  # the logit at position t predicts token t + 1
        lp_base = F.log_softmax(base(ids).logits[0, start:-1].float(), -1)
        lp_tuned = F.log_softmax(tuned(ids).logits[0, start:-1].float(), -1)
        total += (lp_base.exp() * (lp_base - lp_tuned)).sum().item()
        count += lp_base.shape[0]
    return total / count


@torch.no_grad()
def text_nll(model, tokenizer, texts: list[str]) -> float:
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        logits = model(ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


@torch.no_grad()
def fp_distance(base, tuned, samples) -> float:
    from pace_llm.core.consistency import get_form

    centred = get_form("centred_mse")
    total, count = 0.0, 0
    for sample in samples.select(range(min(TRAIN_SAMPLES, len(samples)))):
        ids = torch.tensor([sample["input_ids"]])
        labels = torch.tensor(sample["labels"] + [-100] * (len(sample["input_ids"]) - len(sample["labels"])))
        answer = labels[1:] != -100  # logits at t predict token t + 1
        f_base = base(ids).logits[0, :-1][answer]
        f_tuned = tuned(ids).logits[0, :-1][answer]
        total += centred(f_tuned, f_base).sum().item()
        count += int(answer.sum())
    return total / count


def training_samples(run: Path):
    """The run's own training samples: its recipe (recipe.json, resolved) through its task."""
    from pace_llm.config import load_recipe
    from pace_llm.models import load_tokenizer
    from pace_llm.tasks import get_task

    recipe = load_recipe(str(run / "recipe.json"))
    task = get_task(recipe, load_tokenizer(recipe.model.name))
    return recipe, task.datasets()[0]


def probe(run: Path, completions: Path) -> dict:
    import datasets

    from pace_llm.assets import polarity_split
    from pace_llm.assets.polarity import read_csv
    from pace_llm.models import load_tokenizer

    datasets.disable_progress_bars()
    recipe, samples = training_samples(run)
    tokenizer = load_tokenizer(recipe.model.name)
    base, tuned = load(recipe.model.name), load(run / "merged")
    sentences = [r["sentence"] for r in read_csv(polarity_split()[2])[:POLARITY_SENTENCES]]
    return {
        "polarity_nll": text_nll(tuned, tokenizer, sentences),
        "base_polarity_nll": text_nll(base, tokenizer, sentences),
        "kl_to_base": kl_to_base(base, tuned, base_completions(base, tokenizer, completions)),
        "fp_distance": fp_distance(base, tuned, samples),
        "n_train_samples": min(TRAIN_SAMPLES, len(samples)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", type=Path, required=True, help="a training run's folder (recipe.json, merged/)")
    p.add_argument("--out", type=Path, help="JSON to write (default: RUN/probe.json)")
    p.add_argument(
        "--completions", type=Path, help="the base's generic completions (default: RUN/../generic_completions.json)"
    )
    args = p.parse_args(argv)
    for need in ("recipe.json", "merged"):
        if not (args.run / need).exists():
            p.error(f"{args.run / need} does not exist: --run takes a finished run's folder")
    torch.manual_seed(0)
    result = probe(args.run, args.completions or args.run.parent / "generic_completions.json")
    out = args.out or args.run / "probe.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
