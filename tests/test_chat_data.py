"""Chat formats: what is trained on, with real tokenizers and real chat-template shapes
(SmolLM2's own template; Phi-3's, which appends eos to a conversation's last message),
truncation, mixtures' sample ids, and bad rows named."""

import copy
import json

import pytest
import transformers

from pace_llm import assets
from pace_llm.config import load_recipe
from pace_llm.data import DataError, load_examples
from pace_llm.tasks import get_task
from pace_llm.tasks.data_formats import FORMATS, Messages, encode_examples

# Phi-3-mini-4k-instruct's template, verbatim in shape: no {% generation %} markers, eos at the end.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
    "{% endif %}"
)

SYSTEM, USER1, ANSWER1 = "Tu es un assistant précis. 日本語もOK", "Bonjour, ça va ?", "Très bien, merci ! ✓"
USER2, ANSWER2 = "Et 2+2 = ?", "4 — évidemment."
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER1},
    {"role": "assistant", "content": ANSWER1},
    {"role": "user", "content": USER2},
    {"role": "assistant", "content": ANSWER2},
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.fixture(scope="module")
def smollm2():
    return transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir())


@pytest.fixture(scope="module")
def phi3(smollm2):
    tok = copy.deepcopy(smollm2)
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = PHI3_TEMPLATE
    return tok


TEMPLATES = {"smollm2": ("smollm2", "<|im_end|>"), "phi3": ("phi3", "<|end|>")}


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in examples))
    return str(path)


def example_in(fmt: str, messages=MESSAGES) -> dict:
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "sharegpt":
        return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]}
    raise ValueError(fmt)


def encode(tmp_path, tok, examples, *overrides, fmt="auto"):
    recipe = load_recipe(
        None, [f"data.train={write_jsonl(tmp_path / 'd.jsonl', examples)}", f"data.format={fmt}", *overrides]
    )
    task = get_task(recipe, tok)
    train, _ = task.datasets()
    return train, task.encode_stats[recipe.data.train]


def supervised(tok, sample) -> str:
    return tok.decode([t for t in sample["labels"] if t != -100])


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_assistant_turns_and_their_end_of_turn_are_exactly_what_is_trained(tmp_path, request, template, fmt):
    tok, eot = request.getfixturevalue(TEMPLATES[template][0]), TEMPLATES[template][1]
    (s,), _ = encode(tmp_path, tok, [example_in(fmt)])
    assert supervised(tok, s) == f"{ANSWER1}{eot}{ANSWER2}{eot}"
    assert tok.decode(s["input_ids"]) == tok.apply_chat_template(MESSAGES, tokenize=False)
    (s,), _ = encode(tmp_path, tok, [example_in(fmt)], "data.train_on=last")
    assert supervised(tok, s) == f"{ANSWER2}{eot}"
    (s,), _ = encode(tmp_path, tok, [example_in(fmt)], "data.train_on=all")
    assert s["labels"] == s["input_ids"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_alpaca_examples_become_system_user_assistant(tmp_path, request, template):
    tok, eot = request.getfixturevalue(TEMPLATES[template][0]), TEMPLATES[template][1]
    row = {"instruction": USER1, "input": "contexte: ☕", "output": ANSWER1, "system": SYSTEM}
    (s,), _ = encode(tmp_path, tok, [row])
    assert supervised(tok, s) == f"{ANSWER1}{eot}"
    text = tok.decode(s["input_ids"])
    assert SYSTEM in text and f"{USER1}\n\ncontexte: ☕" in text


def test_auto_detects_each_format(tmp_path, smollm2):
    data = load_recipe(None).data
    assert [f.name for f in FORMATS.values() if f.matches(["messages"], data)] == ["messages"]
    assert FORMATS["sharegpt"].matches(["conversations", "id"], data)
    assert FORMATS["alpaca"].matches(["instruction", "input", "output"], data)
    assert FORMATS["prompt_answer"].matches(["question", "answer"], data)


def test_max_length_keeps_the_assistant_tokens_that_fit_and_drops_prompt_only_samples(tmp_path, phi3):
    (whole,), _ = encode(tmp_path, phi3, [example_in("messages")])
    starts = [
        i for i in range(1, len(whole["labels"])) if whole["labels"][i] != -100 and whole["labels"][i - 1] == -100
    ]
    cut = starts[1] + 2  # two tokens into the second assistant turn
    (s,), stats = encode(tmp_path, phi3, [example_in("messages")], f"data.max_length={cut}")
    assert s["input_ids"] == whole["input_ids"][:cut] and s["labels"] == whole["labels"][:cut]
    assert supervised(phi3, s) == ANSWER1 + "<|end|>" + phi3.decode(whole["input_ids"][starts[1] : cut])
    assert (stats.truncated, stats.dropped) == (1, 0)
    long_user = [dict(m, content=m["content"] * 40) if m["role"] == "user" else m for m in MESSAGES]
    train, stats = encode(
        tmp_path, phi3, [example_in("messages", long_user), example_in("messages")], f"data.max_length={starts[0] + 10}"
    )
    assert [s["sample_id"] for s in train] == [1] and (stats.truncated, stats.dropped, stats.samples) == (2, 1, 1)
    assert stats.supervised_tokens == sum(x != -100 for x in train[0]["labels"][1:])


def test_a_mixture_has_unique_ids_and_weighted_counts(tmp_path, phi3):
    a = write_jsonl(tmp_path / "a.jsonl", [example_in("messages")] * 10)
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"q{i}", "output": f"r{i}"} for i in range(6)])
    recipe = load_recipe(None, [f"data.train=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 1.5, limit: 4}}]"])
    task = get_task(recipe, phi3)
    train, _ = task.datasets()
    ids = [s["sample_id"] for s in train]
    assert len(ids) == 2 * 10 + 4 + 2 and len(set(ids)) == len(ids)
    assert sorted(ids[:20]) == list(range(20)) and all(20 <= i < 28 for i in ids[20:])
    assert [task.source_of(i) for i in (0, 19, 20, 27)] == [a, a, b, b]
    again, _ = get_task(recipe, phi3).datasets()  # stable: a resumed run or another rank sees the same
    assert [s["sample_id"] for s in again] == ids
    single, _ = get_task(load_recipe(None, [f"data.train={a}"]), phi3).datasets()
    assert [s["sample_id"] for s in single] == list(range(10))
    tiny_share = load_recipe(None, [f"data.train=[{{path: {a}}}, {{path: {b}, weight: 0.05}}]"])  # 0.05 x 6 -> 0
    with pytest.raises(
        DataError, match=r"data.train\[1\].weight=0.05 takes 0.05 x 6 samples of .*b.jsonl, which rounds"
    ):
        get_task(tiny_share, phi3).datasets()


GOOD = example_in("messages")


@pytest.mark.parametrize(
    "examples, message",
    [
        ([GOOD, {"messages": None}], "row 2: field 'messages' is null"),
        (
            [GOOD, {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}],
            "row 2: field 'messages[0].content' is null",
        ),
        (
            [GOOD, {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}],
            "row 2: field 'messages[0].content' is not a string (int)",
        ),
        (
            [GOOD, {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
            "row 2: field 'messages[0].role' has an unknown role 'bot'",
        ),
        ([GOOD, {"messages": [{"role": "user", "content": "hi"}]}], "row 2: field 'messages' has no assistant turn"),
    ],
)
def test_bad_rows_are_named_and_skippable(tmp_path, phi3, examples, message):
    path = write_jsonl(tmp_path / "d.jsonl", examples)
    with pytest.raises(DataError) as err:
        encode(tmp_path, phi3, examples)
    assert f"data {path}, {message}" in str(err.value)
    train, stats = encode(tmp_path, phi3, examples, "data.skip_invalid=true")
    assert len(train) == 1 and stats.first_skipped == [2] and sum(stats.skipped.values()) == 1
    assert "1 invalid rows skipped" in stats.summary()


def test_null_answer_and_missing_field_are_named(tmp_path, phi3):
    with pytest.raises(DataError, match=r"row 1: field 'answer' is null"):
        encode(tmp_path, phi3, [{"question": "q", "answer": None}])
    with pytest.raises(DataError, match=r"field 'messages' is missing from the data .*\(it has: chat"):
        encode(tmp_path, phi3, [{"chat": []}], fmt="messages")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + '\n{"messages": [oops\n')
    with pytest.raises(DataError, match=rf"data file {path}, line 3: not valid JSON"):
        load_examples(str(path))


def test_a_template_that_cannot_be_masked_is_named(tmp_path, phi3):
    tok = copy.deepcopy(phi3)  # renders the last message differently when it is last: no prefix
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['role'] + ': ' + "
        "m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match=r"row 1: field 'turn 2' cannot be masked"):
        encode_examples(
            load_examples(write_jsonl(tmp_path / "d.jsonl", [GOOD])),
            Messages(load_recipe(None).data, tok),
            512,
            "d.jsonl",
        )


def test_a_tokenizer_without_chat_template_needs_data_chat_template(tmp_path, phi3):
    tok = copy.deepcopy(phi3)
    tok.chat_template = None
    with pytest.raises(DataError, match="needs a chat template.*data.chat_template"):
        encode(tmp_path, tok, [GOOD])
    (tmp_path / "t.jinja").write_text(PHI3_TEMPLATE)
    (s,), _ = encode(tmp_path, tok, [GOOD], f"data.chat_template={tmp_path / 't.jinja'}")
    assert supervised(tok, s) == f"{ANSWER1}<|end|>{ANSWER2}<|end|>"
    assert tok.chat_template == PHI3_TEMPLATE  # what save_pretrained exports


def test_inspect_data_marks_and_dumps_the_supervised_tokens(tmp_path, capsys):
    from chat_data import write

    from pace_llm.cli import inspect_data

    paths = write(tmp_path)
    overrides = [f"data.train={paths['messages']}", "data.eval=null"]
    assert inspect_data.main(["recipes/tiny_chat.yaml", *overrides, "--n", "1"]) == 0
    text = capsys.readouterr().out
    assert "<|assistant|>\n[[" in text and "<|end|>]]" in text and "supervised tokens per sample: mean 6.0" in text
    assert inspect_data.main(["recipes/tiny_chat.yaml", *overrides, "--n", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sample_id"] for r in rows] == [0, 1] and rows[0]["source"] == str(paths["messages"])
    first = json.loads(paths["messages"].read_text().splitlines()[0])["messages"]
    assert rows[0]["supervised_text"] == "".join(m["content"] + "<|end|>" for m in first if m["role"] == "assistant")
