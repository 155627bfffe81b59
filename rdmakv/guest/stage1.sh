#!/bin/sh
# rdmakv UML guest, stage 1: PID 1, started by rdmakv.guest.rxe_vm as init=<io>/stage1.sh.
#
# The kernel mounted the host's / read-only over hostfs. The harness wrote two fstab files into
# <io> (this script's directory):
#   fstab1: <io> itself read-write over hostfs, and a tmpfs on <io>/rw for the overlay upper layer;
#   fstab2: the overlay root at <io>/root (tmpfs over the host root), then fresh proc, sysfs,
#           devtmpfs, devpts, /dev/shm, /run, /tmp inside it (never move the boot-time mounts:
#           through hostfs the host's own /proc would show), <io> at /run/rdmakv-io, the caller's
#           cwd read-write from the host at the same path, and a /proc/cpuinfo with "cpu MHz".
# Every process costs ~20-50 ms under UML, hence `mount -a` instead of one mount per line.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
io=${0%/*}

fail() {
    echo "rdmakv stage1: $*" >&2
    echo "stage1: $*" >"$io/error" 2>/dev/null
    mount -t proc proc /proc 2>/dev/null
    sync
    echo o >/proc/sysrq-trigger 2>/dev/null
    sleep 30
}

mount -a -T "$io/fstab1" || fail "mounting the io dir (hostfs, rw) or the overlay's tmpfs failed"
mkdir "$io/rw/upper" "$io/rw/work" || fail "mkdir of the overlay upper/work dirs in tmpfs failed"
mount -a -T "$io/fstab2" || fail "mounting the overlay root, /proc /sys /dev /run /tmp or the cwd failed (see console log)"
exec chroot "$io/root" /bin/bash /run/rdmakv-io/stage2.sh
fail "cannot chroot into the new root and exec /bin/bash"
