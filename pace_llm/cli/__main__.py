"""`python -m pace_llm.cli ...` = `pace-llm ...`, for an interpreter whose scripts folder is not
on PATH (launch/serve.sh, the demos' evaluation subprocesses)."""

import sys

from pace_llm.cli import main

if __name__ == "__main__":  # required: vLLM's engine processes re-import the main module
    sys.exit(main())
