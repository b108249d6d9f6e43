"""The CLIs fail fast and clearly on bad input, and print the resolved config."""

from __future__ import annotations

import subprocess
import sys

from support import REPO


def _cli(*args, module="nemo_ext.cli.train"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_print_config_shows_the_resolved_recipe():
    out = _cli("--recipe", "general", "--print-config", "model=dit_7b", "parallel=tp8_sp")
    assert out.returncode == 0, out.stderr
    assert "name: dit_7b" in out.stdout and "tp: 8" in out.stdout and "lr: 5.0e-05" in out.stdout


def test_layout_that_does_not_fit_the_world_fails_before_any_work(tmp_path):
    out = _cli("--recipe", "general", "parallel=tp2", f"runs_dir={tmp_path}")
    assert out.returncode == 2
    assert "does not divide the world size 1" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing was created


def test_unknown_recipe_and_misspelled_key_name_the_problem():
    out = _cli("--recipe", "nope")
    assert out.returncode == 2 and "unknown recipe 'nope'" in out.stderr
    out = _cli("--recipe", "general", "optim.lrr=1")
    assert out.returncode == 2 and "optim.lrr" in out.stderr


def test_help_lists_recipes_and_presets():
    out = _cli("--help")
    assert out.returncode == 0
    assert "general" in out.stdout and "dit_7b" in out.stdout and "tp8_sp" in out.stdout


def test_prep_sample_writes_the_recipe_world(tmp_path):
    out = _cli("sample", "--recipe", "general", f"data.sample_dir={tmp_path / 'w'}", "data.sample_num_videos=3",
               module="nemo_ext.cli.prep")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "w" / "manifest.json").is_file() and list((tmp_path / "w").glob("*.tar"))
