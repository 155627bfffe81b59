"""Operating a real `rdmakv serve` process: Prometheus metrics scraped over HTTP and parsed with
prometheus_client's own parser, the config file, the systemd notify protocol on a real
datagram socket, and a JSON log that never carries chunk bytes, token ids or key material."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import rdmakv
from rdmakv import kvgen
from rdmakv.cluster.etcd_server import free_port
from rdmakv.errors import AuthError, NotFoundError

from .conftest import KEY_HEX, OTHER_KEY_HEX, ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_after_real_saves_and_restores(tmp_path):
    port = free_port()
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--transport", "tcp", "--metrics-listen",
                        f"127.0.0.1:{port}").start()  # fmt: skip
    try:
        kv = kvgen.generate(kvgen.token_stream(5, 128), kvgen.QWEN25_05B)
        with rdmakv.connect(srv.url("tenant"), key=KEY_HEX, transport="tcp", window=64) as st:
            st.save("secret-session-name", kv)
            st.save("secret-session-name", kv)  # warm: every chunk deduplicated
            assert st.restore("secret-session-name").equals(kv)
            with pytest.raises(NotFoundError):
                st.restore("no-such")
        with pytest.raises(AuthError):
            rdmakv.connect(srv.url("tenant"), key=OTHER_KEY_HEX, transport="tcp")
        m = scrape(port)
        assert value(m, "rdmakv_saves_total", namespace="tenant", transport="tcp") == 2
        assert value(m, "rdmakv_restores_total", namespace="tenant", transport="tcp", tier="memory") == 1
        assert value(m, "rdmakv_errors_total", namespace="tenant", code=str(NotFoundError.code)) == 1
        assert value(m, "rdmakv_auth_failures_total") == 1
        stored = value(m, "rdmakv_chunks_stored_total", namespace="tenant")
        assert value(m, "rdmakv_chunks_referenced_total", namespace="tenant") == 2 * stored > 0  # warm: sent none
        assert value(m, "rdmakv_bytes_received_total", namespace="tenant") > 1 << 20
        assert value(m, "rdmakv_bytes_sent_total", namespace="tenant") > 1 << 20
        assert value(m, "rdmakv_used_bytes", namespace="tenant") > 0
        assert value(m, "rdmakv_sessions", namespace="tenant") == 1
        assert value(m, "rdmakv_capacity_bytes") == 64 << 20
        assert value(m, "rdmakv_save_seconds_count", namespace="tenant", op="put_manifest") >= 2
        # (a small restore is one GET_MANIFEST: its chunks follow it)
        assert value(m, "rdmakv_restore_seconds_count", namespace="tenant", op="get_manifest") >= 1
        assert value(m, "rdmakv_fsync_seconds_count") >= 2  # --fsync manifest: one per commit
        labels = {v for (_, lab) in m for _, v in lab}
        assert not any("secret-session-name" in v for v in labels)  # names never become labels
        dashboard = (ROOT / "contrib" / "grafana-dashboard.json").read_text()
        used = set(re.findall(r"\brdmakv_[a-z_]+", dashboard))
        served = {name for name, _ in m}
        assert used and used <= served, sorted(used - served)  # the dashboard is built on real metric names
    finally:
        srv.stop()


def test_namespace_labels_are_bounded(tmp_path):
    from rdmakv.store.server import metrics

    port = free_port()
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--transport", "tcp", "--metrics-listen",
                        f"127.0.0.1:{port}").start()  # fmt: skip
    try:
        for i in range(3):
            with rdmakv.connect(srv.url(f"ns{i}"), key=KEY_HEX, transport="tcp") as st:
                st.put_blob("b", b"x" * 100)
        m = scrape(port)
        spaces = {dict(lab).get("namespace") for (name, lab) in m if name == "rdmakv_sessions"}
        assert spaces == {"ns0", "ns1", "ns2"}
        assert metrics.MAX_METRIC_NAMESPACES == 256  # the bound (past it: "_other"), named and documented
    finally:
        srv.stop()


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rdmakv", "serve", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "RDMAKV_AUTH_KEY": KEY_HEX, **(env or {})})  # fmt: skip


def test_config_file_flags_override_and_errors_name_file_line_and_key(tmp_path):
    cfg = tmp_path / "rdmakv.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "d"}"\ncapacity = "1GiB"\nquota = ["a=1MiB"]\nfsync = "never"\n'
                   "workers = 3\nno_auto_repair = true\n")  # fmt: skip
    out = _serve("--config", str(cfg), "--capacity", "2GiB", "--print-config")
    assert out.returncode == 0, out.stderr
    lines = set(out.stdout.splitlines())
    assert {'capacity = "2GiB"', 'fsync = "never"', "workers = 3", 'quota = ["a=1MiB"]',
            "no_auto_repair = true", f'data_dir = "{tmp_path / "d"}"'} <= lines  # fmt: skip
    for text, want in (
        ('data_dir = "x"\n\ncapacty = "1GiB"\n', ":3: key 'capacty': not a serve option"),
        ('data-dir = "x"\n', ":1: key 'data-dir': not a serve option (did you mean 'data_dir'?)"),
        ('data_dir = "x"\nworkers = "many"\n', ":2: key 'workers': bad value 'many'"),
        ('data_dir = "x"\ncapacity = "lots"\n', ":2: key 'capacity': bad value 'lots': not a size"),
        ('data_dir = "x"\nfsync = "sometimes"\n', ":2: key 'fsync': bad value 'sometimes': expected one of"),
        ('data_dir = "x"\nno_auto_repair = "yes"\n', ":2: key 'no_auto_repair': bad value 'yes': expected true"),
        ("data_dir = \n", "not valid TOML"),
    ):
        cfg.write_text(text)
        out = _serve("--config", str(cfg))
        assert out.returncode == 2 and f"{cfg}" in out.stderr and want in out.stderr, (text, out.stderr)
    out = _serve("--config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "cannot read the config file" in out.stderr
    out = _serve("--capacity", "1GiB")
    assert out.returncode == 2 and "--data-dir (or data_dir in --config) is required" in out.stderr

    cfg.write_text(f'data_dir = "{tmp_path / "d2"}"\ntransport = "tcp"\nfsync = "never"\nlisten = "127.0.0.1:0"\n')
    proc = subprocess.Popen([sys.executable, "-m", "rdmakv", "serve", "--config", str(cfg)], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "RDMAKV_AUTH_KEY": KEY_HEX})  # fmt: skip
    try:
        line = proc.stderr.readline()
        while "listening on" not in line:
            assert line, "serve exited"
            line = proc.stderr.readline()
        assert f"data-dir={tmp_path / 'd2'}" in line and "fsync=never" in line  # the file's settings, served
    finally:
        proc.terminate()
        proc.wait(10)


def test_sd_notify_ready_watchdog_and_stopping_on_a_real_datagram_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--transport", "tcp")
    t0 = time.monotonic()
    srv.start()
    try:
        got = []
        while not any("READY=1" in g for g in got):
            got.append(sock.recv(4096).decode())
        ready = next(g for g in got if "READY=1" in g)
        assert f"MAINPID={srv.pid()}" in ready and "STATUS=serving rdmakv://127.0.0.1" in ready
        with rdmakv.connect(srv.url("x"), key=KEY_HEX, transport="tcp") as st:  # READY means it serves
            st.put_blob("b", b"1")
        pings = 0
        while pings < 3:
            pings += sock.recv(4096).decode() == "WATCHDOG=1"
        assert time.monotonic() - t0 < 10
        srv.proc.terminate()
        msgs = []
        while not any("STOPPING=1" in m for m in msgs):
            msgs.append(sock.recv(4096).decode())
        srv.proc.wait(10)
    finally:
        srv.stop()
        sock.close()


def test_json_log_of_a_whole_session_has_no_chunk_bytes_tokens_or_keys(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--transport", "tcp", "--log-format", "json")
    srv.start()
    tokens = kvgen.token_stream(9, 96)
    kv = kvgen.generate(tokens, kvgen.QWEN25_05B)
    try:
        with rdmakv.connect(srv.url("tenant"), key=KEY_HEX, transport="tcp", window=32) as st:
            st.save("s", kv)
            assert st.restore("s").equals(kv)
            st.delete_manifest("s")
        with pytest.raises(AuthError):
            rdmakv.connect(srv.url("tenant"), key=OTHER_KEY_HEX, transport="tcp")
        with socket.create_connection(("127.0.0.1", srv.port)) as s:  # garbage before the handshake
            s.sendall(b"\x00" * 64)
            s.settimeout(5)
            try:
                s.recv(100)
            except OSError:
                pass
    finally:
        srv.stop()
    log = "".join(srv.log)
    events = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert events and all({"ts", "level", "component", "msg"} <= set(e) for e in events)
    assert {e["level"] for e in events} >= {"info"} and any("listening on" in e["msg"] for e in events)
    for secret in (KEY_HEX, OTHER_KEY_HEX, KEY_HEX[:16], OTHER_KEY_HEX[:16]):
        assert secret not in log.lower()
    raw = kv.k[0].tobytes()[:4096]
    for i in range(0, len(raw) - 16, 512):  # no 16-byte window of KV data, raw, hex or repr'd
        w = raw[i : i + 16]
        assert w.hex() not in log and repr(w)[2:-1] not in log
    toks = ",".join(str(t) for t in tokens[:6].tolist())
    assert toks not in log.replace(" ", "")


def test_top_shows_usage_hit_rates_and_rates_by_transport(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--transport", "tcp").start()
    try:
        kv = kvgen.generate(kvgen.token_stream(2, 64), kvgen.QWEN25_05B)
        with rdmakv.connect(srv.url("alpha"), key=KEY_HEX, transport="tcp", window=32) as st:
            st.save("a", kv)
            proc = subprocess.Popen([sys.executable, "-m", "rdmakv", "top", srv.url("alpha"), "--once", "--interval",
                                     "1"], stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, "RDMAKV_AUTH_KEY": KEY_HEX})  # fmt: skip
            for _ in range(10):  # during top's two samples: 10 restores in about a second
                st.restore("a")
                time.sleep(0.05)
            out = proc.communicate(timeout=30)[0]
        with rdmakv.connect(srv.url("beta"), key=KEY_HEX, transport="tcp") as st:
            st.put_blob("b", b"y" * 10)
    finally:
        srv.stop()
    assert proc.returncode == 0
    row = next(line for line in out.splitlines() if line.startswith("alpha"))
    cols = row.split()
    assert cols[3] == "1" and cols[6] == "100"  # sessions, memory hit rate %
    assert float(cols[9]) > 1.0  # lookups per second over TCP, from the two samples
    assert "memory" in out.splitlines()[1]  # the store-wide line (single-key mode is admin)


def test_the_systemd_unit_verifies_and_the_example_config_loads(tmp_path):
    import shutil

    unit = (ROOT / "contrib" / "rdmakv.service").read_text()
    settings = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in unit.splitlines() if "=" in line
                and not line.startswith("#")}  # fmt: skip
    assert settings["Type"] == "notify" and settings["LimitMEMLOCK"] == "infinity"
    assert settings["StateDirectory"] == "rdmakv" and "PrivateDevices" not in settings  # verbs need /dev/infiniband
    if shutil.which("systemd-analyze"):
        exe = shutil.which("rdmakv") or sys.executable
        local = tmp_path / "rdmakv.service"
        local.write_text(unit.replace("/usr/local/bin/rdmakv", exe))
        out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(local)], capture_output=True, text=True)
        assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    out = _serve("--config", str(ROOT / "contrib" / "rdmakv.toml"), "--print-config")
    assert out.returncode == 0 and 'data_dir = "/var/lib/rdmakv"' in out.stdout, out.stderr


def test_metrics_endpoint_takes_host_port_and_bracketed_ipv6() -> None:
    import socket
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter

    from rdmakv.metrics_http import MetricsEndpoint

    reg = CollectorRegistry()
    Counter("rdmakv_probe", "a probe", registry=reg).inc()
    ep = MetricsEndpoint(reg)
    with pytest.raises(ValueError, match="HOST:PORT"):
        ep.listen("9100")
    hosts = ["127.0.0.1"] + (["[::1]"] if socket.has_ipv6 and _ipv6_loopback() else [])
    for host in hosts:
        _, port = ep.listen(f"{host}:0")
        try:
            body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
            assert "rdmakv_probe_total 1.0" in body
        finally:
            ep.close()


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
