"""GLUE metrics (numpy) against hand-computed values, and eval/glue.py on tiny RoBERTa
classifiers saved with a locally built tokenizer (no hub)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import pace_llm
from pace_llm.assets.tiny import tiny_model
from pace_llm.benchmarks import glue

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- metrics

# preds [1,0,1,1,0] vs refs [1,0,0,1,1]:
#   TP = 2 (idx 0, 3), TN = 1 (idx 1), FP = 1 (idx 2), FN = 1 (idx 4)
P5, R5 = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]


def test_accuracy():
    assert glue.accuracy(P5, R5) == pytest.approx(3 / 5)  # idx 0, 1, 3 correct
    assert glue.accuracy([2, 1, 0], [2, 1, 0]) == 1.0


def test_f1_binary():
    # F1 = 2TP / (2TP + FP + FN) = 4 / (4 + 1 + 1) = 2/3
    assert glue.f1_binary(P5, R5) == pytest.approx(2 / 3)
    # precision 1/1, recall 1/3 -> F1 = 2·1·(1/3) / (1 + 1/3) = 0.5
    assert glue.f1_binary([1, 0, 0, 0], [1, 1, 1, 0]) == pytest.approx(0.5)
    assert glue.f1_binary([0, 0], [0, 0]) == 0.0  # no positives anywhere: 0/0 -> 0


def test_matthews_binary():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2·1 − 1·1) / sqrt(3·3·2·2) = 1/6
    assert glue.matthews_corrcoef(P5, R5) == pytest.approx(1 / 6)
    assert glue.matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert glue.matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    # a constant prediction: denominator 0 -> 0.0 (scikit-learn's convention)
    assert glue.matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0


def test_matthews_multiclass():
    # refs [0,0,1,1,2,2], preds [0,1,1,1,2,0]; confusion (rows true, cols predicted):
    #   [[1,1,0],[0,2,0],[1,0,1]]  t = [2,2,2], p = [2,3,1], c = 4 correct, s = 6
    #   MCC = (c·s − t·p) / sqrt((s² − p·p)(s² − t·t)) = (24 − 12) / sqrt((36 − 14)(36 − 12))
    #       = 12 / sqrt(528) = 0.5222329679
    assert glue.matthews_corrcoef([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(12 / math.sqrt(528))


def test_pearson():
    # x = [1..5], y = [2,4,5,4,5]: dx = [-2,-1,0,1,2], dy = [-2,0,1,0,1]
    #   Σdx·dy = 4 + 0 + 0 + 0 + 2 = 6, Σdx² = 10, Σdy² = 6  ->  r = 6 / sqrt(60) = 0.7745966692
    assert glue.pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(6 / math.sqrt(60))
    assert glue.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(glue.pearson([1, 1, 1], [1, 2, 3]))  # constant side: undefined


def test_rankdata_average_ties():
    assert glue.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert glue.rankdata([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_with_ties():
    # y = [2,4,5,4,5] ranks (average for ties): 2 -> 1; 4,4 -> 2.5; 5,5 -> 4.5
    #   ry = [1,2.5,4.5,2.5,4.5], mean 3: dry = [-2,-0.5,1.5,-0.5,1.5]; rx = [1..5], drx = [-2,-1,0,1,2]
    #   Σ = 4 + 0.5 + 0 − 0.5 + 3 = 7, Σdrx² = 10, Σdry² = 4 + .25 + 2.25 + .25 + 2.25 = 9
    #   rho = 7 / sqrt(90) = 0.7378647874
    assert glue.spearman([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(7 / math.sqrt(90))
    # monotone but not linear: rho = 1, r < 1
    x, y = [1, 2, 3, 4], [1, 10, 100, 1000]
    assert glue.spearman(x, y) == pytest.approx(1.0) and glue.pearson(x, y) < 0.99


def test_compute_metrics_takes_logits_and_labels():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 1.0], [0.5, 0.7], [2.0, 1.0]])  # argmax = P5
    assert glue.compute_metrics("mrpc", logits, R5) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert glue.compute_metrics("cola", P5, R5) == pytest.approx({"mcc": 1 / 6, "accuracy": 0.6})
    stsb = glue.compute_metrics("stsb", np.array([[1.0], [2.0], [3.0], [4.0], [5.0]]), [2, 4, 5, 4, 5])
    assert stsb == pytest.approx({"pearson": 6 / math.sqrt(60), "spearman": 7 / math.sqrt(90)})
    with pytest.raises(ValueError, match="shape"):
        glue.compute_metrics("rte", [1, 0], [1, 0, 1])


def test_task_specs():
    assert set(glue.GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert glue.GLUE_TASKS["stsb"].num_labels == 1 and glue.GLUE_TASKS["stsb"].is_regression
    assert glue.GLUE_TASKS["mnli"].num_labels == 3 and glue.GLUE_TASKS["mnli"].validation_split == "validation_matched"
    assert glue.GLUE_TASKS["qqp"].text_fields == ("question1", "question2")
    assert glue.GLUE_TASKS["qnli"].text_fields == ("question", "sentence")
    assert {t: s.metric for t, s in glue.GLUE_TASKS.items()}["cola"] == "mcc"
    assert glue.glue_task("SST-2") is glue.GLUE_TASKS["sst2"]


# --------------------------------------------------------------------------- eval CLI

WORDS = (
    "the a film movie cat dog runs sleeps good bad great awful plot actor "
    "is was not very quite funny boring long short and but"
).split()


def _rows(n, fields, regression=False, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {f: " ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for f in fields}
        row["label"] = float(np.round(rng.uniform(0, 5), 2)) if regression else int(i % 2)
        rows.append(row)
    return rows


def _tokenizer():
    """A RoBERTa-style word-level tokenizer built here: <s> A </s></s> B </s>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=128,
    )


def _perturb(model, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("eval_glue", REPO / "eval" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_saved_and_reloaded_classifier_identical(tmp_path, cli):
    rows = _rows(23, ("sentence1", "sentence2"))
    data = _write_jsonl(tmp_path / "rte.jsonl", rows)
    model, tok = tiny_model("roberta", num_labels=2).eval(), _tokenizer()
    before = glue.predict(model, tok, glue.GLUE_TASKS["rte"], rows, batch_size=8)
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")

    out = tmp_path / "res" / "rte.json"
    result = cli.main(
        [
            "--task",
            "rte",
            "--model",
            str(tmp_path / "clf"),
            "--data",
            str(data),
            "--batch-size",
            "8",
            "--output",
            str(out),
            "--save-predictions",
            "--quiet",
        ]
    )
    assert np.array_equal(before.argmax(-1), result["outputs"].argmax(-1))
    np.testing.assert_allclose(result["outputs"], before, rtol=0, atol=1e-6)

    saved = json.loads(out.read_text())
    refs = [r["label"] for r in rows]
    assert saved["task"] == "rte" and saved["n"] == 23 and saved["name"] == "clf"
    assert saved["main_metric"] == "accuracy"
    assert saved["metrics"] == pytest.approx(glue.compute_metrics("rte", before, refs))
    assert saved["main"] == saved["metrics"]["accuracy"]
    preds = [json.loads(line) for line in out.with_name("rte.predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == before.argmax(-1).tolist()
    assert [p["label"] for p in preds] == refs


@pytest.mark.parametrize("adapter", ["lora_add", "lora_mul_vpt"])
def test_cli_base_plus_adapter_and_merged(tmp_path, cli, adapter):
    rows = _rows(17, ("sentence",), seed=3)
    data = _write_jsonl(tmp_path / "sst2.jsonl", rows)
    tok = _tokenizer()
    base = tiny_model("roberta", num_labels=2)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")

    model = pace_llm.apply_pace(base, pace_llm.PaceConfig(rank=4, sigma=1.0, adapter=adapter))
    _perturb(model)  # adapter factors and the trained head get non-trivial values
    model.eval()
    expected = glue.predict(model, tok, glue.GLUE_TASKS["sst2"], rows, batch_size=4)
    pace_llm.save_adapter(model, tmp_path / "adapter")

    common = ["--task", "sst2", "--data", str(data), "--batch-size", "4", "--quiet"]
    with_adapter = cli.main(common + ["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")])
    np.testing.assert_allclose(with_adapter["outputs"], expected, rtol=0, atol=1e-5)
    assert with_adapter["name"] == "adapter"

    pace_llm.save_merged(model, tmp_path / "merged", tokenizer=tok)
    merged = cli.main(common + ["--model", str(tmp_path / "merged")])
    np.testing.assert_allclose(merged["outputs"], expected, rtol=0, atol=1e-4)
    assert np.array_equal(merged["outputs"].argmax(-1), expected.argmax(-1))


def test_cli_stsb_regression(tmp_path, cli):
    rows = _rows(19, ("sentence1", "sentence2"), regression=True, seed=5)
    data = _write_jsonl(tmp_path / "stsb.jsonl", rows)
    model = tiny_model("roberta", num_labels=1, problem_type="regression")
    model.save_pretrained(tmp_path / "reg")
    _tokenizer().save_pretrained(tmp_path / "reg")
    result = cli.main(
        ["--task", "stsb", "--model", str(tmp_path / "reg"), "--data", str(data), "--quiet", "--name", "tiny-reg"]
    )
    assert result["outputs"].shape == (19, 1)
    assert set(result["metrics"]) == {"pearson", "spearman"}
    assert result["main"] == pytest.approx(glue.pearson(result["outputs"][:, 0], [r["label"] for r in rows]))


def test_cli_errors(tmp_path, cli):
    model = tiny_model("roberta", num_labels=3)
    model.save_pretrained(tmp_path / "three")
    _tokenizer().save_pretrained(tmp_path / "three")
    data = _write_jsonl(tmp_path / "d.jsonl", _rows(4, ("sentence1", "sentence2")))
    with pytest.raises(SystemExit, match="3 labels"):
        cli.main(["--task", "rte", "--model", str(tmp_path / "three"), "--data", str(data), "--quiet"])
    unlabeled = _write_jsonl(tmp_path / "u.jsonl", [dict(r, label=-1) for r in _rows(4, ("premise", "hypothesis"))])
    with pytest.raises(ValueError, match="label -1"):
        cli.main(["--task", "mnli", "--model", str(tmp_path / "three"), "--data", str(unlabeled), "--quiet"])
    with pytest.raises(ValueError, match="'premise' is not in the data"):
        cli.main(["--task", "mnli", "--model", str(tmp_path / "three"), "--data", str(data), "--quiet"])


def _result(tmp_path, name, task, main):
    spec = glue.GLUE_TASKS[task]
    path = tmp_path / f"{name}-{task}.json"
    path.write_text(
        json.dumps(
            {
                "name": name,
                "task": task,
                "main_metric": spec.metric,
                "main": main,
                "metrics": {spec.metric: main},
                "n": 10,
            }
        )
    )
    return str(path)


def test_table(tmp_path, cli, capsys):
    files = [
        _result(tmp_path, "LoRA", "cola", 0.632),
        _result(tmp_path, "LoRA", "stsb", 0.911),
        _result(tmp_path, "LoRA", "sst2", 0.951),
        _result(tmp_path, "LoRA+PACE", "cola", 0.662),
        _result(tmp_path, "LoRA+PACE", "stsb", 0.920),
        _result(tmp_path, "LoRA+PACE", "sst2", 0.956),
    ]
    table = cli.main(["--table"] + files)["table"]
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "CoLA (MCC)"  # the paper's column order
    assert "STS-B (Pearson)" in lines[0] and "SST-2 (Acc)" in lines[0] and "Avg" in lines[0]
    lora = [c.strip() for c in lines[2].split("|")]
    assert lora == ["LoRA", "63.2", "91.1", "95.1", f"{100 * (0.632 + 0.911 + 0.951) / 3:.1f}"]
    assert lines[3].split("|")[-1].strip() == f"{100 * (0.662 + 0.920 + 0.956) / 3:.1f}"
    assert capsys.readouterr().out.strip() == table.strip()

    by_task = cli.main(["--by-task", "--table"] + files)["table"].splitlines()
    assert [c.strip() for c in by_task[0].split("|")] == ["Task", "LoRA", "LoRA+PACE"]
    assert [c.strip() for c in by_task[2].split("|")] == ["CoLA (MCC)", "63.2", "66.2"]
    assert by_task[-1].split("|")[0].strip() == "Avg"

    # a run missing a task shows "-" and averages over the tasks it has
    partial = glue.format_table([json.loads(Path(files[0]).read_text()), json.loads(Path(files[4]).read_text())])
    assert [c.strip() for c in partial.splitlines()[2].split("|")] == ["LoRA", "63.2", "-", "63.2*"]
    assert partial.splitlines()[-1].startswith("* averaged")


def test_cli_script_runs(tmp_path):
    """The script itself (not only main()): --table from a shell."""
    path = _result(tmp_path, "run", "rte", 0.75)
    done = subprocess.run(
        [sys.executable, str(REPO / "eval" / "glue.py"), "--table", path],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "RTE (Acc)" in done.stdout and "75.0" in done.stdout
