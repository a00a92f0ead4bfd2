"""GLUE validation metrics of a fine-tuned sequence classifier, and tables over results.

    pace-llm eval glue --task cola --model out/merged --output out/cola.json
    pace-llm eval glue --task rte --model roberta-base --adapter out/adapter --output out/rte.json
    pace-llm eval glue --task sst2 --model DIR --data sst2_dev.jsonl      # local jsonl/csv/tsv/parquet
    pace-llm eval glue --table out/*.json [--by-task]                     # like the paper's Table 5

(`python eval/glue.py` takes the same flags.) --model alone is a merged folder
(pace_llm.save_merged) or any saved classifier; with --adapter it is the base model and the
adapter folder (pace_llm.save_adapter; PEFT LoRA or PACE's lora_mul_vpt, both through
pace_llm.load_adapter) is applied on top. Data: a local file with the task's text fields and
`label`, or a hub dataset id (default nyu-mll/glue, config = the task, split = its validation
split; MNLI: validation_matched). The result JSON holds every metric of the task as
fractions; the table prints main metrics x100.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pace_llm import data
from pace_llm.benchmarks import evaluation, glue


def parse_args(argv=None, prog=None):
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--task", choices=sorted(glue.GLUE_TASKS), help="GLUE task")
    p.add_argument("--model", help="merged/saved classifier folder, or the base model with --adapter")
    p.add_argument("--adapter", help="adapter folder from pace_llm.save_adapter, on top of --model")
    p.add_argument("--tokenizer", help="default: the adapter folder if it has a tokenizer, else --model")
    p.add_argument(
        "--data",
        default="nyu-mll/glue",
        help="local .jsonl/.json/.csv/.tsv/.parquet, or a hub dataset id (default nyu-mll/glue)",
    )
    p.add_argument("--hub-config", help="hub dataset config (default: the task name)")
    p.add_argument("--split", help="hub split (default: the task's validation split)")
    p.add_argument("--text-fields", help="comma-separated text columns (default: the task's)")
    p.add_argument("--label-field", default=None, help="label column (default: label)")
    p.add_argument("--limit", type=int, help="first N examples only")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="truncate inputs (default: the model's limit, at most 512)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--name", help="run name in tables (default: the adapter's or the model's folder name)")
    p.add_argument("--output", help="FILE.json for the result")
    p.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write FILE.predictions.jsonl (prediction, label, raw outputs per example)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--table", nargs="+", metavar="RESULT.json", help="print a table over result files")
    p.add_argument("--by-task", action="store_true", help="table with one row per task (and an Avg row)")
    args = p.parse_args(argv)
    if not args.table and not (args.task and args.model):
        p.error("--task and --model are required (or --table RESULT.json ...)")
    if args.save_predictions and not args.output:
        p.error("--save-predictions needs --output")
    return args


def load_split(args, spec: glue.GlueTask):
    try:
        return data.load_examples(
            args.data, args.split or spec.validation_split, args.hub_config or spec.name, args.limit
        )
    except data.DataError as err:
        raise SystemExit(f"[glue] {err}") from None


def load_model(args, spec: glue.GlueTask):
    import transformers

    try:
        model = evaluation.load_classifier(
            transformers.AutoModelForSequenceClassification,
            args.model,
            args.adapter,
            num_labels=spec.num_labels,
            dtype=args.dtype,
            device=args.device,
            require_head=False,
        )
    except evaluation.ModelError as err:
        raise SystemExit(f"[glue] {err}") from None
    tok_dir = args.tokenizer or (
        args.adapter if args.adapter and (Path(args.adapter) / "tokenizer_config.json").exists() else args.model
    )
    return model, transformers.AutoTokenizer.from_pretrained(tok_dir)


def run_name(args) -> str:
    if args.name:
        return args.name
    return Path(args.adapter or args.model).name


def evaluate(args) -> dict:
    spec = glue.glue_task(args.task)
    rows = load_split(args, spec)
    fields = args.text_fields.split(",") if args.text_fields else None
    glue.text_inputs(spec, rows, fields)  # fail on missing fields or -1 labels
    glue.references_of(spec, rows, args.label_field)  # before loading the model
    model, tokenizer = load_model(args, spec)
    result = glue.evaluate_glue(
        model,
        tokenizer,
        spec,
        rows,
        batch_size=args.batch_size,
        max_length=args.max_length,
        text_fields=fields,
        label_field=args.label_field,
        progress=not args.quiet,
    )
    outputs = result.pop("outputs")
    result = {
        "name": run_name(args),
        **result,
        "model": args.model,
        "adapter": args.adapter,
        "data": args.data,
        "split": None if Path(args.data).is_file() else (args.split or spec.validation_split),
        "settings": {
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "dtype": args.dtype,
            "limit": args.limit,
            "text_fields": fields,
        },
    }
    if args.output:
        predictions = None
        if args.save_predictions:
            columns = zip(
                glue.to_predictions(spec, outputs).tolist(),
                glue.references_of(spec, rows, args.label_field).tolist(),
                outputs.tolist(),
            )
            predictions = ({"idx": i, "prediction": p, "label": r, "outputs": o} for i, (p, r, o) in enumerate(columns))
        evaluation.write_results(args.output, result, predictions, kind="predictions")
        print(f"[glue] wrote {args.output}", file=sys.stderr)
    result["outputs"] = outputs  # for callers in Python; not in the JSON
    return result


def main(argv=None, prog=None) -> dict:
    """Evaluate (or print --table); returns the result, or {"table": text}, for Python callers."""
    args = parse_args(argv, prog)
    if args.table:
        results = [json.loads(Path(f).read_text()) for f in args.table]
        table = glue.format_table(results, by_task=args.by_task)
        print(table)
        return {"table": table}
    result = evaluate(args)
    print(
        json.dumps(
            {
                "name": result["name"],
                "task": result["task"],
                "n": result["n"],
                **{k: round(v, 4) for k, v in result["metrics"].items()},
            }
        )
    )
    return result
