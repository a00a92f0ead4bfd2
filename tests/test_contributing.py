"""CONTRIBUTING.md's "Adding a task kind" and "Adding a causal-LM data format", followed as
written: a toy task kind and a toy data format in a new module (a file in a temporary folder
standing in for pace_llm/tasks/my_task.py), registered in the registries the guide names
(undone after each test), each trained in this process by the one training path
(`pace_llm.training.run`) and exported. A step the library needs but the guide leaves out
fails here, so the guide stays true: change the two together."""

from __future__ import annotations

import importlib
import json
import logging
import signal
import sys

import pytest
import torch.distributed as dist

from pace_llm.assets.tiny import tiny_tokenizer
from pace_llm.config import RecipeError, load_recipe
from pace_llm.data import DataError
from pace_llm.distributed.launcher import free_port
from pace_llm.tasks import TASKS, get_task
from pace_llm.tasks.data_formats import FORMATS, choose_format
from pace_llm.training import run

# The new module, as a contributor writes it (both sections' classes in one file here).
TOY_MODULE = r'''
"""Toys of tests/test_contributing.py: a task kind and a causal-LM data format."""
from __future__ import annotations

import torch
import transformers

from pace_llm.core.outputs import SampleOutputs
from pace_llm.tasks.base import Task, encoded_columns, pad_tokens, require_fields
from pace_llm.tasks.data_formats import ExampleError, Format


class WordCountTask(Task):
    """A text's number of words, regressed by a one-output head (MSE)."""
    name = "word_count"
    auto_class = transformers.AutoModelForSequenceClassification
    needs_num_labels = True
    outputs = SampleOutputs(regression=True)

    def encode(self, examples, source, data=None):
        d = data or self.data
        field = d.text_fields[0]
        require_fields(examples, [field], source)

        def encode_one(example):
            ids = self.tokenizer(example[field], truncation=True, max_length=d.max_length)["input_ids"]
            return {"input_ids": ids, "labels": float(len(example[field].split()))}
        return examples.map(encode_one, remove_columns=encoded_columns(examples))

    def collate(self, samples, train=False):
        return {**pad_tokens(samples, self.pad_id), "labels": torch.tensor([s["labels"] for s in samples])}

    def count_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def model_kwargs(self):
        return {"num_labels": self.model_section.num_labels}


class QuestionAnswerLines(Format):
    """`q` and `a` columns: "Q: <q>" and "A: " are read, the answer and eos are trained on."""
    name = "q_a"

    @classmethod
    def columns(cls, data):
        return ["q", "a"]

    def segments(self, example):
        if example["a"] is None:
            raise ExampleError("a", "is null")
        return [(f"Q: {example['q']}\nA: ", False), (example["a"] + self.tokenizer.eos_token, True)]
'''

# The recipes, each with the command that runs it in its header (step 3 of the task-kind guide).
WORD_COUNT_RECIPE = """\
# The toy task kind: a tiny RoBERTa regresses the word count of generated sentences.
#
#   python launch/train.py word_count.yaml
model:
  name: tiny:roberta
  task: word_count
  num_labels: 1
data:
  train: tiny:sentences
  max_length: 32
"""

Q_A_RECIPE = """\
# The toy data format: a tiny Llama trained on q/a lines.
#
#   python launch/train.py q_a.yaml
model:
  name: tiny:llama
data:
  train: {path}
  format: q_a
  max_length: 64
"""

# 8 examples, 4 per micro-batch, 2 epochs: 4 steps, PACE_fast's targets from step 3 on
QUICK = [
    "data.limit=8",
    "train.micro_batch_size=4",
    "train.epochs=2",
    "train.lr=0.01",
    "pace.mode=fast",
    "deepspeed.zero_stage=0",
    "train.report_to=[]",
]


@pytest.fixture
def toys(tmp_path, monkeypatch):
    """The new module, imported from where it was written."""
    (tmp_path / "contributing_toys.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "contributing_toys", raising=False)
    module = importlib.import_module("contributing_toys")
    monkeypatch.setitem(sys.modules, "contributing_toys", module)  # removed again after the test
    return module


@pytest.fixture(scope="module")
def one_process():
    """`run` in this process as a one-process group (what a plain `python launch/train.py`
    gets), one group for the module (DeepSpeed keeps the first group it saw), and what
    training installs in the process undone afterwards: the group, the launcher's
    environment, the stop signals' handlers and the log handlers."""
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }.items():
            patch.setenv(key, value)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()
    for sig, handler in signals.items():
        signal.signal(sig, handler)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    for handler in [h for h in handlers if h not in root.handlers]:
        root.addHandler(handler)
    root.setLevel(level)


def train(recipe_path, out, *overrides):
    """Train and export as `launch/train.py` does; the merged model is checked against the
    trained one at the end (train.export_check, on by default): (steps logged, the check)."""
    recipe = load_recipe(str(recipe_path), [f"output_dir={out}", *QUICK, *overrides])
    assert run(recipe) == "done"
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return steps, json.loads((out / "export_check.json").read_text())


def check_trained(steps, export_check):
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    consistency = [s["consistency_loss"] for s in steps]
    assert consistency[:2] == [0, 0] and all(c > 0 for c in consistency[2:])  # the cache's targets, epoch 2
    assert export_check["max_abs_logit_diff"] <= export_check["tolerance"]


def test_a_task_kind_added_as_the_guide_says_trains_and_exports(tmp_path, monkeypatch, toys, one_process):
    monkeypatch.setitem(TASKS, "word_count", toys.WordCountTask)  # step 2: its line in TASKS
    recipe = tmp_path / "word_count.yaml"
    recipe.write_text(WORD_COUNT_RECIPE)
    check_trained(*train(recipe, tmp_path / "run"))
    with pytest.raises(RecipeError, match="model.num_labels: expected the number of classes for model.task=word_count"):
        load_recipe(str(recipe), ["model.num_labels=null"])  # needs_num_labels, read by the recipe checks
    with pytest.raises(
        RecipeError,
        match=r"data.packing: expected false for model.task=word_count \(packing is for "
        r"causal_lm\)",
    ):
        load_recipe(str(recipe), ["data.packing=true"])


def test_a_data_format_added_as_the_guide_says_trains_and_exports(tmp_path, monkeypatch, toys, one_process):
    monkeypatch.setitem(FORMATS, "q_a", toys.QuestionAnswerLines)  # its entry in FORMATS
    data = tmp_path / "q_a.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a} + {a}?", "a": str(2 * a)}) + "\n" for a in range(8)))
    recipe = tmp_path / "q_a.yaml"
    recipe.write_text(Q_A_RECIPE.format(path=data))
    check_trained(*train(recipe, tmp_path / "run"))
    auto = load_recipe(str(recipe), ["data.format=auto"]).data
    assert choose_format(auto, ["q", "a", "sample_id"], str(data)) is toys.QuestionAnswerLines  # data.format: auto
    bad = tmp_path / "bad.jsonl"  # an ExampleError names the row and field
    bad.write_text(json.dumps({"q": "1 + 1?", "a": "2"}) + "\n" + json.dumps({"q": "2 + 2?", "a": None}) + "\n")
    with pytest.raises(DataError, match=rf"data {bad}, row 2: field 'a' is null"):
        get_task(load_recipe(str(recipe), [f"data.train={bad}"]), tiny_tokenizer()).datasets()
