#!/usr/bin/env bash
# Build the UML guest kernel with rxe from Debian's linux-source-6.1 into $1 (a cache dir).
# Usage: build-uml.sh CACHE_DIR  -> CACHE_DIR/linux. Idempotent per config hash (caller's job).
set -euo pipefail
out=${1:?cache dir}
here=$(cd "$(dirname "$0")" && pwd)
src_tar=$(ls /usr/src/linux-source-6.1.tar.xz)
work=$(mktemp -d "${TMPDIR:-/tmp}/rdmakv-uml-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf "$src_tar"
cd "$work"/linux-source-6.1
# Hosts whose XSAVE area is larger than 6.1's UML expects (AMX) panic the guest at boot
# ("ptrace set fp regs failed, errno = 14"); the patch says why and what it changes.
patch -s -p1 < "$here/uml-xstate.patch"
make -s ARCH=um x86_64_defconfig
./scripts/kconfig/merge_config.sh -m -O . .config "$here/uml.config" >/dev/null
make -s ARCH=um olddefconfig
for opt in RDMA_RXE INFINIBAND_USER_ACCESS HOSTFS OVERLAY_FS DUMMY; do
  grep -q "^CONFIG_${opt}=y" .config || { echo "build-uml: CONFIG_${opt} did not stick" >&2; exit 1; }
done
make -s ARCH=um -j"$(nproc)" linux
mkdir -p "$out"
install -m 0755 linux "$out/linux.tmp"
cp .config "$out/config"
mv "$out/linux.tmp" "$out/linux"
