"""Classification through launch/train.py under real DeepSpeed (2 gloo ranks on this CPU):
tiny RoBERTa (recipes/tiny_cls.yaml: LoRA_add, the head in PEFT's modules_to_save) and tiny
ViT (recipes/tiny_vit.yaml: LoRA_mul + VPT_add, the head in pace_adapter.safetensors), PACE
full and fast. The exported and reloaded classifiers must predict exactly as the trained one,
with the trained head, never a freshly initialised one.

Also, without training: the GLUE and VTAB recipes carry their papers' protocol values, and
the learning-rate schedule options (warmup_ratio, linear decay).
"""

import importlib.util
import json
import math
import sys

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from trainrun import ROOT, launch, launch_many, metrics

import pace_llm
from pace_llm.benchmarks import glue
from pace_llm.config import RecipeError, load_recipe
from pace_llm.data import load_examples
from pace_llm.tasks import get_task
from pace_llm.tasks.classification import tokenize_classification
from pace_llm.tasks.images import prepare_images

RECIPES = {"roberta": "recipes/tiny_cls.yaml", "vit": "recipes/tiny_vit.yaml"}
# One objective per model (2 runs, not 4: the suite's time): classifiers share the objective
# code (SampleOutputs), so full PACE on RoBERTa and PACE_fast's logit cache on the ViT cover both.
MODE = {"roberta": "full", "vit": "fast"}
STEPS = list(range(1, 17))  # both tiny recipes: max_steps 16, 8 steps per epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank DeepSpeed run per model in its MODE, both made by one torchrun launch on first use."""
    outs = launch_many(
        tmp_path_factory.mktemp("cls"),
        [(f"{kind}-{mode}", [f"pace.mode={mode}"], RECIPES[kind]) for kind, mode in MODE.items()],
    )
    return lambda kind, mode: outs[f"{kind}-{mode}"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"eval_{name}", ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k not in ("labels", "sample_id")}).logits


def random_head(model, seed: int):
    """The model with its classifier re-initialised: whatever head it had is gone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def from_pretrained(cls, path):
    """Load and assert that every weight came from the folder (no newly initialised head)."""
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model


def eval_batch(kind: str, out):
    if kind == "roberta":
        tokenizer = transformers.AutoTokenizer.from_pretrained(out / "merged")
        samples = tokenize_classification(load_examples("tiny:sentences", "test"), tokenizer, ["sentence"], "label", 96)
        task = get_task(load_recipe(None, ["model.task=seq_cls", "model.num_labels=3"]), tokenizer)
        return task.collate([samples[i] for i in range(len(samples))])
    samples = prepare_images(load_examples("tiny:images", "test"), "image", "label")
    return get_task(load_recipe(None, ["model.task=image_cls", "model.num_labels=4", "data.image_size=32"])).collate(
        [samples[i] for i in range(len(samples))]
    )


def check_training_log(out, mode):
    rows = metrics(out)
    assert [r["step"] for r in rows] == STEPS
    for key in ("epoch", "loss", "task_loss", "consistency_loss", "grad_norm", "lr", "tokens_per_s"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    consistency = [r["consistency_loss"] for r in rows]
    if mode == "fast":  # no stored target in epoch 0 (steps 1-8), then every step
        assert all(c == 0 for c in consistency[:8]) and all(c > 0 for c in consistency[8:])
    else:  # step 1: the adapters are still zero, so the noise changes nothing
        assert all(c > 0 for c in consistency[1:])
    assert json.loads((out / "export_check.json").read_text())["max_abs_logit_diff"] <= 1e-4
    assert json.loads((out / "run_status.json").read_text()) == {"status": "done"}
    return rows


@pytest.mark.slow
def test_roberta_trains_and_exports_its_trained_head(runs, tmp_path):
    mode = MODE["roberta"]
    out = runs("roberta", mode)
    rows = check_training_log(out, mode)
    first, last = [r["task_loss"] for r in rows[:4]], [r["task_loss"] for r in rows[-4:]]
    assert sum(last) / 4 < sum(first) / 4 - 0.03, (first, last)  # the task loss falls

    # The head is saved with the adapter (PEFT modules_to_save), trained, and is the merged one.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    head = {k.split("classifier.")[-1]: v for k, v in saved.items() if ".classifier." in k}
    assert set(head) == {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}, sorted(saved)
    cls = transformers.AutoModelForSequenceClassification
    merged, base = from_pretrained(cls, out / "merged"), from_pretrained(cls, out / "tiny-base")
    assert torch.equal(merged.classifier.out_proj.weight, head["out_proj.weight"])
    assert not torch.allclose(base.classifier.out_proj.weight, head["out_proj.weight"])  # it trained

    # Merged == base (any head) + adapter, through pace_llm.load_adapter and through PEFT itself.
    batch = eval_batch("roberta", out)
    reference = logits(merged, batch)
    adapted = pace_llm.load_adapter(random_head(cls.from_pretrained(out / "tiny-base"), 1), out / "adapter")
    via_peft = peft.PeftModel.from_pretrained(random_head(cls.from_pretrained(out / "tiny-base"), 2), out / "adapter")
    for other in (adapted, via_peft):
        assert (logits(other, batch) - reference).abs().max() <= 1e-5
        assert torch.equal(logits(other, batch).argmax(-1), reference.argmax(-1))
    # Saved and reloaded under different seeds: identical predictions (nothing initialised at random).
    merged.save_pretrained(tmp_path / "resaved")
    torch.manual_seed(7)
    assert torch.equal(logits(from_pretrained(cls, tmp_path / "resaved"), batch), reference)

    # eval/glue.py gives the same accuracy for merged and base + adapter, matching these logits.
    data = tmp_path / "eval.csv"
    load_examples("tiny:sentences", "test").remove_columns("sample_id").to_csv(data, index=False)
    eval_glue = load_script("glue")
    expected = glue.accuracy(reference.argmax(-1).numpy(), batch["labels"].numpy())
    for args in (
        ["--model", str(out / "merged")],
        ["--model", str(out / "tiny-base"), "--adapter", str(out / "adapter")],
    ):
        result = eval_glue.main(["--task", "sst2", "--data", str(data), "--quiet", *args])
        assert result["metrics"]["accuracy"] == pytest.approx(expected)
        assert torch.equal(torch.from_numpy(result["outputs"]).argmax(-1), reference.argmax(-1))


@pytest.mark.slow
def test_vit_trains_and_exports_its_trained_head(runs, tmp_path):
    mode = MODE["vit"]
    out = runs("vit", mode)
    check_training_log(out, mode)

    # lora_mul_vpt: the head is in pace_adapter.safetensors, trained, and is the merged one.
    saved = load_file(out / "adapter" / "pace_adapter.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= set(saved)
    assert any(k.endswith("pace_down") and v.abs().max() > 0 for k, v in saved.items())
    cls = transformers.AutoModelForImageClassification
    merged, base = from_pretrained(cls, out / "merged"), from_pretrained(cls, out / "tiny-base")
    assert torch.equal(merged.classifier.weight, saved["classifier.weight"])
    assert not torch.allclose(base.classifier.weight, saved["classifier.weight"])

    batch = eval_batch("vit", out)
    reference = logits(merged, batch)
    adapted = pace_llm.load_adapter(random_head(cls.from_pretrained(out / "tiny-base"), 1), out / "adapter")
    assert (logits(adapted, batch) - reference).abs().max() <= 1e-5
    assert torch.equal(logits(adapted, batch).argmax(-1), reference.argmax(-1))
    merged.save_pretrained(tmp_path / "resaved")
    torch.manual_seed(7)
    assert torch.equal(logits(from_pretrained(cls, tmp_path / "resaved"), batch), reference)

    # eval/vision.py: top-1 on the eval images, the same for merged and base + adapter.
    eval_vision = load_script("vision")
    top1 = (reference.argmax(-1) == batch["labels"]).float().mean().item()
    by_merged = eval_vision.main(
        ["--model", str(out / "merged"), "--data", "tiny:images", "--output", str(tmp_path / "eval.json")]
    )
    by_adapter = eval_vision.main(
        ["--model", str(out / "tiny-base"), "--adapter", str(out / "adapter"), "--data", "tiny:images"]
    )
    assert by_merged["top1"] == pytest.approx(top1) and by_adapter["top1"] == pytest.approx(top1)
    assert (by_merged["predictions"] == reference.argmax(-1).numpy()).all()
    assert (by_adapter["predictions"] == by_merged["predictions"]).all()
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == len(batch["labels"])


def test_stsb_shaped_regression_through_the_data_path():
    """A 1-wide head on float labels (GLUE STS-B): tokenized, collated as floats, MSE task
    loss, PACE consistency on the score."""
    import datasets

    from pace_llm.assets.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer(chat_template=False)
    examples = datasets.Dataset.from_list(
        [
            {"sentence1": "a cat sat", "sentence2": "a cat sits", "label": 4.6},
            {"sentence1": "dark film", "sentence2": "bright day", "label": 0.4},
        ]
    )
    examples = examples.add_column("sample_id", [0, 1])
    encoded = tokenize_classification(examples, tokenizer, ["sentence1", "sentence2"], "label", 64)
    task = get_task(load_recipe(None, ["model.task=seq_cls", "model.num_labels=1"]), tokenizer)
    batch = task.collate([encoded[i] for i in range(2)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx([4.6, 0.4])
    model = pace_llm.apply_pace(
        tiny_model("roberta", num_labels=1, pad_token_id=tokenizer.pad_token_id), pace_llm.PaceConfig(rank=4, sigma=1.0)
    )
    for p in model.parameters():  # non-zero adapters, so the two noisy views differ
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    out = pace_llm.PaceObjective("full", lam=0.5)(model, batch)
    assert out.task_loss.item() > 0 and out.consistency_loss.item() > 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- recipes

# LoRA paper (arXiv 2106.09685) Table 9, RoBERTa-base: batch, epochs, learning rate.
TABLE_9 = {
    "cola": (32, 80, 4e-4),
    "sst2": (16, 60, 5e-4),
    "mrpc": (16, 30, 4e-4),
    "qnli": (32, 25, 4e-4),
    "rte": (32, 80, 5e-4),
    "stsb": (16, 40, 4e-4),
}
LAMBDAS, SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0), (0.1, 0.5, 1.0, 1.5, 2.0)


@pytest.mark.parametrize("task", sorted(TABLE_9))
def test_glue_recipes_follow_the_lora_protocol(task):
    r = load_recipe(f"recipes/glue/{task}.yaml")
    spec = glue.glue_task(task)
    batch, epochs, lr = TABLE_9[task]
    assert (r.model.name, r.model.task, r.model.num_labels) == ("roberta-base", "seq_cls", spec.num_labels)
    assert (r.data.train, r.data.hub_config, r.data.eval, r.data.eval_split) == (
        "nyu-mll/glue",
        task,
        "nyu-mll/glue",
        "validation",
    )
    assert tuple(r.data.text_fields) == spec.text_fields and r.data.label_field == "label"
    assert (r.train.micro_batch_size, r.train.epochs, r.train.lr) == (batch, epochs, lr)
    assert (r.train.warmup_ratio, r.train.lr_schedule, r.train.weight_decay, r.data.max_length) == (
        0.06,
        "linear",
        0.1,
        512,
    )
    assert (r.pace.adapter, r.pace.rank, r.pace.alpha, r.pace.target_modules) == (
        "lora_add",
        8,
        8.0,
        ["query", "value"],
    )
    assert r.pace.mode == "full" and r.pace.lam in LAMBDAS and r.pace.sigma in SIGMAS
    steps_per_epoch = math.ceil(
        {"cola": 8551, "sst2": 67349, "mrpc": 3668, "qnli": 104743, "rte": 2490, "stsb": 5749}[task] / batch
    )
    assert r.train.eval_every == steps_per_epoch
    text = (ROOT / f"recipes/glue/{task}.yaml").read_text()
    assert f"launch/train.py recipes/glue/{task}.yaml pace.mode=off" in text  # the LoRA baseline command


def test_vtab_recipe_follows_the_authors_cifar100_setting():
    r = load_recipe("recipes/vit/vtab_cifar100.yaml")
    assert (r.model.name, r.model.task, r.model.num_labels) == ("google/vit-base-patch16-224-in21k", "image_cls", 100)
    assert (r.pace.adapter, r.pace.rank, r.pace.target_modules, r.pace.first_noisy_block) == (
        "lora_mul_vpt",
        10,
        None,
        1,
    )
    assert (r.pace.mode, r.pace.lam, r.pace.sigma, r.pace.sigma_schedule) == ("full", 1.0, 1.2, "linear")
    assert (r.train.lr, r.train.weight_decay, r.train.micro_batch_size, r.train.epochs) == (1e-3, 1e-4, 64, 300)
    assert (r.train.lr_schedule, r.train.min_lr, r.train.grad_clip, r.model.dtype) == ("cosine", 1e-5, 0.0, "fp32")
    assert r.train.warmup_steps == 10 * math.ceil(1000 / 64) and r.data.image_size == 224


def test_warmup_ratio_and_linear_decay():
    from pace_llm.training import lr_lambda, warmup_steps

    r = load_recipe(None, ["train.warmup_ratio=0.06", "train.lr_schedule=linear", "train.lr=1.0"])
    assert warmup_steps(r, 6900) == 414 and warmup_steps(r, 6240) == 375  # ceil, as HF's warmup_ratio
    f = lr_lambda(r, 100)  # 6 warmup steps, then linear to 0 at step 100
    assert [f(s) for s in range(6)] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert f(6) == 1.0 and f(53) == pytest.approx(0.5) and f(100) == 0.0
    cosine = lr_lambda(load_recipe(None, ["train.warmup_steps=4", "train.lr=1.0", "train.min_lr=0.1"]), 20)
    assert cosine(4) == 1.0 and cosine(12) == pytest.approx(0.55) and cosine(20) == pytest.approx(0.1)
    with pytest.raises(RecipeError, match="train.warmup_steps: expected 0 when train.warmup_ratio is set"):
        load_recipe(None, ["train.warmup_ratio=0.1", "train.warmup_steps=5"])
    with pytest.raises(RecipeError, match="train.warmup_ratio: expected a fraction in"):
        load_recipe(None, ["train.warmup_ratio=1.5"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# --- images: raw in the dataset, pixels at collation, the authors' crop + flip -----------


def image_task(*overrides):
    from pace_llm.tasks.images import ImageClassificationTask

    recipe = load_recipe(str(RECIPES["vit"]), list(overrides))
    return ImageClassificationTask(recipe)


def test_images_are_stored_raw_and_made_into_pixels_at_collation():
    from pace_llm.data import pixel_values

    task = image_task()
    train, _ = task.datasets()
    assert "pixel_values" not in train.column_names  # no fp32 copy: the images as stored, uint8
    assert str(train.features["image"]) == "List(List(List(Value('uint8'))))"
    batch = task.collate([train[i] for i in range(4)], train=True)  # augment none: today's pixels exactly
    expected = np.stack([pixel_values(train[i]["image"], 32) for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and np.array_equal(batch["pixel_values"].numpy(), expected)


def test_crop_flip_differs_by_epoch_replays_exactly_and_centre_crops_held_out_batches():
    from pace_llm.core.objectives import _duplicate
    from pace_llm.tasks.images import image_pixels

    task = image_task("data.augment=crop_flip")
    train, _ = task.datasets()
    samples = [train[i] for i in range(8)]
    epoch0 = task.collate(samples, train=True)["pixel_values"]
    assert torch.equal(epoch0, task.collate(samples, train=True)["pixel_values"])  # (seed, epoch, id) only
    task.set_epoch(1)
    epoch1 = task.collate(samples, train=True)["pixel_values"]
    assert epoch1.shape == (8, 3, 32, 32) and not torch.equal(epoch0, epoch1)
    held_out = task.collate(samples)["pixel_values"]  # eval: resize to 37, centre 32x32 crop
    assert torch.equal(held_out, task.collate(samples)["pixel_values"])
    assert np.array_equal(held_out[0].numpy(), image_pixels(samples[0]["image"], 32, "crop_flip"))
    assert sum(not torch.equal(a, b) for a, b in zip(epoch0, held_out)) >= 6  # random crops, not the centre
    paired = _duplicate(task.collate(samples, train=True))["pixel_values"]  # full PACE's [x; x]
    assert torch.equal(paired[:8], paired[8:])  # both views see the same augmented images


def test_vit_trains_with_crop_flip(tmp_path):
    out = tmp_path / "vit-crop-flip"
    launch(
        "python", out, "data.augment=crop_flip", "deepspeed.zero_stage=0", "train.max_steps=6", recipe=RECIPES["vit"]
    )
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["consistency_loss"] >= 0 for r in rows)
    check = json.loads((out / "export_check.json").read_text())
    assert check["max_abs_logit_diff"] <= check["tolerance"]  # merged == trained on held-out (centre-crop) pixels
