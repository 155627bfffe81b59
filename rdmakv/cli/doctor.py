"""``rdmakv doctor``: what RDMA this machine (or guest) offers and what rdmakv would use.

Reports pyverbs availability, RDMA devices (state, caps, MTU, GIDs), the memlock limit, whether
the UML rxe guest kernel is cached, and whether a connection would use rdma or tcp.
``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys

SYS_IB = pathlib.Path("/sys/class/infiniband")
MEMLOCK_OK = 512 << 20  # below this, registering a large KV region may fail (non-root)

PYVERBS_HINT = (
    "install Debian's pyverbs with `apt-get install python3-pyverbs` and use /usr/bin/python3 or a "
    "venv made with `/usr/bin/python3 -m venv --system-site-packages VENV`"
)
_PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
_MTUS = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
_LINK_LAYERS = {0: "unspecified", 1: "InfiniBand", 2: "Ethernet"}


def _read(path: pathlib.Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _pyverbs() -> dict:
    info: dict = {"importable": False, "python": sys.executable}
    try:
        import pyverbs
        import pyverbs.device
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken extension
        info["error"] = f"{type(e).__name__}: {e}"
        info["hint"] = PYVERBS_HINT
        return info
    info["importable"] = True
    info["path"] = os.path.dirname(pyverbs.__file__)
    return info


def _sysfs_gids(dev: str, port: int) -> list[dict]:
    pdir = SYS_IB / dev / "ports" / str(port)
    gids: list[dict] = []
    try:
        names = sorted((p.name for p in (pdir / "gids").iterdir()), key=int)
    except OSError:
        return gids
    for name in names:
        gid = _read(pdir / "gids" / name)
        if not gid or set(gid.replace(":", "")) <= {"0"}:
            continue
        gids.append(
            {
                "index": int(name),
                "gid": gid,
                "type": _read(pdir / "gid_attrs" / "types" / name),
                "netdev": _read(pdir / "gid_attrs" / "ndevs" / name),
            }
        )
    return gids


def _sysfs_devices() -> list[dict]:
    devs: list[dict] = []
    try:
        names = sorted(p.name for p in SYS_IB.iterdir())
    except OSError:
        return devs
    for name in names:
        d = SYS_IB / name
        ports = []
        try:
            port_names = sorted((p.name for p in (d / "ports").iterdir()), key=int)
        except OSError:
            port_names = []
        for pn in port_names:
            pdir = d / "ports" / pn
            state = _read(pdir / "state") or "?"  # e.g. "4: ACTIVE"
            ports.append(
                {
                    "port": int(pn),
                    "state": state.split(":")[-1].strip(),
                    "active_mtu": None,
                    "link_layer": _read(pdir / "link_layer"),
                    "gids": _sysfs_gids(name, int(pn)),
                }
            )
        devs.append(
            {
                "name": name,
                "source": "sysfs",
                "node_type": _read(d / "node_type"),
                "fw_ver": _read(d / "fw_ver"),
                "caps": None,
                "ports": ports,
            }
        )
    return devs


def _pyverbs_devices() -> list[dict]:
    import pyverbs.device as d

    try:
        dev_list = d.get_device_list()
    except Exception:  # noqa: BLE001 - doctor reports, never fails
        # pyverbs raises "Failed to get devices list" when there are none
        return []
    out = []
    for dev in dev_list:
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        entry: dict = {"name": name, "source": "pyverbs", "ports": []}
        try:
            with d.Context(name=name) as ctx:
                a = ctx.query_device()
                entry["fw_ver"] = a.fw_version
                entry["caps"] = {
                    "max_sge": a.max_sge,
                    "max_sge_rd": a.max_sge_rd,
                    "max_qp_rd_atom": a.max_qp_rd_atom,
                    "max_qp_init_rd_atom": a.max_qp_init_rd_atom,
                    "max_qp_wr": a.max_qp_wr,
                    "max_qp": a.max_qp,
                    "max_cqe": a.max_cqe,
                    "max_mr": a.max_mr,
                    "max_mr_size": a.max_mr_size,
                    "atomic_caps": a.atomic_caps,
                }
                for port in range(1, a.phys_port_cnt + 1):
                    p = ctx.query_port(port)
                    entry["ports"].append(
                        {
                            "port": port,
                            "state": _PORT_STATES.get(p.state, str(p.state)),
                            "active_mtu": _MTUS.get(p.active_mtu, p.active_mtu),
                            "max_mtu": _MTUS.get(p.max_mtu, p.max_mtu),
                            "link_layer": _LINK_LAYERS.get(p.link_layer, str(p.link_layer)),
                            "gid_tbl_len": p.gid_tbl_len,
                            # GID type and netdev are only in sysfs; the table itself matches.
                            "gids": _sysfs_gids(name, port),
                        }
                    )
        except Exception as e:  # noqa: BLE001 - doctor reports, never fails
            entry["error"] = f"{type(e).__name__}: {e}"
        out.append(entry)
    return out


def _has_cap_ipc_lock() -> bool:
    """CAP_IPC_LOCK (bit 14) in the effective set: the kernel then ignores RLIMIT_MEMLOCK for MRs."""
    status = _read(pathlib.Path("/proc/self/status")) or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 14))
    return False


def _memlock() -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def fmt(v):
        return "unlimited" if v == resource.RLIM_INFINITY else v

    ipc_lock = _has_cap_ipc_lock()
    ok = soft == resource.RLIM_INFINITY or soft >= MEMLOCK_OK or ipc_lock
    info = {"soft": fmt(soft), "hard": fmt(hard), "cap_ipc_lock": ipc_lock, "ok": ok}
    if soft != resource.RLIM_INFINITY and soft < MEMLOCK_OK:
        if ipc_lock:
            info["note"] = "small, but this process has CAP_IPC_LOCK so memory registration is not limited"
        else:
            info["hint"] = (
                "memory registration is capped at this limit: run `ulimit -l unlimited` "
                "(or raise memlock in /etc/security/limits.conf)"
            )
    return info


def _uml_kernel() -> dict:
    try:
        from rdmakv.guest import rxe_vm
    except Exception as e:  # noqa: BLE001 - doctor reports, never fails
        return {"cached": False, "error": f"{type(e).__name__}: {e}"}
    info: dict = {"key": rxe_vm.kernel_key(), "cache_root": str(rxe_vm.cache_root())}
    k = rxe_vm.cached_kernel()
    info["cached"] = k is not None
    info["path"] = str(k) if k else None
    if k is None:
        info["hint"] = (
            "built on first `rdmakv rxe-vm` (~5 min on 2 cores), or force with `rdmakv rxe-vm --rebuild -- true`"
        )
    return info


def _transport(report: dict) -> dict:
    if not report["pyverbs"]["importable"]:
        return {"choice": "tcp", "reason": "pyverbs is not importable (" + PYVERBS_HINT + ")"}
    devs = report["devices"]
    if not devs:
        return {
            "choice": "tcp",
            "reason": "no RDMA device (this kernel has none; "
            "`rdmakv rxe-vm -- ...` runs a command in a guest with rxe0)",
        }
    for dev in devs:
        for p in dev.get("ports", []):
            if p.get("state") == "ACTIVE" and p.get("gids"):
                # RoCE v2 over IPv4 (::ffff:a.b.c.d) is what a connection to an IP address uses
                v4 = [g for g in p["gids"] if g["gid"].startswith("0000:0000:0000:0000:0000:ffff:")]
                gid = (v4 or p["gids"])[0]["gid"]
                why = f"{dev['name']} port {p['port']} is ACTIVE with GID {gid} and pyverbs is importable"
                if not report["memlock"]["ok"]:
                    why += " (but the memlock limit is small: see memlock)"
                return {"choice": "rdma", "reason": why, "device": dev["name"], "port": p["port"]}
    return {"choice": "tcp", "reason": "no RDMA device has an ACTIVE port with a GID"}


def collect() -> dict:
    """Gather the doctor report as a plain dict (what ``--json`` prints)."""
    report: dict = {
        "in_guest": os.environ.get("RDMAKV_GUEST") if os.environ.get("RDMAKV_IN_GUEST") else None,
        "kernel": os.uname().release,
        "pyverbs": _pyverbs(),
    }
    devices = []
    if report["pyverbs"]["importable"]:
        devices = _pyverbs_devices()
    if not devices:
        devices = _sysfs_devices()
    report["devices"] = devices
    report["memlock"] = _memlock()
    report["uml_kernel"] = _uml_kernel()
    report["transport"] = _transport(report)
    return report


def _print_text(r: dict) -> None:
    w = sys.stdout.write
    where = f"guest ({r['in_guest']})" if r["in_guest"] else "host"
    w(f"rdmakv doctor: {where}, kernel {r['kernel']}\n")
    pv = r["pyverbs"]
    if pv["importable"]:
        w(f"pyverbs: ok ({pv['path']}, python {pv['python']})\n")
    else:
        w(f"pyverbs: NOT importable with {pv['python']}: {pv['error']}\n  how to fix: {pv['hint']}\n")
    if not r["devices"]:
        w("RDMA devices: no RDMA device\n")
    for dev in r["devices"]:
        w(f"RDMA device {dev['name']} (via {dev['source']}, fw {dev.get('fw_ver') or '?'})\n")
        if dev.get("error"):
            w(f"  error: {dev['error']}\n")
        if dev.get("caps"):
            w("  caps: " + ", ".join(f"{k}={v}" for k, v in dev["caps"].items()) + "\n")
        for p in dev["ports"]:
            mtu = p.get("active_mtu")
            w(f"  port {p['port']}: {p['state']}, active_mtu {mtu if mtu else '?'}, link_layer {p.get('link_layer')}\n")
            for g in p["gids"]:
                extra = " ".join(x for x in (g.get("type"), g.get("netdev")) if x)
                w(f"    gid[{g['index']}] {g['gid']} {extra}".rstrip() + "\n")
    m = r["memlock"]
    w(f"memlock: soft {m['soft']}, hard {m['hard']}" + ("" if m["ok"] else "  WARNING: small") + "\n")
    for key in ("note", "hint"):
        if m.get(key):
            w(f"  {m[key]}\n")
    u = r["uml_kernel"]
    if u.get("cached"):
        w(f"UML rxe guest kernel: cached at {u['path']}\n")
    else:
        w(f"UML rxe guest kernel: not cached (key {u.get('key')}, cache {u.get('cache_root')})")
        w(f"; {u['hint']}\n" if u.get("hint") else f"; {u.get('error')}\n")
    t = r["transport"]
    w(f"a connection would use {t['choice']} because {t['reason']}\n")


def cli(argv: list[str]) -> int:
    """``rdmakv doctor [--json]``; returns 0 (a report is always produced)."""
    p = argparse.ArgumentParser(
        prog="rdmakv doctor",
        description="Report pyverbs, RDMA devices (state, caps, MTU, GIDs), the memlock limit, "
        "the cached UML rxe guest kernel, and whether rdmakv would connect over rdma or tcp.",
    )
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object instead of text")
    args = p.parse_args(argv)
    report = collect()
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        _print_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
