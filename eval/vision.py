"""Top-1 accuracy of a fine-tuned image classifier: `pace-llm eval vision`, kept at this path.

python eval/vision.py --model out/merged --data DATA --split test --output eval.json
python eval/vision.py --help         # the flags (pace_llm/cli/eval_vision.py)
"""

from pace_llm.cli.eval_vision import main

if __name__ == "__main__":
    main()
