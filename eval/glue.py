"""GLUE metrics of a fine-tuned classifier, and tables over results: `pace-llm eval glue`,
kept at this path.

    python eval/glue.py --task rte --model out/merged --output out/rte.json
    python eval/glue.py --table out/*.json
    python eval/glue.py --help           # the flags (pace_llm/cli/eval_glue.py)
"""

from pace_llm.cli.eval_glue import main

if __name__ == "__main__":
    main()
