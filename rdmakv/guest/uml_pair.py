"""Two UML guests joined by one Ethernet link, each running the same command: real two-node RoCE.

Guest i is pinned to its own host core and has a UML vector device ``vec0``; rxe0 goes on it
and node i has 192.0.2.<i+1>/24. Unlike a veth pair inside one kernel (rxe over veth does not
work on 6.1, docs/rdma-path.md §4), every RoCE packet really leaves one kernel and enters the other. The
link carries the Ethernet frames in UDP datagrams on the host's 127.0.0.1, in one of two ways
($RDMAKV_GUEST_LINK):

``udp`` (default): the harness makes two UDP sockets on 127.0.0.1, connected to each other,
  with 8 MiB receive and send buffers, and hands one to each guest (vector transport ``fd``).
  A connected socket only hears its peer, and the ports are held from the start, so
  concurrent runs cannot collide.
``l2tpv3``: each guest opens its own socket (transport ``l2tpv3``, UDP flavour) on ports the
  harness picked free, with random L2TPv3 session ids. UML gives that socket the host's
  default receive buffer (net.core.rmem_default, 208 KiB here). A burst of READ responses
  overflows it: the host counted ~40 % of the packets of a 64 KiB ib_read_bw run as
  UDP RcvbufErrors, rxe retried on timeout, and bandwidth swung between 33 and 141 MB/s. With
  ``udp`` there were no rxe retries.

The link MTU is 9000 ($RDMAKV_LINK_MTU), set on the UML command line: rxe then runs a 4096-byte
path MTU, as on the single guest's d0.

The command learns its role from ``RDMAKV_NODE`` (0 or 1), ``RDMAKV_NODES`` (2) and
``RDMAKV_NODE_ADDRS`` (192.0.2.1,192.0.2.2). Node 0's output goes to stdout/stderr unchanged,
node 1's with every line prefixed ``[node1] ``. The run's status is node 0's, except that a
node 1 that exits non-zero on its own makes a successful run fail (with node 1's status); a
node 1 still running :data:`NODE1_GRACE_S` after node 0's guest ended is killed, and that is
not a failure (a server waiting for more clients is normal).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import threading
import time

from .host import GuestError, log_step
from .runner import LineSink, guest_env, guest_run, killpg, read_float, tail_of
from .uml import check_host, pick_cpus, prepare_guest, uml_argv, uml_host_env

NODE_ADDRS = ("192.0.2.1", "192.0.2.2")
#: How long node 1 may keep running after node 0's guest ended before it is killed.
NODE1_GRACE_S = 2.0
#: The link's MTU ($RDMAKV_LINK_MTU overrides). rxe's largest path MTU is 4096, which an Ethernet MTU of 4096 + 58
#: (RoCE v2 headers) or more allows; 9000 matches the single guest. The UDP datagram carrying a
#: 9000-byte frame fits the host's loopback MTU (65536) whole.
DEFAULT_LINK_MTU = 9000
#: Receive and send buffer of each end of the ``udp`` link (the kernel doubles it). Enough for
#: rxe's default 128 outstanding READs of 64 KiB in flight in 4 KiB frames without a drop.
LINK_BUF = 8 << 20
_POLL_S = 0.02  # host-side polling of two processes; the host is not the guests' core budget


def _udp_link() -> tuple[socket.socket, socket.socket]:
    """Two UDP sockets on 127.0.0.1 connected to each other, with :data:`LINK_BUF` buffers:
    as root past net.core.rmem_max (SO_*BUFFORCE), else up to it."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        a.connect(b.getsockname())
        b.connect(a.getsockname())
        for s in (a, b):
            for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
                try:
                    s.setsockopt(socket.SOL_SOCKET, force, LINK_BUF)
                except OSError:  # not root: the kernel caps this one at rmem_max / wmem_max
                    s.setsockopt(socket.SOL_SOCKET, plain, LINK_BUF)
    except OSError as e:
        a.close()
        b.close()
        raise GuestError(f"cannot make the UDP link between the guests on 127.0.0.1: {e}") from None
    return a, b


_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # Linux values; the socket module lacks them


def _free_udp_ports(n: int) -> list[int]:
    """``n`` distinct UDP ports on 127.0.0.1 free right now (for the ``l2tpv3`` link). UML binds
    them itself, so they are released again; a port another process grabs in between fails
    ``ip link set vec0 up``, and 6.1's vector driver then panics in its error path, which the
    harness reports as a guest that died without a status (the panic in the console tail). The
    ``udp`` link has no such window."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))  # all bound at once, so the n ports are distinct
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_ids() -> tuple[int, int]:
    """Two distinct random non-zero L2TPv3 session ids (one per direction). 31 bits: the driver
    parses them with kstrtoint, so anything above INT_MAX is refused, and its error path in
    vector_net_open then panics the guest (6.1)."""
    while True:
        a, b = secrets.randbits(31), secrets.randbits(31)
        if a and b and a != b:
            return a, b


def _vec_args(kind: str, mtu: int, stack: contextlib.ExitStack) -> list[tuple[str, tuple[int, ...]]]:
    """Per node, the UML command-line argument that creates its ``vec0`` end of a ``kind`` link
    and the fds the guest must inherit for it. Sockets made here are closed when ``stack``
    unwinds (the guests hold their own copies by then)."""
    common = [f"mtu={mtu}", "depth=128"]
    if kind == "udp":
        socks = _udp_link()
        for sock in socks:
            stack.callback(sock.close)
        return [
            (",".join([f"vec0:transport=fd,fd={s.fileno()}", *common, _mac(node)]), (s.fileno(),))
            for node, s in enumerate(socks)
        ]
    ports = _free_udp_ports(2)
    sessions = _session_ids()
    out: list[tuple[str, tuple[int, ...]]] = []
    for node in range(2):
        src, dst = ports[node], ports[1 - node]
        tx, rx = sessions[node], sessions[1 - node]
        spec = (f"vec0:transport=l2tpv3,udp=1,src=127.0.0.1,dst=127.0.0.1,srcport={src},dstport={dst},"
                f"rx_session={rx:#x},tx_session={tx:#x}")  # fmt: skip
        out.append((",".join([spec, *common, _mac(node)]), ()))
    return out


def _mac(node: int) -> str:
    return f"mac=02:52:4b:56:00:{node + 1:02x}"  # locally administered, fixed: readable in dumps


def _node_net(node: int, kind: str) -> tuple[str, list[str], str]:
    """The ``net`` for :func:`_write_run_files`: lo and vec0 up with the node's address. vec0's
    MTU comes from the UML command line (the vector driver refuses MTU changes above 1500)."""
    addr = f"{NODE_ADDRS[node]}/24"
    lines = ["link set lo up", f"addr add {addr} dev vec0", "link set vec0 up"]
    return "vec0", lines, f"vec0 ({kind} link to the other guest) {addr}"


def link_kind() -> str:
    """$RDMAKV_GUEST_LINK: ``udp`` (default) or ``l2tpv3``."""
    kind = os.environ.get("RDMAKV_GUEST_LINK") or "udp"
    if kind not in ("udp", "l2tpv3"):
        raise GuestError(f"RDMAKV_GUEST_LINK={kind!r}: expected 'udp' or 'l2tpv3'")
    return kind


def _node_env(env: dict | None, node: int) -> dict[str, str]:
    genv = guest_env(env)
    genv.update(RDMAKV_NODE=str(node), RDMAKV_NODES="2", RDMAKV_NODE_ADDRS=",".join(NODE_ADDRS))
    return genv


def _node_result(g, node: int) -> int:
    """Node ``node``'s command status after its guest ended; a harness failure names the node."""
    try:
        return g.result("UML")
    except GuestError as e:
        raise GuestError(f"node {node}: {e}") from None


def run_uml_pair(command, *, timeout: float, mem: str, workdir: str, env: dict | None, verbose: bool) -> int:
    """run(nodes=2): boot two UML guests linked by vec0, run ``command`` in both, return the
    run's status (see the module docstring). ``timeout`` bounds both guests together."""
    kernel = check_host(workdir)
    kind = link_kind()
    mtu = int(os.environ.get("RDMAKV_LINK_MTU") or DEFAULT_LINK_MTU)
    cpus = pick_cpus(2)
    locks = [threading.Lock(), threading.Lock()]  # one per host stream, shared by both guests
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        vecs = _vec_args(kind, mtu, stack)
        guests = []
        for node, (cpu, cpu_lock) in enumerate(cpus):
            # Each guest_run kills its guest and removes its temp dir however we leave.
            g = stack.enter_context(guest_run(f"rdmakv-uml{node}-", cpu_lock))
            w_out, w_err = prepare_guest(g, command, _node_env(env, node), workdir, _node_net(node, kind))
            vec, vec_fds = vecs[node]
            argv = uml_argv(kernel, cpu, mem, g, w_out, w_err) + [vec]
            prefix = b"" if node == 0 else f"[node{node}] ".encode()
            g.start(
                argv,
                lines=(LineSink(prefix, locks[0]), LineSink(prefix, locks[1])),
                pass_fds=(g.log.fileno(), w_out, w_err, *vec_fds),
                cwd=g.tmp / "uml",
                env=uml_host_env(mem, g.tmp, guests=2),
            )
            guests.append(g)
        rc = _wait_pair(guests, deadline, timeout, verbose)
        if verbose:
            for node, g in enumerate(guests):
                g.log_timings(f"node {node}, cpu {cpus[node][0]}", read_float)
            _log_pair_boot(guests, f"{kind} link, MTU {mtu}")
        return rc


def _wait_pair(guests: list, deadline: float, timeout: float, verbose: bool) -> int:
    """Wait for node 0's guest, watching node 1's; then give node 1 its grace. Returns the run's
    status; raises :class:`GuestError` on a timeout or a harness failure of either node."""
    g0, g1 = guests
    rc1: int | None = None

    def remaining() -> float:
        return deadline - time.monotonic()

    def node1_ended() -> int:
        g1.ended()
        rc = _node_result(g1, 1)
        if rc != 0:
            during = "" if g0.proc.returncode is not None else " while node 0's was still running"
            log_step(f"node 1's command exited with status {rc}{during}")
        return rc

    while g0.proc.poll() is None:
        if remaining() <= 0:
            _timeout(guests, timeout)
        if rc1 is None and g1.proc.poll() is not None:
            rc1 = node1_ended()  # a setup failure or crash of node 1 ends the run here
        time.sleep(_POLL_S)
    g0.ended()
    rc0 = _node_result(g0, 0)
    killed = False
    if rc1 is None:
        try:
            g1.proc.wait(timeout=max(0.0, min(NODE1_GRACE_S, remaining())))
        except subprocess.TimeoutExpired:
            killpg(g1.proc.pid)
            g1.proc.wait()
            g1.ended()
            killed = True
        else:
            rc1 = node1_ended()
    if killed:
        if verbose:
            log_step(f"node 1 still running {NODE1_GRACE_S:g} s after node 0 ended: stopped it")
        return rc0
    if rc1 and not rc0:
        log_step(f"node 0's command succeeded but node 1's exited with status {rc1}: the run fails with {rc1}")
        return rc1
    return rc0


def _timeout(guests: list, timeout: float) -> None:
    running = [n for n, g in enumerate(guests) if g.proc.poll() is None]
    for g in guests:
        killpg(g.proc.pid)
        g.proc.wait()
    tails = "\n".join(f"node {n} console log tail:\n{tail_of(g.console)}" for n, g in enumerate(guests))
    names = " and ".join(f"node {n}" for n in running)
    raise GuestError(f"two-node guest run timed out after {timeout:g} s ({names} still running); {tails}")


def _log_pair_boot(guests: list, link: str) -> None:
    t_cmd = [t for g in guests if (t := read_float(g.io / "t_cmd"))]
    if len(t_cmd) == len(guests):  # every one started
        t0 = min(g.t_launch for g in guests)
        log_step(f"pair: both commands started {max(t_cmd) - t0:.3f} s after the first launch ({link})")
