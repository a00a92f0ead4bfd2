"""Data for the trainer: answer-only labels, chat template, collation, clear field errors."""

import json

import pytest
import torch

from pace_llm.assets.tiny import tiny_tokenizer
from pace_llm.config import RecipeError, load_recipe
from pace_llm.data import DataError, load_examples, render_prompt
from pace_llm.distributed import deepspeed_engine
from pace_llm.tasks import get_task
from pace_llm.tasks.causal_lm import tokenize_sft
from pace_llm.tasks.classification import tokenize_classification

TEMPLATE = "Q: {question}"


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps(r) + "\n" for r in examples))
    return str(path)


def test_labels_cover_exactly_the_answer_tokens(tmp_path):
    tok = tiny_tokenizer()
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "2"}]))
    ex = tokenize_sft(examples, tok, TEMPLATE, "answer", 512)[0]
    prompt = render_prompt(tok, "Q: 1+1?")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    answer = tok.decode([t for t in ex["labels"] if t != -100])
    assert answer == "2<|end|>\n"  # the assistant turn, end-of-turn token included
    assert tok.decode(ex["input_ids"]) == prompt + answer
    assert ex["sample_id"] == 0


def test_plain_prompt_without_chat_template_ends_with_eos(tmp_path):
    tok = tiny_tokenizer(chat_template=False)
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"question": "x", "answer": "7"}]))
    ex = tokenize_sft(examples, tok, TEMPLATE, "answer", 512)[0]
    assert tok.decode([t for t in ex["labels"] if t != -100]) == "7<|endoftext|>"


def test_truncation_keeps_ids_stable_and_drops_empty_answers(tmp_path):
    tok = tiny_tokenizer()
    examples = load_examples(
        write_jsonl(
            tmp_path / "d.jsonl", [{"question": "q" * 200, "answer": "a"}, {"question": "short", "answer": "b"}]
        )
    )
    out = tokenize_sft(examples, tok, TEMPLATE, "answer", 64)
    assert [r["sample_id"] for r in out] == [1]  # the first lost its answer; ids unchanged


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_missing_field_names_field_and_file(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        path.write_text("question,solution\nq,s\n")
    else:
        write_jsonl(path, [{"question": "q", "solution": "s"}])
    with pytest.raises(DataError) as err:
        tokenize_sft(load_examples(str(path)), tiny_tokenizer(), TEMPLATE, "answer", 64, source=str(path))
    assert f"field 'answer' is missing from the data {path}" in str(err.value)
    assert "question, solution" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="data file .*nope.jsonl does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_file_suffixes_in_any_case_and_compressed_are_files_not_hub_ids(tmp_path):
    import gzip

    rows = [{"question": "q", "answer": "a"}]
    upper = write_jsonl(tmp_path / "train.JSONL", rows)
    packed = tmp_path / "train.jsonl.gz"
    packed.write_bytes(gzip.compress(json.dumps(rows[0]).encode() + b"\n"))
    for path in (upper, str(packed)):
        assert load_examples(path)[0] == {**rows[0], "sample_id": 0}
    with pytest.raises(DataError, match="data file .*missing.jsonl.gz does not exist"):
        load_examples(str(tmp_path / "missing.jsonl.gz"))


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "q", "sample_id": 7}\n', "has a column 'sample_id', the name pace-llm gives"),
        ("a,b\n1,2\n3,4,5,6\n", "could not be read as csv: .*Expected 2 fields in line 3, saw 4"),
        ("not parquet at all", "could not be read as parquet: Parquet magic bytes not found"),
    ],
)
def test_unreadable_data_is_named(tmp_path, content, message):
    suffix = {"a": ".csv", "n": ".parquet"}.get(content[0], ".jsonl")
    path = tmp_path / f"train{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(str(path))


def test_an_unknown_hub_id_is_named():
    with pytest.raises(DataError, match="data 'no-such-user/no-such-dataset' is neither a local file"):
        load_examples("no-such-user/no-such-dataset")


def test_collator_pads_right_and_masks_labels():
    samples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "sample_id": 3},
        {"input_ids": [8], "labels": [8], "sample_id": 9},
    ]
    batch = get_task(load_recipe(None, ["model.task=causal_lm"])).collate(samples)  # no tokenizer: pad id 0
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["sample_id"].tolist() == [3, 9]


def test_classification_examples_and_pairs(tmp_path):
    tok = tiny_tokenizer()
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"s1": "a b", "s2": "c", "label": 1}]))
    ex = tokenize_classification(examples, tok, ["s1", "s2"], "label", 32)[0]
    assert ex["labels"] == 1 and len(ex["input_ids"]) >= 4
    task = get_task(load_recipe(None, ["model.task=seq_cls", "model.num_labels=2"]), tok)
    batch = task.collate(list(tokenize_classification(examples, tok, ["s1"], "label", 32)))
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (1,)


def test_data_sample_draws_a_class_balanced_set_per_seed(tmp_path):
    examples = [{"sentence": f"s{i}", "label": int(i % 4 == 0)} for i in range(40)]  # 10 of class 1, 30 of 0
    path = write_jsonl(tmp_path / "pool.jsonl", examples)

    def drawn(seed, sample=8, classes=2):
        recipe = load_recipe(
            None,
            [
                "model.task=seq_cls",
                f"model.num_labels={classes}",
                f"data.train={path}",
                f"data.sample={sample}",
                f"train.seed={seed}",
            ],
        )
        train = get_task(recipe, tiny_tokenizer()).load_mixture("train")
        return train["sample_id"], [examples[i]["label"] for i in train["sample_id"]]

    ids, labels = drawn(0)
    assert len(ids) == 8 and sorted(labels) == [0] * 4 + [1] * 4  # balanced; ids = rows of the pool
    assert drawn(0)[0] == ids and drawn(1)[0] != ids  # the same set for a seed, another for another seed
    assert len(drawn(0, 30, classes=1)[0]) == 30  # regression: a plain random draw
    with pytest.raises(DataError, match="data.sample=7 does not split evenly over the 2 classes"):
        drawn(0, 7)
    with pytest.raises(DataError, match="needs 11 rows of class 1 in .*pool.jsonl, which has 10"):
        drawn(0, 22)
    with pytest.raises(RecipeError, match="data.sample: expected null with a list of data.train sources"):
        load_recipe(None, [f"data.train=[{{path: {path}}}]", "data.sample=8"])


def test_deepspeed_config_from_recipe_and_from_json(tmp_path):
    recipe = load_recipe(
        None,
        [
            "deepspeed.zero_stage=3",
            "train.micro_batch_size=2",
            "train.gradient_accumulation=4",
            "model.dtype=bf16",
            "train.grad_clip=1.0",
        ],
    )
    config = deepspeed_engine.build_config(recipe, world=8)
    assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}
        )
    )
    recipe = load_recipe(None, [f"deepspeed.config={path}", "train.micro_batch_size=2"])
    config = deepspeed_engine.build_config(recipe, world=2)
    assert config["train_batch_size"] == 4 and config["zero_optimization"] == {"stage": 1}
    path.write_text(json.dumps({"train_batch_size": 32}))
    with pytest.raises(RecipeError, match="train_batch_size=32 but the recipe and world size"):
        deepspeed_engine.build_config(recipe, world=2)
    with pytest.raises(RecipeError, match="offload_params needs deepspeed.zero_stage=3"):
        deepspeed_engine.build_config(load_recipe(None, ["deepspeed.offload_params=true"]), world=1)


@pytest.mark.parametrize("label, shown", [(2, "2"), (-1, "-1"), ("pos", "'pos'")])
def test_a_class_label_outside_num_labels_is_named(tmp_path, label, shown):
    path = write_jsonl(tmp_path / "train.jsonl", [{"sentence": "good", "label": 1}, {"sentence": "x", "label": label}])
    recipe = load_recipe("recipes/tiny_cls.yaml", [f"data.train={path}", "data.eval=null"])
    with pytest.raises(DataError, match=rf"row 2, field 'label': label {shown} is not a class index in \[0, 2\)"):
        get_task(recipe, tiny_tokenizer(chat_template=False)).datasets()


def test_gsm8k_references_without_a_final_answer_are_named_before_generation(tmp_path):
    from pace_llm.benchmarks.gsm8k import load_problems

    path = write_jsonl(
        tmp_path / "test.jsonl", [{"question": "q", "answer": "2 #### 2"}, {"question": "r", "answer": "4"}]
    )
    with pytest.raises(DataError, match="test.jsonl, row 2, field 'answer': GSM-8K answer without '####'"):
        load_problems(path)


def test_images_are_checked_before_training_and_read_from_paths(tmp_path):
    """A null image, an array of another shape and a missing file are named by row; a path to an
    RGBA PNG and an RGBA array read as their colour bands."""
    import datasets
    import numpy as np
    from PIL import Image

    from pace_llm.data import pixel_values
    from pace_llm.tasks.images import prepare_images

    good = np.zeros((4, 4, 3), dtype=np.uint8).tolist()
    Image.fromarray(np.full((5, 5, 4), 200, dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    cases = [
        ([good, None], "row 2, field 'img': no image"),
        ([good, np.zeros((4, 4, 5), dtype=np.uint8).tolist()], r"row 2, field 'img': an array of shape \(4, 4, 5\)"),
        (
            [str(tmp_path / "rgba.png"), str(tmp_path / "gone.png")],
            "row 2, field 'img': image file .*gone.png does not",
        ),
    ]
    for images, message in cases:
        rows = [{"img": image, "label": 0, "sample_id": i} for i, image in enumerate(images)]
        with pytest.raises(DataError, match=message):
            prepare_images(datasets.Dataset.from_list(rows), "img", "label", "train.jsonl")
    for image in (str(tmp_path / "rgba.png"), np.full((4, 4, 4), 200, dtype=np.uint8).tolist()):
        out = prepare_images(datasets.Dataset.from_list([{"img": image, "label": 0, "sample_id": 0}]), "img", "label")
        pixels = pixel_values(out[0]["image"], 8)
        assert pixels.shape == (3, 8, 8) and np.allclose(pixels, 200 / 255 * 2 - 1, atol=1e-5)
