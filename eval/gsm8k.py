"""GSM-8K accuracy of a fine-tuned model: `pace-llm eval gsm8k`, kept at this path.

python eval/gsm8k.py --model out/merged --data openai/gsm8k --output out/gsm8k.json
python eval/gsm8k.py --help          # the flags (pace_llm/cli/eval_gsm8k.py)
"""

from pace_llm.cli.eval_gsm8k import main

if __name__ == "__main__":  # required: vLLM spawns its engine processes
    main()
