"""The core finds the plugins: registries for tasks, worlds, prep sources and evaluations; no core file
lists them; the library never imports data_prep."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from support import REPO, cli_env


def test_every_nemo_ext_module_imports_without_data_prep():
    """Import every module of the package with ``data_prep`` unimportable (a meta-path finder refuses it):
    the library, the CLIs included, does not depend on the converters; the prep CLI finds them through
    entry points at run time only."""
    script = textwrap.dedent(
        """
        import importlib, importlib.abc, pkgutil, sys

        class NoDataPrep(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "data_prep" or name.startswith("data_prep."):
                    raise ImportError(f"{name} imported by the library")
                return None

        sys.meta_path.insert(0, NoDataPrep())
        import nemo_ext
        names = [m.name for m in pkgutil.walk_packages(nemo_ext.__path__, "nemo_ext.")]
        for name in names:
            importlib.import_module(name)
        from nemo_ext.tasks import all_tasks
        from nemo_ext.worlds import WORLDS
        from nemo_ext.eval.core import EVALUATIONS
        assert {t.world for t in all_tasks()} <= set(WORLDS.names())
        print(len(names), "modules;", [t.name for t in all_tasks()], WORLDS.names(), EVALUATIONS.names())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=cli_env(),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "modules;" in out.stdout


def test_no_core_file_names_a_task_or_a_source():
    """The task, world, source and evaluation names appear in their own folders and converter modules,
    the recipes, docs and tests, never in the shared code below nemo_ext/ (outside nemo_ext/tasks/)."""
    from nemo_ext.data.sources import SOURCES
    from nemo_ext.tasks import all_tasks

    # "general" is the default recipe (schema defaults), "videos" the default source; "episodes" is also a
    # plain word of the evaluation core (a held-out episode), "instructions" a field of the shards' json
    names = ({t.name for t in all_tasks()} | set(SOURCES.names())) - {"general", "videos", "episodes", "instructions"}
    offenders = []
    for path in sorted((REPO / "nemo_ext").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("nemo_ext/tasks/"):
            continue
        text = path.read_text()
        for name in sorted(names):
            if f'"{name}"' in text or f"'{name}'" in text:
                offenders.append(f"{rel}: {name!r}")
    assert not offenders, offenders


def test_registries_list_what_is_registered():
    from nemo_ext.data.sources import SOURCES
    from nemo_ext.eval.core import EVALUATIONS
    from nemo_ext.tasks import all_tasks, get_task
    from nemo_ext.worlds import WORLDS

    tasks = {t.name for t in all_tasks()}
    assert {"general", "action_control"} <= tasks
    assert {"general", "action"} <= set(WORLDS.names())
    assert {"videos", "instructions", "bridge", "lerobot", "episodes"} <= set(SOURCES.names())
    assert "action_control" in EVALUATIONS
    assert get_task("action_control").sidecars == {"actions.npy": "transitions"}
    try:
        get_task("nope")
    except KeyError as exc:
        assert "unknown task 'nope'; registered:" in str(exc)
    else:
        raise AssertionError("an unknown task must be an error")
