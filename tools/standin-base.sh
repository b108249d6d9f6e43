#!/usr/bin/env bash
# A stand-in for the NGC PyTorch base image, made on this machine (NGC cannot be pulled here):
#
#   tools/standin-base.sh PYTHON     (as root; prints the image name on its last line)
#
# * a minbase rootfs of this host's Debian release (debootstrap), with the Debian packages of the
#   libraries PYTHON and its extension modules link, and ca-certificates;
# * PYTHON's installation (a CPython 3.12 built with a shared libpython, as pyenv builds it) copied to
#   /usr/local, where the official python images keep theirs: its compiled-in prefix is another path,
#   and from /usr/local/bin CPython finds its standard library by the landmark search (a venv of it
#   too); only pip of its site-packages, no test suite;
# * this host's CA bundle as the image's, and PIP_CERT naming it (so pip, also a venv's own pip, reaches
#   the index through a TLS-intercepting proxy);
# * the locked torch and what it needs (tools/envlock.py subset torch), hash-checked, installed into
#   that Python as NGC's torch is installed into its own.
# The image, localhost/cosmos-standin-base:py<version>-torch<version>-<key>, is built once: the key
# hashes this script, the torch lines of the lock and the package list.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:?usage: tools/standin-base.sh PYTHON}"
pyhome="$("$py" -c 'import sys; print(sys.base_prefix)')"
pyver="$("$py" -c 'import platform; print(platform.python_version())')"
minor="${pyver%.*}"
codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

libs="$( { ldd "$pyhome/bin/python$minor"; find "$pyhome/lib/python$minor/lib-dynload" -name '*.so' -exec ldd {} \; ; } \
        | awk '$2 == "=>" && $3 ~ /^\/(usr\/)?lib/ {print $3}' | sort -u)"
pkgs="$(for l in $libs; do dpkg -S "$(readlink -f "$l")" 2>/dev/null || dpkg -S "$l" 2>/dev/null || true; done \
        | cut -d: -f1 | sort -u | paste -sd, -)"
pkgs="ca-certificates${pkgs:+,$pkgs}"
torch_reqs="$(mktemp)"
"$py" "$here/tools/envlock.py" subset torch > "$torch_reqs"
torch_version="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$torch_reqs")"
key="$(cat "${BASH_SOURCE[0]}" "$torch_reqs" <(echo "$codename $pkgs $pyver") | sha256sum | cut -c1-12)"
image="localhost/cosmos-standin-base:py${pyver}-torch${torch_version%%+*}-${key}"
if buildah images --quiet "$image" >/dev/null 2>&1; then
  echo "stand-in base $image exists" >&2
  echo "$image"
  exit 0
fi

rootfs="$(mktemp -d /var/tmp/standin-rootfs.XXXXXX)"
context="$(mktemp -d)"
ctr=""
cleanup() {
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1
  rm -rf "$rootfs" "$context" "$torch_reqs"
}
trap cleanup EXIT
t0=$(date +%s)
echo "debootstrap --variant=minbase $codename (+ $pkgs)" >&2
debootstrap --variant=minbase --include="$pkgs" "$codename" "$rootfs" "$mirror" >&2
tar -C "$pyhome" --exclude="./lib/python$minor/test" --exclude="./lib/python$minor/site-packages/*" -cf - . \
  | tar -C "$rootfs/usr/local" -xf -
cp -a "$pyhome/lib/python$minor/site-packages/"pip* "$rootfs/usr/local/lib/python$minor/site-packages/"
ln -sf "python$minor" "$rootfs/usr/local/bin/python3"
chroot "$rootfs" /sbin/ldconfig  # libpython in /usr/local/lib: its RUNPATH names the host's path
chroot "$rootfs" /usr/local/bin/python3 -c 'import ssl, sqlite3, ctypes, lzma, bz2; print("python ok")' >&2
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

ctr="$(buildah from scratch)"
mnt="$(buildah mount "$ctr")"
tar -C "$rootfs" -cf - . | tar -C "$mnt" -xf -
buildah umount "$ctr" >/dev/null
# PIP_CERT: pip's own (vendored) CA list would not trust this host's proxy; a site's base image would
# carry its CA the same way
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
  --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd /bin/bash "$ctr"
buildah commit --quiet "$ctr" "localhost/cosmos-standin-rootfs:$key" >&2

cp "$torch_reqs" "$context/torch-requirements.txt"
cat > "$context/Containerfile" <<EOF
FROM localhost/cosmos-standin-rootfs:$key
COPY torch-requirements.txt /tmp/torch-requirements.txt
RUN python3 -m pip install --no-cache-dir --no-deps --require-hashes -r /tmp/torch-requirements.txt \
 && rm /tmp/torch-requirements.txt
EOF
buildah bud --isolation chroot --quiet -t "$image" -f "$context/Containerfile" "$context" >&2
buildah rmi "localhost/cosmos-standin-rootfs:$key" >/dev/null 2>&1 || true
echo "stand-in base built in $(( $(date +%s) - t0 )) s" >&2
echo "$image"
