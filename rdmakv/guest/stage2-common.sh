# shellcheck shell=bash
# rdmakv guest, stage 2: what stage2.sh (UML) and qemu-stage2.sh (QEMU) share. Both source
# this file from the io dir ($io, where the harness copies it next to them) right after
# stamping t_stage2. It turns on tracing when asked and defines functions; it runs nothing
# else. The sourcing script defines halt_now (how to end the guest differs).

if [[ -e $io/trace ]]; then
    PS4='+ $EPOCHREALTIME '
    set -x
fi

fail() {
    echo "rdmakv stage2: $*" >&2
    echo "$*" >"$io/error"
    halt_now
}

first_line() { # first line of a file (for error messages)
    local line=
    IFS= read -r line <"$1" 2>/dev/null
    printf '%s' "$line"
}

# ulimit -l, then lo, the dummy netdev d0 (io/net.ip) and rxe0 on it, checked PORT_ACTIVE.
# A two-node UML run puts rxe0 on the link between the guests instead: io/netdev names it
# (line 1: vec0; line 2: what io/net.ip does, for the error message). Needs the tick fifo on fd 9 (`read -t S -u 9` sleeps
# without a fork).
setup_rxe() {
    local netdev=d0 what="lo up, dummy d0 192.0.2.1/24"
    if [[ -e $io/netdev ]]; then
        { IFS= read -r netdev; IFS= read -r what; } <"$io/netdev"
    fi
    ulimit -l unlimited || fail "ulimit -l unlimited failed"
    ip -batch "$io/net.ip" 2>/run/rdmakv-ip.err ||
        fail "network setup ($what) failed: $(first_line /run/rdmakv-ip.err)"
    rdma link add rxe0 type rxe netdev "$netdev" 2>/run/rdmakv-rdma.err ||
        fail "rdma link add rxe0 type rxe netdev $netdev failed: $(first_line /run/rdmakv-rdma.err)"
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
}

# The caller's command from the io dir: globals argv, envv, cwd.
read_command() {
    mapfile -t -d '' argv <"$io/argv" || fail "cannot read $io/argv"
    mapfile -t -d '' envv <"$io/env" || fail "cannot read $io/env"
    IFS= read -r -d '' cwd <"$io/cwd"
    ((${#argv[@]} > 0)) || fail "empty command"
}

# Run the command (read_command) in its cwd with exactly its environment; the caller
# redirects its stdin/stdout/stderr. Returns its exit status.
run_command() (
    cd -- "$cwd" || { echo "rdmakv guest: cannot cd to $cwd" >&2; exit 126; }
    exec env -i "${envv[@]}" "${argv[@]}"
)
