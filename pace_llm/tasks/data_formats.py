"""Data formats of the causal-LM task, and which tokens of a sample are trained on.

A format reads one raw example and returns its *segments*: the sample's text as a list of
(text, supervised) pieces. One encoder (`encode_examples`) tokenizes the pieces, truncates,
labels and counts, so a new format is one small class and a line in FORMATS (the one list
of format names: `data.format` is checked against it).

- `prompt_answer`: `data.prompt_template` as the user turn, `data.answer_field` as the
  answer (the encoding tokenize_sft always had, kept token for token);
- `messages`: a list of {role, content} (OpenAI), roles system / user / assistant;
- `sharegpt`: `conversations` of {from, value}, from system / human / gpt;
- `alpaca`: `instruction`, optional `input`, `output`, optional `system`.

Conversations are rendered with the model's own chat template. The assistant spans come
from rendering the conversation incrementally (the prompt before each assistant turn with
the generation prompt, the conversation up to that turn), not from `{% generation %}`
markers, which the Phi-3, SmolLM2 and Llama templates do not have. A supervised assistant
turn is its content up to and including the first special token after it (its end-of-turn
token: `<|end|>`, `<|im_end|>`, `<|eot_id|>`, eos), so the model learns to stop; what the
template writes after that (a newline) belongs to the next turn.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import datasets

from pace_llm.data import DataError, render_prompt, template_fields

log = logging.getLogger("pace_llm.data")

Segments = list[tuple[str, bool]]  # (text, supervised)


class ExampleError(ValueError):
    """An example the format cannot read: `field` names where, `reason` what (the skip count key)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field!r} {reason}")
        self.field, self.reason = field, reason


def _text(value, where: str) -> str:
    if value is None:
        raise ExampleError(where, "is null")
    if not isinstance(value, str):
        raise ExampleError(where, f"is not a string ({type(value).__name__})")
    return value


# --- formats -----------------------------------------------------------------------------
class Format:
    """A causal-LM data format: every method the encoder and `data.format: auto` call.

    A subclass sets `name` and defines `columns` and `segments`; the others have defaults
    (a conversation format subclasses `Conversation` instead, which defines `segments`)."""

    name: ClassVar[str]

    def __init__(self, data, tokenizer):
        self.data, self.tokenizer = data, tokenizer

    @classmethod
    def columns(cls, data) -> list[str]:
        """The columns that identify this format (`data.format: auto`), read from the
        recipe's data section (field-name keys)."""
        raise NotImplementedError(f"{cls.__name__}.columns(data): the columns this format reads")

    def segments(self, example: dict) -> Segments:
        """One raw example -> its text as (text, supervised) pieces; an ExampleError for an
        example it cannot read."""
        raise NotImplementedError(f"{type(self).__name__}.segments(example): the example's (text, supervised) pieces")

    def fields(self) -> list[str]:
        """Columns every example must have (checked once, by name, before encoding)."""
        return self.columns(self.data)

    def first_special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (bos) to the sample's first piece:
        yes for plain text; no when a chat template wrote them into the text already."""
        return True

    @classmethod
    def matches(cls, columns: list[str], data) -> bool:
        """`data.format: auto` picks the first format whose columns are present."""
        return all(c in columns for c in cls.columns(data))


class PromptAnswer(Format):
    """One user turn from a template, one answer. Without a chat template: plain prompt
    (with the tokenizer's bos) and answer + eos, as generation.encode_prompts sees it."""

    name = "prompt_answer"

    @classmethod
    def columns(cls, data):
        return template_fields(data.prompt_template) + [data.answer_field]

    def segments(self, example):
        for name in template_fields(self.data.prompt_template):
            if example[name] is None:
                raise ExampleError(name, "is null")
        user = self.data.prompt_template.format(**example)
        answer = _text(example[self.data.answer_field], self.data.answer_field)
        prompt = render_prompt(self.tokenizer, user)
        if not getattr(self.tokenizer, "chat_template", None):
            return [(prompt, False), (answer + (self.tokenizer.eos_token or ""), True)]
        full = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise DataError(
                "the chat template's prompt is not a prefix of prompt+answer; cannot mask the prompt tokens"
            )
        return [(prompt, False), (full[len(prompt) :], True)]

    def first_special_tokens(self) -> bool:
        return not getattr(self.tokenizer, "chat_template", None)


class Conversation(Format):
    """A format whose examples are conversations: `messages(example)` -> [{role, content}]."""

    ROLES: ClassVar[dict[str, str]] = {"system": "system", "user": "user", "assistant": "assistant"}

    field_key: ClassVar[str]  # the data-section key naming the column of turns
    role_key: ClassVar[str]
    content_key: ClassVar[str]

    @classmethod
    def columns(cls, data):
        return [getattr(data, cls.field_key)]

    def messages(self, example) -> list[dict]:
        column = getattr(self.data, self.field_key)
        return self._turns(example[column], column, self.role_key, self.content_key)

    def _turns(self, turns, where: str, role_key: str, content_key: str) -> list[dict]:
        """[{role_key, content_key}] -> [{role, content}], every turn checked."""
        if not isinstance(turns, list):
            raise ExampleError(where, "is null" if turns is None else f"is not a list ({type(turns).__name__})")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or role_key not in turn:
                raise ExampleError(f"{where}[{i}].{role_key}", "is missing")
            role = turn[role_key]
            if role not in self.ROLES:
                raise ExampleError(
                    f"{where}[{i}].{role_key}",
                    f"has an unknown role {role!r} (expected one of {', '.join(self.ROLES)})",
                )
            if content_key not in turn:
                raise ExampleError(f"{where}[{i}].{content_key}", "is missing")
            out.append({"role": self.ROLES[role], "content": _text(turn[content_key], f"{where}[{i}].{content_key}")})
        return out

    def segments(self, example):
        messages = self.messages(example)
        if not any(m["role"] == "assistant" for m in messages):
            raise ExampleError(self.fields()[0], "has no assistant turn")
        return conversation_segments(self.tokenizer, messages, self.data.train_on)

    def first_special_tokens(self) -> bool:
        return False  # the chat template writes the special tokens itself


class Messages(Conversation):
    name = "messages"
    field_key, role_key, content_key = "messages_field", "role", "content"


class ShareGPT(Conversation):
    name = "sharegpt"
    field_key, role_key, content_key = "conversations_field", "from", "value"
    ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


class Alpaca(Conversation):
    name = "alpaca"

    @classmethod
    def columns(cls, data):
        return [data.instruction_field, data.output_field]

    def messages(self, example):
        d = self.data
        user = _text(example[d.instruction_field], d.instruction_field)
        extra = example.get(d.input_field)
        if extra is not None:
            extra = _text(extra, d.input_field)
        messages = [
            {"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
            {"role": "assistant", "content": _text(example[d.output_field], d.output_field)},
        ]
        system = example.get(d.system_field)
        if system is not None:
            messages.insert(0, {"role": "system", "content": _text(system, d.system_field)})
        return messages


FORMATS: dict[str, type[Format]] = {f.name: f for f in (Messages, ShareGPT, Alpaca, PromptAnswer)}


def choose_format(data, columns: list[str], source: str) -> type[Format]:
    if data.format != "auto":
        return FORMATS[data.format]
    chosen = next((f for f in FORMATS.values() if f.matches(columns, data)), PromptAnswer)
    log.info("data %s: format %s (data.format=auto, from the columns %s)", source, chosen.name, ", ".join(columns))
    return chosen


# --- assistant spans by incremental rendering ---------------------------------------------
def _special_tokens(tokenizer) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted(
        {*tokenizer.all_special_tokens, *(t.content for t in added.values() if t.special)}, key=len, reverse=True
    )


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def conversation_segments(tokenizer, messages: list[dict], train_on: str) -> Segments:
    """The rendered conversation as (text, supervised) pieces, by `train_on`."""

    def render(msgs, prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages, False)
    if train_on == "all":
        return [(full, True)]
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    trained = assistant[-1:] if train_on == "last" else assistant
    specials = _special_tokens(tokenizer)
    pieces, pos = [], 0
    for k in trained:
        before = render(messages[:k], True) if k else ""
        if not full.startswith(before) or len(before) < pos:
            raise ExampleError(
                f"turn {k}",
                "cannot be masked: the chat template's render of the conversation "
                "before it (with the generation prompt) is not a prefix of the whole conversation",
            )
        # The turn ends where the render up to it stops agreeing with the whole: templates
        # such as Phi-3's append eos to a conversation's last message.
        end = _common_prefix(render(messages[: k + 1], False), full)
        turn = full[len(before) : end]
        content = messages[k]["content"].strip()
        after = turn.find(content) + len(content) if content and content in turn else 0
        stops = [turn.find(s, after) + len(s) for s in specials if turn.find(s, after) >= 0]
        cut = min(stops) if stops else len(turn)
        if not turn[:cut].strip():
            raise ExampleError(f"turn {k}", "cannot be masked: the chat template renders it empty")
        pieces += [(full[pos : len(before)], False), (turn[:cut], True)]
        pos = len(before) + cut
    return pieces + [(full[pos:], False)]


# --- the one encoder ----------------------------------------------------------------------
@dataclass
class EncodeStats:
    examples: int = 0
    samples: int = 0
    truncated: int = 0
    dropped: int = 0  # no supervised token left after truncation
    supervised_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> examples
    first_skipped: list = field(default_factory=list)  # row numbers (1-based, a JSONL file's line)

    def summary(self) -> str:
        text = (
            f"{self.samples} samples from {self.examples} rows, {self.supervised_tokens} supervised tokens; "
            f"{self.truncated} truncated by data.max_length, {self.dropped} dropped (no supervised "
            f"token left)"
        )
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            text += (
                f"; {sum(self.skipped.values())} invalid rows skipped ({reasons}; first rows: "
                f"{', '.join(map(str, self.first_skipped))})"
            )
        return text


def encode_examples(
    examples: datasets.Dataset, fmt: Format, max_length: int, source: str, skip_invalid: bool = False
) -> tuple[datasets.Dataset, EncodeStats]:
    """Raw examples -> samples {sample_id, input_ids, labels (-100: not trained on)}.

    Truncation keeps the first `max_length` tokens and their labels; a sample left with no
    supervised token is dropped (its id is unused). An example the format cannot read is an
    error naming the source, its row (a file's line) and the field, unless `skip_invalid`."""
    from pace_llm.tasks.base import encoded_columns, require_fields

    require_fields(examples, fmt.fields(), source)
    tokenizer, special = fmt.tokenizer, fmt.first_special_tokens()

    def encode(example):
        try:
            pieces = fmt.segments(example)
        except ExampleError as err:
            if not skip_invalid:
                raise DataError(
                    f"data {source}, row {example['sample_id'] + 1}: {err} (data.skip_invalid: true skips such rows)"
                ) from None
            return {"input_ids": [], "labels": [], "_status": err.reason}
        merged: Segments = []
        for text, sup in pieces:  # same-label neighbours tokenized together, as one text
            if text:
                merged[-1:] = (
                    [(merged[-1][0] + text, sup)] if merged and merged[-1][1] == sup else merged[-1:] + [(text, sup)]
                )
        ids, labels = [], []
        for i, (text, sup) in enumerate(merged):
            piece = tokenizer(text, add_special_tokens=special and i == 0)["input_ids"]
            ids += piece
            labels += piece if sup else [-100] * len(piece)
        status = "truncated" if len(ids) > max_length else ""
        return {"input_ids": ids[:max_length], "labels": labels[:max_length], "_status": status}

    out = examples.map(encode, remove_columns=encoded_columns(examples), desc="tokenizing")
    stats = EncodeStats(examples=len(examples))
    keep = []
    for i, (status, labels) in enumerate(zip(out["_status"], out["labels"])):
        if status not in ("", "truncated"):
            stats.skipped[status] += 1
            if len(stats.first_skipped) < 5:
                stats.first_skipped.append(i + 1)
            continue
        stats.truncated += status == "truncated"
        # label 0 is never predicted (the loss shifts by one): it alone supervises nothing
        if any(x != -100 for x in labels[1:]):
            keep.append(i)
            stats.supervised_tokens += sum(x != -100 for x in labels[1:])
        else:
            stats.dropped += 1
    stats.samples = len(keep)
    out = out.select(keep) if len(keep) < len(out) else out
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("data %s (%s): %s", source, fmt.name, stats.summary())
    return out.remove_columns("_status"), stats
