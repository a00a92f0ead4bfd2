"""The offline demos (CPU, no hub access): `pace-llm demo [gsm8k | polarity | fashion] [flags]`.

    pace-llm demo [--limit 50] [--steps 24] [--mode full]     # = make demo = python launch/demo.py
    pace-llm demo polarity [--seeds 0 1 2] [--train-size 128] [overrides]   # = python launch/demo_polarity.py
    pace-llm demo fashion [--seeds 0 1 2] [--shots 10] [overrides]          # = python launch/demo_fashion.py

gsm8k (the default, the README's main command): SmolLM2-135M-Instruct, evaluated with vLLM on
held-out GSM-8K problems, trained with PACE under DeepSpeed (2 ranks) on GSM-Symbolic, merged
and evaluated again (pace_llm/demos/gsm8k.py). polarity and fashion: PACE vs the same adapter
without PACE over a few seeds (pace_llm/demos/polarity.py, fashion.py); each has its own
--help.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

from pace_llm.demos.gsm8k import MODES, run

OTHER_DEMOS = {"polarity": "pace_llm.cli.demo_polarity", "fashion": "pace_llm.cli.demo_fashion"}


def parse_args(argv: list[str], prog: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=50, help="held-out test problems to evaluate")
    p.add_argument("--steps", type=int, default=24, help="training steps (global batch 4)")
    p.add_argument("--mode", default="full", choices=MODES)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--output-dir", default="outputs/demo-gsm8k")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """A first argument naming a demo picks it (gsm8k when the first is a flag or absent); the
    rest are that demo's flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = "gsm8k"
    if argv and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    if name in OTHER_DEMOS:
        return importlib.import_module(OTHER_DEMOS[name]).main(argv, prog=f"{prog} {name}" if prog else None)
    if name != "gsm8k":
        print(
            f"{prog or os.path.basename(sys.argv[0])}: error: unknown demo {name!r} "
            f"(choose from gsm8k, {', '.join(OTHER_DEMOS)})",
            file=sys.stderr,
        )
        return 2
    args = parse_args(argv, prog)
    from pace_llm.files import exit_2_on_foreign_folder

    return exit_2_on_foreign_folder(
        run,
        limit=args.limit,
        steps=args.steps,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        output_dir=args.output_dir,
    )
