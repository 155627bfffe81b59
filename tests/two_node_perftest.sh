#!/bin/bash
# Cross-guest RDMA READ with perftest, for `rdmakv rxe-vm --nodes 2 -- tests/two_node_perftest.sh`.
#
# Both guests run this script; RDMAKV_NODE says which one this is. Node 1 serves
# ib_read_lat (2 B) and then ib_read_bw (64 KiB); node 0 pings node 1 and runs the clients
# against it over the vec0 link, retrying each client until node 1's server listens (the
# guests boot in parallel and node 1 may be a few hundred ms behind). perftest's -n (iteration
# count), not -D: duration mode miscounts under emulation (docs/rdma-path.md §5). -F: UML's cpuinfo has no
# frequency scaling to complain about. Environment knobs: LAT_ITERS, BW_ITERS.
set -u
: "${RDMAKV_NODE:?run me through rdmakv rxe-vm --nodes 2}"
IFS=, read -r addr0 addr1 <<<"${RDMAKV_NODE_ADDRS:-192.0.2.1,192.0.2.2}"
lat_iters=${LAT_ITERS:-1000}
bw_iters=${BW_ITERS:-2000}

# The GID index of rxe0's IPv4-mapped RoCE v2 GID for this node's address (index 0 is the
# IPv6 link-local one, which may still be tentative right after boot).
gid_index() {
    local want f gid
    want=$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' ${1//./ })
    for f in /sys/class/infiniband/rxe0/ports/1/gids/*; do
        IFS= read -r gid <"$f" 2>/dev/null || continue
        [[ $gid == "$want" ]] && { echo "${f##*/}"; return 0; }
    done
    return 1
}

me=$addr0
((RDMAKV_NODE == 1)) && me=$addr1
gid=$(gid_index "$me") || { echo "no IPv4 GID for $me on rxe0" >&2; exit 2; }

if ((RDMAKV_NODE == 1)); then
    # Each server handles one client and exits; the harness stops this guest after node 0.
    ib_read_lat -d rxe0 -x "$gid" -F -s 2 -n "$lat_iters" -p 18516 || exit 1
    ib_read_bw -d rxe0 -x "$gid" -F -s 65536 -n "$bw_iters" -p 18515 || exit 1
    exit 0
fi

# --- node 0 ------------------------------------------------------------------------------
if command -v ping >/dev/null; then
    ping -c 3 "$addr1" || exit 1
elif command -v busybox >/dev/null; then
    busybox ping -c 3 "$addr1" || exit 1
fi

# Run a perftest client until it connects (node 1's server may not listen yet), at most ~10 s.
client() {
    local out i
    for ((i = 0; i < 50; i++)); do
        if out=$("$@" "$addr1" 2>&1); then
            printf '%s\n' "$out"
            return 0
        fi
        sleep 0.2
    done
    printf '%s\n' "$out" >&2
    return 1
}
client ib_read_lat -d rxe0 -x "$gid" -F -s 2 -n "$lat_iters" -p 18516 || exit 1
client ib_read_bw -d rxe0 -x "$gid" -F -s 65536 -n "$bw_iters" -p 18515 || exit 1
