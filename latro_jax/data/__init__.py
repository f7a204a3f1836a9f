"""Tasks (GSM8K, ARC-Challenge, synthetic arithmetic), loading, tokenisation."""

from latro_jax.data.loading import BatchIterator, load_examples, load_rows, select
from latro_jax.data.prompts import PromptFormatter
from latro_jax.data.tasks import STOP_PHRASES, DataError, Example, Task, answer_text, get_task

__all__ = ["BatchIterator", "DataError", "Example", "PromptFormatter", "STOP_PHRASES", "Task",
           "answer_text", "get_task", "load_examples", "load_rows", "select"]
