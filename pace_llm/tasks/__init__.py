"""Task kinds, by the recipe's `model.task`. Adding one: a module with a `Task` subclass
(tasks/base.py says what it defines), a line below, and a recipe; see CONTRIBUTING.md."""

from __future__ import annotations

from pace_llm.tasks.base import Task
from pace_llm.tasks.causal_lm import CausalLMTask
from pace_llm.tasks.classification import SequenceClassificationTask
from pace_llm.tasks.images import ImageClassificationTask

TASKS: dict[str, type[Task]] = {
    "causal_lm": CausalLMTask,
    "seq_cls": SequenceClassificationTask,
    "image_cls": ImageClassificationTask,
}


def get_task(recipe, tokenizer=None) -> Task:
    return TASKS[recipe.model.task](recipe, tokenizer)
