"""The README's main command (`make demo`, `pace-llm demo`): PACE end to end on a CPU, offline,
in minutes, kept at this path.

    python launch/demo.py [--limit 50] [--steps 24] [--mode full]
    python launch/demo.py --help     # the flags (pace_llm/cli/demo.py; the work: pace_llm/demos/gsm8k.py)
"""

import sys

from pace_llm.cli.demo import main

if __name__ == "__main__":
    sys.exit(main(["gsm8k", *sys.argv[1:]]))
