"""Show what a recipe trains on, supervised tokens marked: `pace-llm inspect`, kept at this path.

python launch/inspect_data.py recipes/tiny_chat.yaml [section.key=value ...] [--n 3] [--json]
python launch/inspect_data.py --help     # the flags (pace_llm/cli/inspect_data.py)
"""

import sys

from pace_llm.cli.inspect_data import main

if __name__ == "__main__":
    sys.exit(main())
