"""Tasks, encoding and batching. Data flows: rows (tasks) → encoded examples (encode) → batches."""

from .batches import BatchStream, EvalShard, split_halves
from .encode import OBJECTIVES, Collator, Encoder, load_tokenizer
from .tasks import TASKS, Task, get_task, load_rows, register, resolve_task

__all__ = [
    "OBJECTIVES",
    "TASKS",
    "BatchStream",
    "Collator",
    "Encoder",
    "EvalShard",
    "Task",
    "get_task",
    "load_rows",
    "load_tokenizer",
    "register",
    "resolve_task",
    "split_halves",
]
