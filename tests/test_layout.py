"""The direction of imports (CONTRIBUTING.md, "Where things are"): PACE's core imports only
torch, transformers, peft, the standard library and itself; the library never imports its
entry points; importing the core loads no DeepSpeed, datasets or YAML."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "pace_llm" / "core"
CORE_MAY_IMPORT = {"torch", "transformers", "peft", "pace_llm.core"}


def imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; the tree has no relative imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import of {node.module}"
            names.add(node.module)
    return names


def allowed_in_core(module: str) -> bool:
    top = module.split(".")[0]
    return (
        top in sys.stdlib_module_names
        or top in CORE_MAY_IMPORT
        or any(module == m or module.startswith(m + ".") for m in CORE_MAY_IMPORT)
    )


def test_the_core_imports_only_torch_transformers_peft_and_itself():
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in CORE.glob("*.py") for m in imports(p) if not allowed_in_core(m)}
    assert not bad, "pace_llm/core must import only torch, transformers, peft and itself:\n" + "\n".join(sorted(bad))


def test_the_rule_catches_a_forbidden_import(tmp_path):
    """The check above reads real import statements: a deepspeed import (even a lazy one
    inside a function) is caught, a torch one is not."""
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\n\ndef f():\n    import deepspeed\n    from datasets import load_dataset\n")
    assert sorted(m for m in imports(sample) if not allowed_in_core(m)) == ["datasets", "deepspeed"]


def test_the_library_never_imports_its_entry_points():
    entry_points = ("launch", "eval", "bench", "tests", "examples")
    bad = {
        f"{p.relative_to(ROOT)}: {m}"
        for p in (ROOT / "pace_llm").rglob("*.py")
        for m in imports(p)
        if m.split(".")[0] in entry_points
    }
    assert not bad, "\n".join(sorted(bad))


def test_importing_the_core_loads_no_deepspeed_datasets_or_yaml():
    code = (
        "import sys, pace_llm.core.objectives, pace_llm.core.adapters, pace_llm.core.cache; "
        "print(sorted(m for m in ('deepspeed', 'datasets', 'yaml', 'optuna', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
