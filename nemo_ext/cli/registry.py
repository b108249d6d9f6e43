"""What the registries hold: the recipes, tasks, sample worlds, prep sources and evaluations (`make help`).

    python -m nemo_ext.cli.registry
"""

from __future__ import annotations

import sys


def lines() -> list[str]:
    from nemo_ext.config.compose import available_recipes
    from nemo_ext.data.sources import SOURCES
    from nemo_ext.eval.core import EVALUATIONS
    from nemo_ext.tasks import all_tasks
    from nemo_ext.worlds import WORLDS

    out = ["Registered (found by the registries, nemo_ext/registry.py):",
           f"  recipes (recipe=):      {', '.join(available_recipes())}"]
    out += [f"  task {t.name}: {', '.join(t.families)}; world {t.world}; {t.description}" for t in all_tasks()]
    out.append(f"  sample worlds:          {', '.join(WORLDS.names())}")
    out.append(f"  prep sources (SOURCE=): {', '.join(SOURCES.names())}")
    out.append(f"  evaluations (make eval): {', '.join(EVALUATIONS.names())}")
    return out


def main() -> int:
    print("\n".join(lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
