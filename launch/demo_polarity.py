"""Offline demo, PACE vs LoRA on few-shot sentence polarity: `pace-llm demo polarity`, kept at this path.

python launch/demo_polarity.py [--seeds 0 1 2] [--train-size 128] [--jobs 2] [recipe overrides]
python launch/demo_polarity.py --help    # the flags (pace_llm/cli/demo_polarity.py)
"""

import sys

from pace_llm.cli.demo_polarity import main

if __name__ == "__main__":
    sys.exit(main())
