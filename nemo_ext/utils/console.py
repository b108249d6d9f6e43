"""A console a person can read: known-benign third-party notices become one INFO line each.

A CPU run of megatron-core + NeMo + Lightning opens with dozens of lines that say nothing about the
run: Transformer Engine / Apex fallbacks (four warnings, one per megatron module that checks), torch's
"No CUDA runtime is found", NeMo's OneLogger telemetry notices, a SyntaxWarning from megatron's
sources when they are first compiled, Lightning's notes on the data-iterator step we use on purpose.
:func:`quiet_known_notices` replaces each such notice by one line saying what is used instead, the
first time it appears; everything else is printed as before. ``COSMOS_VERBOSE=1`` (or the train CLI's
``-v``) shows every notice as it is.

It works on what reaches the process's Python ``sys.stdout`` / ``sys.stderr`` (warnings, logging
handlers, prints), because these notices come through three different paths: ``warnings`` captured
by NeMo's logger, torch's own logging handler, and plain prints. A notice is matched per write (a
logging record or a warning is one write). The CLIs call it when run as programs only (never on
import), before importing megatron, NeMo or torch.
"""

from __future__ import annotations

import os
import re
import sys
import time

VERBOSE_ENV = "COSMOS_VERBOSE"

# (pattern searched in one write, the line shown instead the first time; None: ours already says it)
KNOWN_NOTICES: tuple[tuple[re.Pattern, str | None], ...] = tuple((re.compile(p, re.S), text) for p, text in (
    (r"(Transformer Engine and Apex are|Apex is) not installed",
     "transformer-engine and apex are not installed: megatron-core uses torch's optimizers and norms and its "
     "local multi-tensor ops instead (TE is optional and GPU-only)"),
    (r"No CUDA runtime is found, using CUDA_HOME",
     "no CUDA runtime: torch runs on the CPU (torch's cpp_extension notice)"),
    (r"OneLogger: Setting error_handling_strategy|No exporters were provided\. This means that no telemetry",
     "NeMo's OneLogger telemetry is off: no exporter is configured, nothing is collected"),
    (r"megatron.*SyntaxWarning: invalid escape sequence|SyntaxWarning: invalid escape sequence.*megatron",
     "megatron-core's sources have invalid escape sequences (a SyntaxWarning when first compiled; harmless)"),
    (r"full scope is deprecated\. Use empty cuda_graph_modules",
     "megatron-core: a deprecated CUDA-graph scope default (no CUDA graphs are captured)"),
    (r"MimoModelConfig is experimental", None),
    (r"`dataloader_iter` step flavor|Found `dataloader_iter` argument in the `training_step`",
     "Lightning: training_step takes the data iterator (megatron draws the microbatches itself), which "
     "Lightning calls experimental"),
    (r"Implicit initialization of Rerun State Machine|RerunStateMachine initialized in mode RerunMode\.DISABLED",
     "megatron-core's rerun state machine is off (no fault-injection reruns)"),
    (r"MCore's async save is deprecated", "megatron-core: a deprecation notice about its async checkpoint save"),
    (r"There were no checkpoints found in checkpoint_dir or no checkpoint folder", None),  # our run line says it
    (r"^(TPU|HPU) available: False, using: 0", None),
))


class _QuietStream:
    """A text stream that drops the writes matching :data:`KNOWN_NOTICES` (and a bare newline right
    after one: ``print`` writes its end separately) and shows their replacement line once."""

    def __init__(self, stream, shown: set, out):
        self._stream = stream
        self._shown = shown
        self._out = out  # where replacement lines go (the real stderr)
        self._dropped = False

    def write(self, text: str) -> int:
        if self._dropped and text in ("\n", "\r\n"):
            self._dropped = False
            return len(text)
        self._dropped = False
        for pattern, replacement in KNOWN_NOTICES:
            if pattern.search(text):
                self._dropped = True
                if replacement is not None and replacement not in self._shown:
                    self._shown.add(replacement)
                    self._out.write(f"[cosmos {time.strftime('%H:%M:%S')} notice] {replacement}\n")
                    self._out.flush()
                return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


def quiet_known_notices(verbose: bool = False) -> bool:
    """Install the filter on ``sys.stdout`` and ``sys.stderr`` unless ``verbose`` or ``COSMOS_VERBOSE``
    is set (``verbose`` sets it, for the processes this one starts); True when installed. Idempotent."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return False
    if isinstance(sys.stderr, _QuietStream):
        return True
    shown: set = set()
    err = sys.stderr
    sys.stderr = _QuietStream(err, shown, err)
    sys.stdout = _QuietStream(sys.stdout, shown, err)
    return True
