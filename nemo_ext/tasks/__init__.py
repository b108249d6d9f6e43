"""Task plugins: one module per task, each registering a TaskSpec on import."""

import importlib
import pkgutil

from nemo_ext.tasks.base import TaskConfig, TaskSpec, all_tasks, get_task, register_task

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["TaskConfig", "TaskSpec", "all_tasks", "get_task", "register_task"]
