import sys

from pace_llm.assets.cli import main

sys.exit(main())
