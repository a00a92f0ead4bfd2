"""`pace-llm demo polarity` and launch/demo_polarity.py: PACE vs LoRA, few-shot sentence
polarity with all-MiniLM-L6-v2, on a CPU (pace_llm/demos/polarity.py).

    pace-llm demo polarity [--seeds 0 1 2] [--train-size 128] [--jobs 2]
                           [recipe overrides for both methods, e.g. train.epochs=20 pace.lam=0.5]
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from pace_llm.demos import polarity
from pace_llm.demos.pace_vs_lora import add_common_args


def parse_args(argv: list[str], prog: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__ + "\n" + polarity.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, "outputs/demo-polarity")
    p.add_argument("--train-size", type=int, default=128, help="training sentences per seed (balanced)")
    p.add_argument("--test-size", type=int, default=1000)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    from pace_llm.files import exit_2_on_foreign_folder

    return exit_2_on_foreign_folder(polarity.run, parse_args(sys.argv[1:] if argv is None else argv, prog))
