"""pace_llm.benchmarks.evaluation: the result files every eval entry point writes, the shared
classification predict loop, and the local formats the one row loader reads."""

import json

import numpy as np
import pytest
import torch

from pace_llm.benchmarks.evaluation import predict_logits, top1_metrics, write_results
from pace_llm.data import load_examples


def test_write_results_json_and_jsonl(tmp_path):
    summary = {"accuracy": 0.5, "n": 2, "settings": {"backend": "hf"}}
    samples = [{"question": "q1", "correct": True}, {"question": "q2", "correct": False, "extracted": None}]
    path = tmp_path / "new" / "eval.json"
    written = write_results(path, summary, samples)
    assert written == tmp_path / "new" / "eval.samples.jsonl"
    assert path.read_text() == json.dumps(summary, indent=2) + "\n"
    assert [json.loads(line) for line in written.read_text().splitlines()] == samples
    # a summary alone, and another record kind (GLUE's FILE.predictions.jsonl)
    assert write_results(tmp_path / "only.json", summary) is None
    assert json.loads((tmp_path / "only.json").read_text()) == summary
    assert not (tmp_path / "only.samples.jsonl").exists()
    preds = write_results(tmp_path / "rte.json", summary, iter([{"idx": 0, "prediction": 1}]), kind="predictions")
    assert preds.name == "rte.predictions.jsonl" and json.loads(preds.read_text()) == {"idx": 0, "prediction": 1}


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_labels": 3})()
        self.proj = torch.nn.Linear(2, 3)

    def forward(self, x):
        return type("Out", (), {"logits": self.proj(x)})()


def test_predict_logits_in_row_order():
    model = _Linear()
    x = torch.randn(7, 2)
    logits = predict_logits(model, ({"x": x[i : i + 3]} for i in range(0, 7, 3)), total=7)
    assert logits.dtype == np.float32 and logits.shape == (7, 3)
    np.testing.assert_allclose(logits, model.proj(x).detach().numpy(), rtol=0, atol=1e-6)
    assert predict_logits(model, iter([])).shape == (0, 3)


def test_top1_metrics():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]]))
    metrics = top1_metrics(logits, np.array([0, 1, 1]))
    assert metrics["top1"] == pytest.approx(2 / 3)
    assert metrics["nll"] == pytest.approx(-(np.log(0.5) + np.log(0.8) + np.log(0.2)) / 3)
    assert metrics["per_class"] == {0: 1.0, 1: 0.5}


def test_load_examples_reads_json_lists_and_tsv(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"sentence": "a b", "label": 1}, {"sentence": "c", "label": 0}]))
    (tmp_path / "d.tsv").write_text("sentence\tlabel\na, b\t1\nc\t0\n")
    for name in ("d.json", "d.tsv"):
        rows = load_examples(str(tmp_path / name), limit=1)
        assert rows[:] == {"sentence": ["a b" if name == "d.json" else "a, b"], "label": [1], "sample_id": [0]}


def test_load_classifier_wants_the_adapters_head(tmp_path):
    import transformers

    import pace_llm
    from pace_llm.assets.tiny import tiny_model
    from pace_llm.benchmarks.evaluation import ModelError, load_classifier

    tiny_model("roberta", num_labels=2).save_pretrained(tmp_path / "base")
    headless = pace_llm.apply_pace(tiny_model("roberta", num_labels=2), pace_llm.PaceConfig(rank=4, train_head=False))
    pace_llm.save_adapter(headless, tmp_path / "adapter")
    cls, base, adapter = transformers.AutoModelForSequenceClassification, tmp_path / "base", tmp_path / "adapter"
    with pytest.raises(ModelError, match="no classification head"):
        load_classifier(cls, base, adapter, num_labels=2)
    with pytest.warns(UserWarning, match="no classification head"):
        model = load_classifier(cls, base, adapter, num_labels=2, require_head=False, device="cpu")
    assert not model.training and model.config.num_labels == 2
    with pytest.raises(ModelError, match="has 2 labels, the task needs 3"):
        load_classifier(cls, base, num_labels=3)


@pytest.mark.parametrize("kind, labels", [("roberta", 3), ("vit", 5)])
def test_a_classifier_from_base_and_adapter_takes_the_adapters_label_count(tmp_path, kind, labels):
    """RoBERTa's head is two layers (dense: hidden x hidden, then out_proj: labels x hidden);
    the label count comes from the last, also when the caller does not pass it."""
    import transformers

    import pace_llm
    from pace_llm.assets.tiny import tiny_model
    from pace_llm.benchmarks.evaluation import adapter_head_shape, load_classifier

    tiny_model(kind, num_labels=2).save_pretrained(tmp_path / "base")  # the base's own head: another size
    trained = pace_llm.apply_pace(tiny_model(kind, num_labels=labels), pace_llm.PaceConfig(rank=2))
    pace_llm.save_adapter(trained, tmp_path / "adapter")
    hidden = trained.config.hidden_size
    assert adapter_head_shape(tmp_path / "adapter") == (labels, hidden)
    auto = {
        "roberta": transformers.AutoModelForSequenceClassification,
        "vit": transformers.AutoModelForImageClassification,
    }[kind]
    assert load_classifier(auto, tmp_path / "base", adapter=tmp_path / "adapter").config.num_labels == labels
