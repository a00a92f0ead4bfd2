"""`pace-llm demo fashion` and launch/demo_fashion.py: PACE vs its baseline (LoRA_mul +
VPT_add), few-shot Fashion-MNIST, small ViT, CPU (pace_llm/demos/fashion.py).

    pace-llm demo fashion [--seeds 0 1 2] [--shots 10] [--jobs 2]
                          [recipe overrides for both methods, e.g. train.epochs=60 pace.sigma=1.5]
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from pace_llm.demos import fashion
from pace_llm.demos.pace_vs_lora import add_common_args


def parse_args(argv: list[str], prog: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__ + "\n" + fashion.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, "outputs/demo-fashion")
    p.add_argument("--shots", type=int, default=10, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=200)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    from pace_llm.files import exit_2_on_foreign_folder

    return exit_2_on_foreign_folder(fashion.run, parse_args(sys.argv[1:] if argv is None else argv, prog))
