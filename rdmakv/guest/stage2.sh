#!/bin/bash
# rdmakv UML guest, stage 2: PID 1 inside the overlay root (exec'd by stage1.sh).
#
# Brings up lo, a dummy netdev d0 (192.0.2.1/24; it never leaves the guest) and rxe0 on it,
# checks PORT_ACTIVE (sysfs, then ibv_devinfo), then runs the caller's command with its cwd and
# environment. The command's stdout/stderr go through fifos + cat to /dev/tty1 and /dev/tty2,
# which the harness wired to host pipes (con1/con2), so the command never sees a tty.
# Results go to the io dir (host, read-write): rc (exit status), error (one-line setup
# failure), t_* (timestamps). Each process costs ~20-50 ms under UML: builtins where possible.
# What qemu-stage2.sh does alike (fail, network + rxe, running the command) is in
# stage2-common.sh.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
io=/run/rdmakv-io
printf '%s\n' "$EPOCHREALTIME" >"$io/t_stage2"
# shellcheck source=stage2-common.sh
. "$io/stage2-common.sh"

halt_now() {
    sync
    echo o >/proc/sysrq-trigger 2>/dev/null
    read -r -t 5 -u 9 2>/dev/null || sleep 5
    /usr/bin/python3 -c 'import ctypes; ctypes.CDLL(None).reboot(0x4321fedc)' 2>/dev/null
    sleep 30
}

mkfifo /run/rdmakv-out /run/rdmakv-err /run/rdmakv-tick || fail "mkfifo in /run failed"
exec 9<>/run/rdmakv-tick # `read -t S -u 9` sleeps without a fork
cp -a "$io/devlinks/." /dev/ || fail "cannot create /dev/fd and /dev/std* links"

# --- network + rxe ----------------------------------------------------------------------
setup_rxe

# --- output channels ----------------------------------------------------------------------
for t in /dev/tty1 /dev/tty2; do
    [[ -c $t ]] || fail "$t missing (con1/con2 not configured?)"
    stty -F "$t" raw -echo || fail "stty raw on $t failed"
done
cat /run/rdmakv-out >/dev/tty1 &
p_out=$!
cat /run/rdmakv-err >/dev/tty2 &
p_err=$!

# --- the command --------------------------------------------------------------------------
read_command
printf '%s\n' "$EPOCHREALTIME" >"$io/t_cmd"
run_command </dev/null >/run/rdmakv-out 2>/run/rdmakv-err
rc=$?
printf '%s\n' "$EPOCHREALTIME" >"$io/t_end"

# Let the relays drain. A background child of the command that still holds stdout/stderr
# open gets 2 s, then its output is cut off.
drain_until=$((${EPOCHREALTIME/./} + 2000000))
while kill -0 "$p_out" 2>/dev/null || kill -0 "$p_err" 2>/dev/null; do
    ((${EPOCHREALTIME/./} < drain_until)) || break
    read -r -t 0.01 -u 9
done
kill "$p_out" "$p_err" 2>/dev/null

printf '%s\n' "$rc" >"$io/rc"
halt_now
