"""Task plugins: one package per task (``nemo_ext/tasks/<task>/``), each registering its TaskSpec, its
sample world and its evaluation on import. Importing this package imports all of them."""

import importlib
import pkgutil

from nemo_ext.tasks.base import TaskConfig, TaskSpec, all_tasks, get_task, register_task

for _mod in pkgutil.iter_modules(__path__):
    if _mod.ispkg:
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["TaskConfig", "TaskSpec", "all_tasks", "get_task", "register_task"]
