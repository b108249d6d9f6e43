"""The benchmark bookkeeping without running a model: which cases a scaling run measures, how its
efficiencies are computed, and that the README table is generated from result files (ratios,
targets, the memory and data rows)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import scaling  # noqa: E402
import summarize  # noqa: E402


def _args(**kw):
    base = dict(nproc=4, layouts=["dp_distopt", "tp2_sp", "cp2"], modes=["strong", "weak"], override=[], microbatches=1)
    return types.SimpleNamespace(**{**base, **kw})


def test_scaling_plans_weak_and_strong_cases_and_their_baselines():
    baselines, cases = scaling.plan_cases(_args())
    assert [b["label"] for b in baselines] == ["single", "single_accum4"]
    assert baselines[1]["microbatches"] == 4
    by_label = {c["label"]: c for c in cases}
    assert set(by_label) == {"dp_distopt", "tp2_sp", "tp2_sp_weak", "cp2", "cp2_weak"}
    assert by_label["dp_distopt"]["mode"] == "weak" and by_label["dp_distopt"]["dp"] == 4
    assert by_label["tp2_sp"]["frames_scale"] == 1 and by_label["tp2_sp"]["dp"] == 2
    assert by_label["tp2_sp_weak"]["frames_scale"] == 2 and by_label["cp2_weak"]["frames_scale"] == 2
    with pytest.raises(SystemExit, match="does not divide"):
        scaling.plan_cases(_args(nproc=3, layouts=["tp2_sp"]))


def test_scaling_efficiency_is_per_gpu_throughput_against_the_baseline():
    base = {"single": {"status": "ok", "flops_per_step": 100.0, "step_time_s_median": 1.0, "global_batch": 1},
            "single_accum2": {"status": "ok", "flops_per_step": 200.0, "step_time_s_median": 1.9, "global_batch": 2}}
    dp = {"status": "ok", "tp": 1, "cp": 1, "pp": 1, "dp": 2, "mode": "weak", "world_size": 2,
          "flops_per_step": 200.0, "step_time_s_median": 1.05, "global_batch": 2}
    eff = scaling.efficiency(dp, base)
    assert eff["efficiency_weak"] == pytest.approx(1 / 1.05, abs=1e-4)
    assert eff["efficiency_strong"] == pytest.approx(1.9 / (2 * 1.05), abs=1e-4)
    tp = {"status": "ok", "tp": 2, "cp": 1, "pp": 1, "dp": 1, "mode": "strong", "world_size": 2,
          "flops_per_step": 100.0, "step_time_s_median": 0.625, "global_batch": 1}
    eff = scaling.efficiency(tp, base)
    assert eff["efficiency"] == pytest.approx(0.8) and eff["speedup"] == pytest.approx(1.6)
    assert scaling.target_of(tp) == ("efficiency", 0.8) and scaling.target_of(dp) == ("efficiency_weak", 0.9)
    assert scaling.efficiency(dict(tp, status="oom"), base) == {}


def _variant(name, seconds, mfu=None, status="ok"):
    return {"variant": name, "status": status, "step_time_s_median": seconds, "mfu": mfu}


def test_summary_table_is_generated_from_result_files(tmp_path):
    dit = {"benchmark": "dit_step", "hardware": {"gpu": "NVIDIA H100 80GB HBM3"},
           "shape": {"name": "general", "tokens_per_sample": 56320, "batch": 1},
           "model": {"preset": "dit_7b", "num_layers": 4},
           "variants": [_variant("ours_eager", 1.9, 0.5), _variant("ours_compiled", 1.5, 0.63),
                        _variant("diffusers_compiled", 1.84, 0.53), _variant("diffusers_compiled_cudnn", None, status="oom")]}
    memory = {"benchmark": "scaling", "hardware": {"gpu": "NVIDIA H200"}, "nproc": 4, "steps": 10, "warmup": 1,
              "model": {"preset": "dit_14b", "num_layers": 36}, "shape": {"name": "general"},
              "layouts": [{"label": "tp4_sp", "overrides": ["parallel.recompute=full"], "status": "ok",
                           "step_time_s_median": 8.0, "mfu": 0.4, "peak_memory_gib_per_rank": [80.0, 81.5, 80.0, 80.0]}]}
    dali = {"benchmark": "dali_decode", "hardware": {"gpu": "NVIDIA H100 80GB HBM3"},
            "results": [{"height": 704, "width": 1280, "runs": [{"loader": "dali_gpu", "frames_per_s": 907.2}]}]}
    for name, content in (("dit_step_general_H100_x.json", dit), ("scaling_dit_14b-36L_general_H200x4_x.json", memory),
                          ("dali_decode_h264_H100_x.json", dali)):
        (tmp_path / name).write_text(json.dumps(content))
    rows = summarize.collect(tmp_path)
    peer = next(r for r in rows if r["reference"].startswith("diffusers + torch.compile"))
    assert peer["ratio"] == "1.227x" and peer["target"] == ">= 1.2x" and peer["met"] == "yes"
    assert peer["ours"].startswith("ours_compiled: 1.500 s (63.0% MFU)")
    cudnn = next(r for r in rows if r["reference"].startswith("peer with cuDNN"))
    assert cudnn["reference"].endswith("oom") and cudnn["ratio"] == "-"
    mfu = next(r for r in rows if r["item"] == "1 DiT step MFU")
    assert mfu["met"] == "yes"
    mem = next(r for r in rows if r["item"] == "3 memory")
    assert mem["met"] == "yes" and "peak 81.5 GiB/GPU" in mem["ours"] and mem["hw"] == "4x H200"
    data = next(r for r in rows if r["item"] == "5 data")
    assert data["met"] == "yes" and "907 frames/s" in data["ours"]

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{summarize.BEGIN}\nold\n{summarize.END}\noutro\n")
    summarize.write_readme(summarize.table(rows), readme)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("outro")
    assert "(results/dit_step_general_H100_x.json)" in text
