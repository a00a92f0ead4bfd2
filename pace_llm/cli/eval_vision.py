"""Top-1 accuracy of a fine-tuned image classifier (merged folder, or base + PACE adapter).

    pace-llm eval vision --model outputs/vtab-cifar100/merged --data DATA --split test --output eval.json
    pace-llm eval vision --model google/vit-base-patch16-224-in21k --adapter outputs/vtab-cifar100/adapter --data DATA
    pace-llm eval vision --model outputs/tiny-vit/merged --data tiny:images        # generated images

(`python eval/vision.py` takes the same flags.) --model alone is a merged folder (the
trainer's OUTPUT_DIR/merged) or any saved AutoModelForImageClassification; with --adapter it
is the base model, and the adapter folder (pace_llm.save_adapter: lora_mul_vpt's
pace_adapter.safetensors or a PEFT LoRA, the classifier head included) is applied on top
through pace_llm.load_adapter.

DATA is anything a recipe's data.train / data.eval accepts (pace_llm.data.load_examples): a hub
dataset id (--hub-config, --split), a local image folder (datasets' imagefolder: DIR/train/<class>/*.png,
DIR/test/<class>/*.png), a local .parquet / .jsonl / .csv, or tiny:images. Columns: an image
(--image-field, default `image`: a PIL image or a uint8 array [H, W] / [H, W, C]) and an integer
class (--label-field, default `label`). Images go through pace_llm.data.pixel_values, the
training preprocessing, at --image-size (default: the model's config.image_size), in
batches, without writing a preprocessed copy. Prints {"name", "n", "top1"}; --output writes
it as JSON (+ per-class accuracy and the mean negative log-likelihood `nll`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args(argv=None, prog=None):
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--model", required=True, help="merged/saved classifier folder, or the base model with --adapter")
    p.add_argument("--adapter", help="adapter folder from pace_llm.save_adapter, on top of --model")
    p.add_argument(
        "--num-labels", type=int, help="classes, with --adapter (default: read from the adapter's classifier weights)"
    )
    p.add_argument("--data", required=True, help="hub dataset id, image folder, local file, or tiny:images")
    p.add_argument("--hub-config", help="hub dataset config")
    p.add_argument("--split", default="test", help="split (default: test)")
    p.add_argument("--image-field", default="image")
    p.add_argument("--label-field", default="label")
    p.add_argument("--image-size", type=int, help="resize to this square (default: the model's config.image_size)")
    p.add_argument(
        "--augment",
        choices=["none", "crop_flip"],
        default="none",
        help="the recipe's data.augment: crop_flip evaluates on the centre crop, as training's held-out batches",
    )
    p.add_argument("--limit", type=int, help="first N examples only")
    p.add_argument("--seed", type=int, default=0, help="train.seed of the run (tiny:images generates from it)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--name", help="run name in the result (default: the adapter's or the model's folder name)")
    p.add_argument("--output", help="FILE.json for the result")
    return p.parse_args(argv)


def evaluate(args) -> dict:
    import numpy as np
    import transformers

    from pace_llm.benchmarks import evaluation
    from pace_llm.data import load_examples

    rows = load_examples(args.data, args.split, args.hub_config, args.limit, seed=args.seed)
    missing = [f for f in (args.image_field, args.label_field) if f not in rows.column_names]
    if missing:
        raise SystemExit(
            f"[vision] field {missing[0]!r} is not in {args.data} (it has: {', '.join(rows.column_names)})"
        )
    labels = np.asarray(rows[args.label_field], dtype=np.int64)
    try:  # --num-labels sizes the adapter's head; a merged folder has its own
        model = evaluation.load_classifier(
            transformers.AutoModelForImageClassification,
            args.model,
            args.adapter,
            num_labels=args.num_labels if args.adapter else None,
            device=args.device,
        )
    except evaluation.ModelError as err:
        raise SystemExit(f"[vision] {err}") from None
    image_size = args.image_size or model.config.image_size
    start = time.time()
    logits = evaluation.predict_images(model, rows, args.image_field, image_size, args.batch_size, args.augment)
    if logits.shape[-1] <= labels.max():
        raise SystemExit(f"[vision] labels go up to {labels.max()} but the model has {logits.shape[-1]} classes")
    result = {
        "name": args.name or Path(args.adapter or args.model).name,
        "n": int(len(labels)),
        **evaluation.top1_metrics(logits, labels),
        "model": args.model,
        "adapter": args.adapter,
        "data": args.data,
        "split": args.split,
        "image_size": image_size,
        "seconds": round(time.time() - start, 3),
    }
    if args.output:
        evaluation.write_results(args.output, result)
    result["logits"] = logits  # for callers in Python; not in the JSON
    result["predictions"] = logits.argmax(-1)
    return result


def main(argv=None, prog=None) -> dict:
    """Evaluate; returns the result (with logits and predictions) for Python callers."""
    result = evaluate(parse_args(argv, prog))
    print(json.dumps({"name": result["name"], "n": result["n"], "top1": round(result["top1"], 4)}))
    return result
