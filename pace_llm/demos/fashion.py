"""Offline demo (`pace-llm demo fashion`): PACE vs its baseline (LoRA_mul + VPT_add), few-shot
Fashion-MNIST, small ViT, CPU. Its base model and data are bench/study.py's too.

1. base model (once, cached in .cache/demo-fashion/): a ViT built from a config (hidden 96,
   4 blocks, 4 heads, MLP 384, patch 4 on 28x28 images: 49 patches + CLS, 0.46M parameters),
   pre-trained in full on the five even classes (T-shirt, pullover, coat, shirt, bag) of the
   Fashion-MNIST training split: 600 steps of 64 images, AdamW lr 1e-3, cosine. Saved without
   its head (a ViTModel, like google/vit-base-patch16-224-in21k), so every run starts a fresh one.
   Fashion-MNIST comes from the Debian package dataset-fashion-mnist (pace_llm.assets).
2. data: the five odd classes (trouser, dress, sandal, sneaker, ankle boot) as labels 0-4;
   per seed, --shots training images per class from the training split; test: the first 200
   test-split images of each class (1,000), fixed. Parquet files with image/label columns.
3. per seed, recipes/demo_fashion.yaml through launch/train.py twice: PACE (full) and the
   baseline (pace.mode=off: the same adapter without noise and consistency), then
   `pace-llm eval vision` top-1 on the 1,000 test images; a table of PACE vs baseline.
Outputs: outputs/demo-fashion/{lora,pace}-s{seed}/ (adapter, merged, metrics, eval.json), results.json.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from pace_llm.demos.pace_vs_lora import run_and_report, seed_jobs
from pace_llm.distributed.launcher import REPO
from pace_llm.files import fresh_dir
from pace_llm.logs import route_logs

RECIPE = REPO / "recipes" / "demo_fashion.yaml"
SOURCE_CLASSES, TARGET_CLASSES = (0, 2, 4, 6, 8), (1, 3, 5, 7, 9)
REMAP = {c: i for i, c in enumerate(TARGET_CLASSES)}  # target class -> label 0-4
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
BASE_NAME = "vit-h96-l4-p4-even"
BASE_VERSION = 1
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR = 600, 64, 1e-3


def vit_config(num_labels: int):
    import transformers

    return transformers.ViTConfig(
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=384,
        image_size=28,
        patch_size=4,
        num_channels=3,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def to_pixels(images):
    """uint8 [N, 28, 28] -> float [N, 3, 28, 28] in [-1, 1]: pace_llm.data.pixel_values at 28x28
    (its resize to the same size is the identity), vectorised."""
    import torch

    x = torch.from_numpy(images).float().div(255).sub(0.5).div(0.5)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def prepare_base(folder: Path) -> Path:
    """The pre-trained base (ViTModel, no head), built once; a marker file says it is complete."""
    from pace_llm.files import prepare_once

    return prepare_once(folder, _pretrain_base, BASE_VERSION)


def _pretrain_base(out: Path) -> dict:
    import numpy as np
    import torch
    import transformers

    from pace_llm import assets

    print(f"[demo] pre-training the base ViT on {len(SOURCE_CLASSES)} source classes (once, ~1-3 min)", flush=True)
    started = time.time()
    images, labels = assets.fashion_mnist("train")
    keep = np.isin(labels, SOURCE_CLASSES)
    x, y = to_pixels(images[keep]), torch.from_numpy(labels[keep] // 2)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(vit_config(len(SOURCE_CLASSES)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.05)
    warmup = 30
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / PRETRAIN_STEPS)))
    )
    g = torch.Generator().manual_seed(0)
    order = torch.cat(
        [torch.randperm(len(x), generator=g) for _ in range(math.ceil(PRETRAIN_STEPS * PRETRAIN_BATCH / len(x)))]
    )
    model.train()
    for step in range(PRETRAIN_STEPS):
        idx = order[step * PRETRAIN_BATCH : (step + 1) * PRETRAIN_BATCH]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"[demo]   pre-training step {step + 1}/{PRETRAIN_STEPS}: loss {loss.item():.3f}", flush=True)
    test_images, test_labels = assets.fashion_mnist("test")
    keep = np.isin(test_labels, SOURCE_CLASSES)
    model.eval()
    with torch.no_grad():
        preds = torch.cat(
            [model(pixel_values=chunk).logits.argmax(-1) for chunk in to_pixels(test_images[keep]).split(500)]
        )
    source_acc = (preds == torch.from_numpy(test_labels[keep] // 2)).float().mean().item()
    model.vit.save_pretrained(out)  # no head: each fine-tuning run initialises its own
    print(
        f"[demo]   base ready: source-class test accuracy {source_acc:.3f} ({time.time() - started:.0f} s)", flush=True
    )
    return {
        "source_classes": [CLASS_NAMES[c] for c in SOURCE_CLASSES],
        "steps": PRETRAIN_STEPS,
        "batch": PRETRAIN_BATCH,
        "source_test_accuracy": round(source_acc, 4),
    }


def write_parquet(path: Path, images, labels) -> Path:
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im) for im in images], "label": [int(v) for v in labels]}, features=features
    )
    tmp = path.with_name(path.name + ".tmp")
    rows.to_parquet(str(tmp))
    tmp.replace(path)
    return path


def prepare_data(folder: Path, seeds: list[int], shots: int, test_per_class: int) -> tuple[Path, dict]:
    import numpy as np

    from pace_llm import assets

    images, labels = assets.fashion_mnist("train")
    test_path = prepare_test(folder, test_per_class)
    train_paths = {}
    for seed in seeds:
        path = folder / f"train-k{shots}-s{seed}.parquet"
        if not path.exists():
            rng = np.random.default_rng(seed)
            idx = np.concatenate(
                [rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in TARGET_CLASSES]
            )
            idx = rng.permutation(idx)
            write_parquet(path, images[idx], [REMAP[v] for v in labels[idx]])
        train_paths[seed] = path
    return test_path, train_paths


def prepare_test(folder: Path, test_per_class: int) -> Path:
    """The first `test_per_class` test-split images of each target class (fixed)."""
    import numpy as np

    from pace_llm import assets

    folder.mkdir(parents=True, exist_ok=True)
    test_images, test_labels = assets.fashion_mnist("test")
    test_idx = np.concatenate([np.flatnonzero(test_labels == c)[:test_per_class] for c in TARGET_CLASSES])
    test_path = folder / f"test-n{len(test_idx)}.parquet"
    if not test_path.exists():
        write_parquet(test_path, test_images[test_idx], [REMAP[v] for v in test_labels[test_idx]])
    return test_path


def prepare_splits(
    folder: Path, pool_per_class: int = 1000, val_per_class: int = 100, test_per_class: int = 200
) -> tuple[Path, Path, Path]:
    """(pool, val, test) parquet files for selecting hyperparameters (bench/study.py): val and
    pool are disjoint random draws per target class from the training split (seed 0), test is
    the demo's. A recipe's data.sample draws its few-shot set from the pool per train.seed."""
    import numpy as np

    from pace_llm import assets

    test_path = prepare_test(folder, test_per_class)
    pool_path = folder / f"pool-k{pool_per_class}.parquet"
    val_path = folder / f"val-k{val_per_class}.parquet"
    if not (pool_path.exists() and val_path.exists()):
        images, labels = assets.fashion_mnist("train")
        rng = np.random.default_rng(0)
        drawn = [
            rng.choice(np.flatnonzero(labels == c), val_per_class + pool_per_class, replace=False)
            for c in TARGET_CLASSES
        ]
        for path, part in (
            (val_path, [d[:val_per_class] for d in drawn]),
            (pool_path, [d[val_per_class:] for d in drawn]),
        ):
            idx = rng.permutation(np.concatenate(part))
            write_parquet(path, images[idx], [REMAP[v] for v in labels[idx]])
    return pool_path, val_path, test_path


def run(args: argparse.Namespace) -> int:
    """The demo: args as pace_llm.cli.demo_fashion parses them (pace_vs_lora.add_common_args'
    seeds, jobs, launcher, output_dir (under the checkout), overrides; shots, test_per_class)."""
    import torch

    from pace_llm import assets

    torch.set_num_threads(1)  # robust on a shared 2-core machine (see pace_llm/demos/pace_vs_lora.py)
    started = time.time()
    out = fresh_dir(REPO / args.output_dir)  # each run starts fresh, in a folder of its own
    route_logs(out, "demo.log")  # library chatter to the file; the terminal shows [demo] lines
    cache = assets.cache_dir() / "demo-fashion"
    base = prepare_base(cache / BASE_NAME)
    test_path, train_paths = prepare_data(cache, args.seeds, args.shots, args.test_per_class)
    batch = min(25, args.shots * len(TARGET_CLASSES))
    eval_cmd = ["-m", "pace_llm.cli", "eval", "vision", "--data", str(test_path), "--batch-size", "250"]
    jobs = seed_jobs(
        args,
        RECIPE,
        out,
        {
            seed: [
                f"model.name={base}",
                f"data.train={train_paths[seed]}",
                f"train.seed={seed}",
                f"train.micro_batch_size={batch}",
            ]
            for seed in args.seeds
        },
        eval_cmd,
    )
    run_and_report(
        jobs,
        args,
        out,
        "top1",
        "top-1",
        "nll",
        f"ViT (0.46M, pre-trained on 5 Fashion-MNIST classes) + LoRA_mul/VPT_add + head, "
        f"{args.shots}-shot on the other 5: top-1 x100 on {5 * args.test_per_class} test images "
        f"(LoRA = pace.mode=off)",
        started,
    )
    return 0
