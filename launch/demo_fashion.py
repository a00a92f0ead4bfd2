"""Offline demo, PACE vs its baseline on few-shot Fashion-MNIST with a small ViT:
`pace-llm demo fashion`, kept at this path.

    python launch/demo_fashion.py [--seeds 0 1 2] [--shots 10] [--jobs 2] [recipe overrides]
    python launch/demo_fashion.py --help     # the flags (pace_llm/cli/demo_fashion.py)
"""

import sys

from pace_llm.cli.demo_fashion import main

if __name__ == "__main__":
    sys.exit(main())
