#!/bin/bash
# rdmakv UML guest, stage 2: PID 1 inside the overlay root (exec'd by stage1.sh).
#
# Brings up lo, a dummy netdev d0 (192.0.2.1/24; it never leaves the guest) and rxe0 on it,
# checks PORT_ACTIVE (sysfs, then ibv_devinfo), then runs the caller's command with its cwd and
# environment. The command's stdout/stderr go through fifos + cat to /dev/tty1 and /dev/tty2,
# which the harness wired to host pipes (con1/con2), so the command never sees a tty.
# Results go to the io dir (host, read-write): rc (exit status), error (one-line setup
# failure), t_* (timestamps). Each process costs ~20-50 ms under UML: builtins where possible.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
io=/run/rdmakv-io
printf '%s\n' "$EPOCHREALTIME" >"$io/t_stage2"
if [[ -e $io/trace ]]; then
    PS4='+ $EPOCHREALTIME '
    set -x
fi

halt_now() {
    sync
    echo o >/proc/sysrq-trigger 2>/dev/null
    read -r -t 5 -u 9 2>/dev/null || sleep 5
    /usr/bin/python3 -c 'import ctypes; ctypes.CDLL(None).reboot(0x4321fedc)' 2>/dev/null
    sleep 30
}

fail() {
    echo "rdmakv stage2: $*" >&2
    echo "$*" >"$io/error"
    halt_now
}

first_line() {  # first line of a file (for error messages)
    local line=
    IFS= read -r line <"$1" 2>/dev/null
    printf '%s' "$line"
}

mkfifo /run/rdmakv-out /run/rdmakv-err /run/rdmakv-tick || fail "mkfifo in /run failed"
exec 9<>/run/rdmakv-tick # `read -t S -u 9` sleeps without a fork
cp -a "$io/devlinks/." /dev/ || fail "cannot create /dev/fd and /dev/std* links"
ulimit -l unlimited || fail "ulimit -l unlimited failed"

# --- network + rxe ----------------------------------------------------------------------
ip -batch "$io/net.ip" 2>/run/rdmakv-ip.err ||
    fail "network setup (lo up, dummy d0 192.0.2.1/24) failed: $(first_line /run/rdmakv-ip.err)"
rdma link add rxe0 type rxe netdev d0 2>/run/rdmakv-rdma.err ||
    fail "rdma link add rxe0 type rxe netdev d0 failed: $(first_line /run/rdmakv-rdma.err)"
state=
for ((i = 0; i < 200; i++)); do
    IFS= read -r state 2>/dev/null </sys/class/infiniband/rxe0/ports/1/state
    [[ $state == *": ACTIVE" ]] && break
    read -r -t 0.05 -u 9
done
ibv_devinfo -d rxe0 >/run/rdmakv-devinfo 2>&1
mapfile -t devinfo </run/rdmakv-devinfo
[[ "${devinfo[*]}" == *PORT_ACTIVE* ]] ||
    fail "rxe0 is not PORT_ACTIVE per ibv_devinfo -d rxe0 (sysfs state '$state'): ${devinfo[0]}"

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
mapfile -t -d '' argv <"$io/argv" || fail "cannot read $io/argv"
mapfile -t -d '' envv <"$io/env" || fail "cannot read $io/env"
IFS= read -r -d '' cwd <"$io/cwd"
((${#argv[@]} > 0)) || fail "empty command"

printf '%s\n' "$EPOCHREALTIME" >"$io/t_cmd"
(
    cd -- "$cwd" || { echo "rdmakv guest: cannot cd to $cwd" >&2; exit 126; }
    exec env -i "${envv[@]}" "${argv[@]}"
) </dev/null >/run/rdmakv-out 2>/run/rdmakv-err
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
