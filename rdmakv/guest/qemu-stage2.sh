#!/bin/bash
# rdmakv QEMU guest, stage 2: PID 1 inside the overlay root (exec'd by qemu-init.sh).
#
# The QEMU counterpart of stage2.sh (same io files: net.ip, argv, env, cwd, trace; same
# results: rc, error, t_*). Stage 1 already mounted everything (cwd included). Differences:
# the kernel's RDMA/virtio-console modules are loaded here (the stock Debian kernel has them
# as modules), the guest clock is set from the host's, and the command's stdout/stderr go
# straight to two virtio-serial ports (rdmakv.out/rdmakv.err) wired to host pipes. The
# harness times the run from the host-side mtimes of the t_* files (written through 9p).
# Under TCG every program started here costs ~0.1 s: builtins where possible. What both
# stage 2 scripts do alike (fail, network + rxe, running the command) is in stage2-common.sh.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
io=/run/rdmakv-io
: >"$io/t_stage2"
# shellcheck source=stage2-common.sh
. "$io/stage2-common.sh"

halt_now() {
    sync
    # A reboot ends QEMU (-no-reboot) and needs no ACPI. busybox (busybox-static is a host
    # requirement of the QEMU guest) reboots at once; sysrq 'b' is the fallback; panic=-1 the
    # last resort (if PID 1 exits, the kernel panics and reboots).
    busybox reboot -f 2>/dev/null
    echo b >/proc/sysrq-trigger 2>/dev/null
    read -r -t 30 -u 9 2>/dev/null || sleep 30
}

mkfifo /run/rdmakv-tick || fail "mkfifo in /run failed"
exec 9<>/run/rdmakv-tick # `read -t S -u 9` sleeps without a fork

read_command

# The guest clock comes from the emulated RTC (whole seconds at boot). The host stamps a file
# created over 9p with its own time: set the clock from that, so that mtimes of files in the
# cwd and time.time() agree with the host. Integer microseconds (bash has no floats). The
# host time at creation is advanced by the guest time since then, plus the start-up of
# `date` until it sets the clock, taken to be as long as that of `stat` (~0.1-0.4 s each).
set_clock() {
    local g0 g1 g2 m t ts
    g0=${EPOCHREALTIME/./}
    : >"$io/clock" || return
    g1=${EPOCHREALTIME/./}
    m=$(stat -c %.6Y "$io/clock") || return
    g2=${EPOCHREALTIME/./}
    [[ $m == +([0-9]).+([0-9]) ]] || return
    t=$((10#${m/./} + g2 - (g0 + g1) / 2 + (g2 - g1)))
    printf -v ts '%d.%06d' $((t / 1000000)) $((t % 1000000))
    date -u -s "@$ts" >/dev/null
}
set_clock || echo "rdmakv stage2: warning: could not set the guest clock from the host's" >&2

# --- modules, network + rxe -----------------------------------------------------------------
modprobe -a virtio_console dummy rdma_rxe ib_uverbs rdma_ucm 2>/run/rdmakv-modprobe.err ||
    fail "modprobe virtio_console dummy rdma_rxe ib_uverbs rdma_ucm failed: $(first_line /run/rdmakv-modprobe.err)"
setup_rxe

# --- output channels ----------------------------------------------------------------------
# virtio-serial ports appear asynchronously after virtio_console loads; devtmpfs names them
# /dev/vportNpM, their names are in sysfs (no udev for /dev/virtio-ports/*).
out= err=
for ((i = 0; i < 200; i++)); do
    for p in /sys/class/virtio-ports/vport*; do
        name=
        IFS= read -r name 2>/dev/null <"$p/name"
        [[ $name == rdmakv.out ]] && out=/dev/${p##*/}
        [[ $name == rdmakv.err ]] && err=/dev/${p##*/}
    done
    [[ -n $out && -n $err && -c $out && -c $err ]] && break
    read -r -t 0.05 -u 9
done
[[ -n $out && -n $err ]] || fail "virtio-serial ports rdmakv.out / rdmakv.err did not appear"
# A port can be open only once at a time: open each here, the command inherits the fds.
exec 7>"$out" 8>"$err" || fail "cannot open the virtio-serial ports $out $err"

# --- the command --------------------------------------------------------------------------
: >"$io/t_cmd"
run_command </dev/null >&7 2>&8 7>&- 8>&- 9<&-
rc=$?
: >"$io/t_end"
exec 7>&- 8>&-

printf '%s\n' "$rc" >"$io/rc"
halt_now
