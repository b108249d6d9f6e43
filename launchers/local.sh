#!/usr/bin/env bash
# Train a recipe on this machine: one process on CPU or one GPU, torchrun with N processes otherwise.
#
#   launchers/local.sh [-n NGPU] [--recipe R] [--family diffusion|ar] [hydra overrides ...]
#
#   NGPU unset or 0: CPU (trainer.device=cpu); 1: one GPU; N > 1: torchrun --nproc-per-node N.
#   PYTHON: the interpreter (default: the repo's .venv/bin/python, else python3).
# `make recipe=R train NGPU=N ARGS="..."` calls this script. Multi-node runs: see launchers/slurm.sbatch.j2
# (make slurm), which starts one process per GPU itself (no torchrun inside Slurm jobs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ngpu="${NGPU:-}"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--ngpu) ngpu="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
case "${ngpu:-0}" in
  ''|*[!0-9]*) echo "error: NGPU=$ngpu: expected a number of GPUs (0 = CPU)" >&2; exit 2 ;;
esac
cd "$here"
if [ "${ngpu:-0}" -eq 0 ]; then
  exec "$python" -m nemo_ext.cli.train "${args[@]}" trainer.device=cpu
elif [ "$ngpu" -eq 1 ]; then
  exec "$python" -m nemo_ext.cli.train "${args[@]}" trainer.device=gpu
else
  exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$ngpu" -m nemo_ext.cli.train "${args[@]}" trainer.device=gpu
fi
