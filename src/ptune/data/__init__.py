"""Tasks and data: what a dataset means (Task), reading files (load_records), built-in tasks."""

from .builtin import BUILTIN_TASKS, describe_splits, load_builtin
from .loaders import load_records
from .tasks import Task

__all__ = ["Task", "load_records", "load_builtin", "BUILTIN_TASKS", "describe_splits"]
