"""Tasks and examples: loading (TSV/CSV/JSONL/HF), stable ids, seeded clean subsets."""

from unbackdoor.data.io import (
    data_root,
    load_any,
    load_poisoned_task,
    load_task,
    resolve_data_path,
    write_poisoned_task,
)
from unbackdoor.data.sampling import holdout_split, sample_subset
from unbackdoor.data.types import (
    AttackInfo,
    Dataset,
    Example,
    PoisonedTask,
    PoisonFlags,
    Task,
    TriggeredSet,
)

__all__ = [
    "AttackInfo",
    "Dataset",
    "Example",
    "PoisonFlags",
    "PoisonedTask",
    "Task",
    "TriggeredSet",
    "data_root",
    "holdout_split",
    "load_any",
    "load_poisoned_task",
    "load_task",
    "resolve_data_path",
    "sample_subset",
    "write_poisoned_task",
]
