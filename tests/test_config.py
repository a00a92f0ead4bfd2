"""The recipe schema: every recipe in recipes/ loads, and bad input names its key."""

from pathlib import Path

import pytest

from pace_llm.config import RecipeError, load_recipe

RECIPES = sorted(str(p) for p in Path(__file__).resolve().parents[1].glob("recipes/**/*.yaml"))


@pytest.mark.parametrize("path", RECIPES)
def test_shipped_recipes_load_and_show_their_command(path):
    load_recipe(path)
    header = Path(path).read_text().split("\n\n")[0]
    assert "launch/train.py" in header or "launch/demo.py" in header, f"{path}: header lacks the command"


def test_overrides_and_yaml_1_2_scalars():
    r = load_recipe(
        None,
        [
            "pace.mode=off",
            "train.lr=1e-3",
            "pace.target_modules=[q_proj, v_proj]",
            "resume=true",
            "train.max_steps=7",
            "pace.sigma=2",
        ],
    )
    assert r.pace.mode == "off" and r.train.lr == 0.001 and r.resume is True
    assert r.pace.target_modules == ["q_proj", "v_proj"] and r.train.max_steps == 7
    assert r.pace.sigma == 2.0 and isinstance(r.pace.sigma, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("pace.lamda=1", "unknown recipe key 'pace.lamda' (did you mean pace.lam?)"),
        ("trian.lr=1", "unknown recipe key 'trian' (did you mean train?)"),
        ("pace.mode=slow", "pace.mode: expected one of ['off', 'noise', 'full', 'fast', 'lazy_half'], got 'slow'"),
        ("train.epochs=1.5", "train.epochs: expected int, got 1.5"),
        ("resume=yes", "resume: expected bool or one of ['auto'], got 'yes'"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: expected 0, 1, 2 or 3, got 4"),
        ("pace.sigma=-1", "pace.sigma: expected a value >= 0, got -1.0"),
        ("model=phi3", "model: expected a section (mapping), got 'phi3'"),
        ("pace.mode", "override 'pace.mode' is not of the form section.key=value"),
        ("train.micro_batch_size=0", "train.micro_batch_size: expected an integer >= 1"),
        ("data.sample=0", "data.sample: expected an integer >= 1 or null"),
        ("train.loss_normalization=token", "train.loss_normalization: expected one of ['step', 'micro_batch'] or null"),
        # non-finite or out-of-range values reached a traceback (or trained on nan) before #24
        ("train.lr=.inf", "train.lr: expected a finite value > 0, got inf"),
        ("train.lr=.nan", "train.lr: expected a finite value > 0, got nan"),
        ("pace.lam=.inf", "pace.lam: expected a finite value >= 0 or null, got inf"),
        ("pace.sigma=.nan", "pace.sigma: expected a value >= 0, got nan"),
        ("pace.dropout=1", "pace.dropout: expected a probability in [0, 1), got 1.0"),
        ("train.log_every=0", "train.log_every: expected an integer >= 1, got 0"),
        ("train.epochs=0", "train.epochs: expected an integer >= 1, got 0"),
        ("train.keep_checkpoints=-1", "train.keep_checkpoints: expected an integer >= 0 (0: keep all), got -1"),
        ('model.name="x', """override 'model.name="x': the value is not valid YAML (found unexpected end of stream)"""),
        ("train.dist_timeout_minutes=0", "train.dist_timeout_minutes: expected minutes > 0, got 0.0"),
        (
            "train.micro_batch_tokens=1024",
            "train.micro_batch_tokens: expected null without data.packing=true (token-budget micro-batches are packed)",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.task=seq_cls", "model.num_labels=2", "train.micro_batch_tokens=1024"],
            "train.micro_batch_tokens: expected null for model.task=seq_cls (a token budget is for packed causal_lm)",
        ),
        (
            ["data.packing=true", "data.max_length=512", "train.micro_batch_tokens=500"],
            "train.micro_batch_tokens: expected >= data.max_length (512), so that a sample of max_length tokens fits",
        ),
        (
            ["data.packing=true", "pace.mode=lazy_half", "train.micro_batch_tokens=1024"],
            "train.micro_batch_tokens: expected null with pace.mode=lazy_half",
        ),
    ],
)
def test_a_token_budget_needs_packed_causal_lm_and_room_for_a_sample(overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, overrides)
    assert message in str(err.value)
    load_recipe(None, ["data.packing=true", "data.max_length=512", "train.micro_batch_tokens=512"])


def test_lazy_half_needs_a_batch_to_halve():
    with pytest.raises(RecipeError, match="micro_batch_size: expected >= 2 with pace.mode=lazy_half"):
        load_recipe(None, ["pace.mode=lazy_half", "train.micro_batch_size=1"])


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_compile_is_refused_under_zero3():
    with pytest.raises(RecipeError, match="train.compile: expected false with deepspeed.zero_stage=3"):
        load_recipe(None, ["train.compile=true", "deepspeed.zero_stage=3"])
    assert load_recipe(None, ["train.compile=true", "deepspeed.zero_stage=2"]).train.compile


def test_segment_attention_is_for_causal_lms_and_loads_registered(tmp_path):
    import transformers

    from pace_llm.assets.tiny import tiny_model
    from pace_llm.models import load_base

    message = "model.attn_implementation: expected not segment_sdpa for model.task=seq_cls"
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, ["model.task=seq_cls", "model.num_labels=2", "model.attn_implementation=segment_sdpa"])
    recipe = load_recipe(None, ["model.attn_implementation=segment_sdpa"])
    tiny_model("llama").save_pretrained(tmp_path)
    model = load_base(recipe.model, tmp_path, transformers.AutoModelForCausalLM)
    assert model.config._attn_implementation == "segment_sdpa"


def test_resume_takes_two_spellings_of_one_file_as_no_change(tmp_path, monkeypatch):
    """A requeued sweep trial met its own data file spelled relative before and absolute now (or
    through a symlinked folder) and was refused as a changed recipe; another file still counts."""
    from pace_llm.training.resume import changed_keys

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "other.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    saved = {"data": {"train": "data/train.jsonl"}, "model": {"name": "tiny:phi3"}}
    for same in (str(tmp_path / "data" / "train.jsonl"), str(tmp_path / "link" / "train.jsonl")):
        assert changed_keys(saved, {"data": {"train": same}, "model": {"name": "tiny:phi3"}}) == {}
    changed = changed_keys(saved, {"data": {"train": "other.jsonl"}, "model": {"name": "tiny:llama"}})
    assert changed == {"data.train": ("data/train.jsonl", "other.jsonl"), "model.name": ("tiny:phi3", "tiny:llama")}
