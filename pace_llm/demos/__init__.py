"""Code the demo scripts in launch/ share (their entry points stay there: python launch/demo_*.py).

    pace_vs_lora   train PACE and its LoRA baseline per seed, evaluate, print the comparison
"""
