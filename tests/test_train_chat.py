"""recipes/tiny_chat.yaml end to end: a weighted two-format chat mixture on 2 DeepSpeed
ranks trains, stops after train.stop_after, resumes exactly, evaluates on held-out chat
data and exports a merged model whose tokenizer carries the recipe's chat template."""

import json
import re

import pytest
import transformers
from chat_data import write
from trainrun import eval_losses, launch, launch_many, metrics

pytestmark = pytest.mark.slow

# Phi-3's shape with eos after the last message: data.chat_template replaces the tiny
# tokenizer's own template, so the export must carry this one.
TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_overrides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    paths = write(folder / "data")
    (folder / "template.jinja").write_text(TEMPLATE)
    return [
        f"data.train=[{{path: {paths['messages']}, format: messages}}, "
        f"{{path: {paths['sharegpt']}, format: sharegpt, weight: 1.5}}]",
        f"data.eval={paths['eval']}",
        f"data.chat_template={folder / 'template.jinja'}",
    ]


def test_chat_mixture_trains_resumes_exactly_and_exports_its_template(tmp_path, chat_overrides):
    """PACE_fast: its cache is keyed by the mixture's sample ids, so an exact resume across the
    epoch boundary checks that they are stable (full PACE's resume: test_train.py)."""
    args = [*chat_overrides, "pace.mode=fast", "train.save_every=0"]
    outs = launch_many(
        tmp_path,
        [("reference", args), ("resumed", [*args, "train.stop_after=5"]), ("resumed", [*args, "resume=true"])],
        recipe="recipes/tiny_chat.yaml",
    )
    reference, out = outs["reference"], outs["resumed"]
    log = (out / "train.log").read_text()
    assert re.search(r"resumed from \S+step-00000005 at step 5", log)  # stop_after checkpointed, resume read it
    assert "48 train samples" in log  # 24 messages + 16 ShareGPT x 1.5
    expected = {r["step"]: r for r in metrics(reference)}
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # steps 7-8: the second epoch (PACE_fast cache)
    for r in rows:
        for key in ("loss", "task_loss", "consistency_loss"):
            assert r[key] == pytest.approx(expected[r["step"]][key], rel=1e-5, abs=1e-6), (r["step"], key)
    evals = eval_losses(out)
    assert evals[0][0] == 0 and evals[-1][0] == 8 and evals[-1][1] < evals[0][1]  # held-out chat loss falls
    merged = transformers.AutoTokenizer.from_pretrained(out / "merged")
    assert merged.chat_template == TEMPLATE


def test_bad_rows_stop_the_run_by_name_or_are_skipped_and_counted(tmp_path):
    """Through launch/train.py, as a user meets it: a null answer names file, row and field
    before any heavy work, with no traceback; data.skip_invalid trains on the good rows."""
    examples = [
        {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(12)
    ]
    examples[5]["messages"][1]["content"] = None
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in examples))
    common = [
        f"data.train={data}",
        "data.format=messages",
        "data.eval=null",
        "deepspeed.zero_stage=0",
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "train.export_check=false",
    ]
    proc = launch("python", tmp_path / "strict", *common, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(data) in proc.stderr and "row 6" in proc.stderr and "content" in proc.stderr, proc.stderr[-2000:]
    assert "trainable parameters" not in proc.stdout  # stopped before the model was adapted
    proc = launch("python", tmp_path / "lenient", *common, "data.skip_invalid=true")
    assert "1 invalid rows skipped" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "lenient")] == [1, 2]
