"""The console filter: known-benign third-party notices become one line each, the rest is untouched."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from support import REPO, cli_env


def _stream():
    from nemo_ext.utils.console import _QuietStream

    raw, shown = io.StringIO(), set()
    return _QuietStream(raw, shown, raw), raw


def test_known_notices_become_one_line_each_and_the_rest_passes():
    quiet, raw = _stream()
    te = ("[NeMo W 2026-12-02 05:36:36 nemo_logging:364] /x/megatron/core/optimizer/__init__.py:25: UserWarning: "
          "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.\n      warnings.warn(\n    \n")
    for _ in range(4):
        quiet.write(te)
    quiet.write("Apex is not installed. Falling back to Torch Norm\n")
    print("OneLogger: Setting error_handling_strategy to DISABLE_QUIETLY for rank (rank=0)", file=quiet)
    print("No exporters were provided. This means that no telemetry data will be collected.", file=quiet)
    quiet.write("W1202 05:36:36.052000 9868 torch/utils/cpp_extension.py:183] No CUDA runtime is found, using "
                "CUDA_HOME='/usr/local'\n")
    quiet.write("/x/megatron/core/inference/contexts/kv_block_allocator.py:426: SyntaxWarning: invalid escape "
                "sequence '\\-'\n")
    quiet.write("HPU available: False, using: 0 HPUs\n")
    quiet.write("UserWarning: something we have never seen\n")
    quiet.write("step 5/5 | loss 0.9190\n")
    lines = raw.getvalue().splitlines()
    notices = [line for line in lines if " notice] " in line]
    assert len(notices) == 4, lines  # TE/apex (5 writes), OneLogger (2 prints), CUDA runtime, SyntaxWarning
    assert "transformer-engine and apex are not installed" in notices[0] and "torch's optimizers" in notices[0]
    assert lines[-2:] == ["UserWarning: something we have never seen", "step 5/5 | loss 0.9190"]
    assert not any("Falling back" in line or "OneLogger:" in line or "HPU" in line or line == "" for line in lines)


def test_verbose_shows_everything():
    script = textwrap.dedent(
        """
        import sys, warnings
        from nemo_ext.utils.console import quiet_known_notices
        installed = quiet_known_notices(verbose="-v" in sys.argv)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        print("installed" if installed else "verbose")
        """
    )
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=cli_env())
    loud = subprocess.run([sys.executable, "-c", script, "-v"], capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert quiet.stdout.strip() == "installed" and "Falling back" not in quiet.stderr and " notice] " in quiet.stderr
    assert loud.stdout.strip() == "verbose" and "Falling back to Torch optimizers" in loud.stderr
    env = dict(cli_env(), COSMOS_VERBOSE="1")
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    assert again.stdout.strip() == "verbose" and "Falling back to Torch optimizers" in again.stderr
