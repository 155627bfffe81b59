#!/bin/sh
# rdmakv QEMU guest, stage 1: /init of the initramfs (busybox sh, PID 1), built by
# rdmakv.guest.rxe_vm from this file, busybox-static and the kernel modules listed in /modules.list
# (already in dependency order, from `modprobe --show-depends`).
#
# The harness exports four 9p shares (virtio-9p-pci, mount tags):
#   root     the host's / (read-only)  -> lower layer of an overlay with a tmpfs upper layer
#   io       the run's io dir (rw)     -> /run/rdmakv-io (stage 2 script, argv, env, rc, ...)
#   modules  <kernel>/lib/modules (ro) -> /lib/modules (the host has no tree for this kernel)
#   cwd      the caller's cwd (rw)     -> the same path (after /tmp, /run, /dev/shm)
# plus fresh /proc /sys /dev /dev/pts /dev/shm /tmp /run and the io dir's devlinks in /dev,
# then switch_root into the overlay and exec stage 2 (qemu-stage2.sh, bash from the host).
# Errors go to the console (ttyS0, the host's console.log) and, once mounted, to io/error.
# This file is part of the initramfs cache key: editing it rebuilds the initramfs.
PATH=/bin
export PATH
/bin/busybox --install -s /bin

# 9p tuning: msize 512000 reads ~100 MB/s (8192: ~15 MB/s). The read-only root may cache
# everything (cache=loose); the writable shares must show host changes and support shared
# writable mmap, hence cache=mmap there.
P9=trans=virtio,version=9p2000.L,msize=512000
R=/newroot

fail() {
    echo "rdmakv stage1: $*" >&2
    [ -d $R/run/rdmakv-io ] && echo "stage1: $*" >$R/run/rdmakv-io/error 2>/dev/null
    sync
    reboot -f
    sleep 30
}

mount -t proc proc /proc || fail "mount /proc failed"
mount -t sysfs sysfs /sys || fail "mount /sys failed"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs on /dev failed"

while read -r mod args; do
    # shellcheck disable=SC2086  # args are module parameters, one word each
    insmod "/lib/modules/$mod" $args || fail "insmod $mod $args failed"
done </modules.list

mkdir -p /lower /rw $R
# The virtio-9p devices may appear a moment after the driver loaded: retry for up to ~5 s.
i=0
until mount -t 9p -o ro,$P9,cache=loose root /lower 2>/dev/null; do
    i=$((i + 1))
    [ $i -lt 100 ] || fail "mounting the host root (9p tag 'root') failed"
    usleep 50000
done
mount -t tmpfs -o mode=0755 rdmakv-rw /rw || fail "tmpfs for the overlay upper layer failed"
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work rdmakv-root $R ||
    fail "overlay (tmpfs over the 9p host root) failed"

# Fresh kernel filesystems inside the new root (the lower layer shows the host's own /proc,
# /sys and /dev directories through 9p; these mounts hide them).
mount --move /proc $R/proc || fail "moving /proc failed"
mount --move /sys $R/sys || fail "moving /sys failed"
mount --move /dev $R/dev || fail "moving /dev failed"
mount -t tmpfs -o mode=0755 tmpfs $R/run || fail "tmpfs on /run failed"
mkdir -p $R/run/rdmakv-io
mount -t 9p -o $P9,cache=mmap io $R/run/rdmakv-io || fail "mounting the io dir (9p tag 'io') failed"
mkdir -p $R/lib/modules
mount -t 9p -o ro,$P9,cache=loose modules $R/lib/modules ||
    fail "mounting the kernel modules (9p tag 'modules') failed"
# The rest of the mounts are done here too: busybox runs from RAM, while every program stage 2
# starts is loaded through 9p (~0.1 s each under TCG).
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || fail "tmpfs on /tmp failed"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts $R/dev/pts || fail "devpts on /dev/pts failed"
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm || fail "tmpfs on /dev/shm failed"
cp -a $R/run/rdmakv-io/devlinks/. $R/dev/ || fail "cannot create /dev/fd and /dev/std* links"
IFS= read -r -d '' cwd <$R/run/rdmakv-io/cwd || fail "cannot read the io dir's cwd file"
if [ "$cwd" != / ]; then
    # after /tmp, /run, /dev/shm so that a cwd below them is not hidden
    mkdir -p "$R$cwd"
    mount -t 9p -o $P9,cache=mmap cwd "$R$cwd" || fail "mounting the cwd $cwd (9p tag 'cwd') failed"
fi

exec switch_root $R /bin/bash /run/rdmakv-io/qemu-stage2.sh
fail "switch_root into the overlay root and exec /bin/bash failed"
