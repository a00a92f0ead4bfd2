"""The offline demos' work; their command lines are pace_llm/cli/demo*.py (`pace-llm demo`).

gsm8k          the README's main demo (`make demo`): SmolLM2 on GSM-8K, base vs PACE with vLLM
polarity       PACE vs LoRA, few-shot sentence polarity (all-MiniLM-L6-v2)
fashion        PACE vs LoRA_mul + VPT_add, few-shot Fashion-MNIST, small ViT (also bench/study.py's)
pace_vs_lora   train PACE and its LoRA baseline per seed, evaluate, print the comparison
"""
