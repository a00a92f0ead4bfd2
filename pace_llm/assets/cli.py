"""`python -m pace_llm.assets [all|smollm2|gsm|polarity|minilm|fashion] [--check]`: prepare the
offline assets into the cache and say where they are."""

from __future__ import annotations

import sys

from pace_llm.assets.cache import AssetMissing, cache_dir
from pace_llm.assets.fashion import FASHION_MNIST_ROOT, fashion_mnist
from pace_llm.assets.gsm_symbolic import gsm_symbolic_files
from pace_llm.assets.minilm import minilm_dir
from pace_llm.assets.polarity import polarity_csv
from pace_llm.assets.smollm2 import check_generation, smollm2_dir


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pace_llm.assets", description=f"Prepare the offline assets into the cache ({cache_dir()})."
    )
    choices = ["all", "smollm2", "gsm", "polarity", "minilm", "fashion"]
    # Checked below, not with choices=: argparse (3.11) then refuses an empty list, so a
    # bare `python -m pace_llm.assets` (meaning all) would fail.
    parser.add_argument("assets", nargs="*", metavar="{" + ",".join(choices) + "}")
    parser.add_argument(
        "--check", action="store_true", help="also load SmolLM2 and generate an answer to a GSM-8K question"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.assets if name not in choices]
    if unknown:
        parser.error(f"unknown asset {unknown[0]!r} (choose from {', '.join(choices)})")
    wanted = set(args.assets or ["all"])
    if "all" in wanted:
        wanted = set(choices) - {"all"}
    failed = []
    for name in [c for c in choices if c in wanted]:
        try:
            if name == "smollm2":
                path = smollm2_dir()
                print(f"smollm2   {path}")
                if args.check:
                    check_generation(path)
            elif name == "gsm":
                train, test = gsm_symbolic_files()
                print(
                    f"gsm       {train} ({sum(1 for _ in open(train))} rows)\n"
                    f"          {test} ({sum(1 for _ in open(test))} rows)"
                )
            elif name == "polarity":
                print(f"polarity  {polarity_csv()}")
            elif name == "minilm":
                print(f"minilm    {minilm_dir()}")
            elif name == "fashion":
                try:
                    images, _ = fashion_mnist("test")
                    print(f"fashion   {FASHION_MNIST_ROOT} ({len(images)} test images)")
                except AssetMissing as exc:  # optional: a Debian package, not pip
                    print(f"fashion   not available: {exc}")
                    if "fashion" in args.assets:
                        failed.append(name)
        except AssetMissing as exc:
            print(f"{name:<9} MISSING: {exc}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0
