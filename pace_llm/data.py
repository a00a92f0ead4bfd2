"""Data for the trainer: loading through `datasets`, prompt/answer formatting with the
model's chat template, answer-only labels, padding-aware collation, stable sample ids."""
from __future__ import annotations


def render_prompt(tokenizer, user_text: str) -> str:
    """The text a model sees before its answer: the chat template with the generation
    prompt when the tokenizer has one (Phi-3, SmolLM2, ...), else the plain text.
    Training and evaluation both call this, so they cannot drift apart."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                             tokenize=False, add_generation_prompt=True)
    return user_text
