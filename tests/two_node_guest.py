"""Runs on both guests of ``rxe_vm.run(..., nodes=2)`` (tests/test_two_node_guest.py).

Node 1 serves, node 0 checks and prints one ``two-node:`` line per check:
1. TCP over the link: node 1 listens on its address, node 0 connects, says hello, reads the
   reply (which names node 1's role, so the bytes really came from the other guest);
2. a real RDMA READ across it: perftest ib_read_lat -n ITERS, server on node 1, client on
   node 0 against node 1's address.
Node 0 retries each connection for up to RETRY_S: the guests boot in parallel, node 1 may be
a little behind. Everything blocks or sleeps between tries (one CPU per guest, HZ=100).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

PORT = 7471
RETRY_S = 15.0
ITERS = int(os.environ.get("TWO_NODE_ITERS", "100"))


def _gid_index(addr: str) -> str:
    """rxe0's GID table index of the IPv4-mapped RoCE v2 GID of ``addr``."""
    want = "0000:0000:0000:0000:0000:ffff:" + "{:02x}{:02x}:{:02x}{:02x}".format(*map(int, addr.split(".")))
    gids = "/sys/class/infiniband/rxe0/ports/1/gids"
    for name in sorted(os.listdir(gids), key=int):
        try:
            with open(os.path.join(gids, name)) as f:
                if f.read().strip() == want:
                    return name
        except OSError:
            continue
    raise SystemExit(f"no IPv4 GID for {addr} on rxe0")


def _perftest_args(addr: str) -> list[str]:
    return ["ib_read_lat", "-d", "rxe0", "-x", _gid_index(addr), "-F", "-s", "2", "-n", str(ITERS), "-p", "18516"]


def node1(me: str) -> int:
    with socket.create_server((me, PORT)) as srv:
        conn, _ = srv.accept()  # blocks: no spinning on the guest's one CPU
        with conn:
            hello = conn.recv(100)
            conn.sendall(b"node1 got " + hello + f" role={os.environ['RDMAKV_NODE']}".encode())
    # One client, then exit; the harness stops this guest shortly after node 0 ends anyway.
    return subprocess.run(_perftest_args(me), stdout=subprocess.DEVNULL).returncode


def _retry(what: str, attempt):
    deadline = time.monotonic() + RETRY_S
    while True:
        try:
            return attempt()
        except (OSError, RuntimeError) as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what}: gave up after {RETRY_S:g} s: {e}") from None
            time.sleep(0.2)


def node0(me: str, peer: str) -> int:
    def tcp() -> bytes:
        with socket.create_connection((peer, PORT), timeout=5) as c:
            c.sendall(b"hello from " + me.encode())
            return c.recv(100)

    reply = _retry("tcp", tcp)
    print(f"two-node: tcp {reply.decode()}", flush=True)

    def read_lat() -> str:
        out = subprocess.run([*_perftest_args(me), peer], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(out.stdout[-300:] + out.stderr[-300:])
        return out.stdout

    out = _retry("ib_read_lat", read_lat)
    rows = [line.split() for line in out.splitlines() if line.split()[:2] == ["2", str(ITERS)]]
    if not rows:
        print(out, file=sys.stderr)
        return 1
    print(f"two-node: ib_read_lat 2 B typical {rows[0][4]} us over {ITERS} iterations", flush=True)
    return 0


def main() -> int:
    node = int(os.environ["RDMAKV_NODE"])
    addrs = os.environ["RDMAKV_NODE_ADDRS"].split(",")
    print(f"two-node: node {node} of {os.environ['RDMAKV_NODES']} at {addrs[node]}", flush=True)
    return node1(addrs[1]) if node == 1 else node0(addrs[0], addrs[1])


if __name__ == "__main__":
    sys.exit(main())
