"""Task kinds, by the recipe's `model.task`. Adding one: a module with a `Task` subclass
(tasks/base.py says what it defines), a line below, and a recipe; see CONTRIBUTING.md."""
from __future__ import annotations

from .base import Task
from .causal_lm import CausalLMTask
from .classification import SequenceClassificationTask
from .images import ImageClassificationTask

TASKS: dict[str, type[Task]] = {
    "causal_lm": CausalLMTask,
    "seq_cls": SequenceClassificationTask,
    "image_cls": ImageClassificationTask,
}


def get_task(recipe, tokenizer=None) -> Task:
    return TASKS[recipe.model.task](recipe, tokenizer)
