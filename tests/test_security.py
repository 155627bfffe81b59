"""Tenant isolation and what an authenticated peer may not do: per-tenant keys, admin keys,
forged plaintext errors, amplifying requests, oversized replies, TLS. Real server processes."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

import rdmakv
from fallback_tcp.framed import FramedSocket, client_handshake
from rdmakv import kvgen
from rdmakv.errors import AuthError, RdmakvError
from rdmakv.hashing import HASH_BLAKE3_256
from rdmakv.kvgen import ModelShape
from rdmakv.wire import messages as msg
from rdmakv.wire.auth import parse_key
from rdmakv.wire.protocol import FLAG_RESPONSE, Op, plain_frame

from .conftest import KEY_HEX, ServerProcess

SHAPE = ModelShape("sec", 2, 64, 64)
A_KEY, B_KEY, ADMIN_KEY, OLD_KEY, NEW_KEY = ("a1" * 32, "b2" * 32, "ad" * 32, "0d" * 32, "1e" * 32)


def _kv(seed: int, n: int = 64) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, n), SHAPE)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    d = tmp_path_factory.mktemp("keyed")
    yesterday = (dt.date.today() - dt.timedelta(days=2)).isoformat()
    (d / "keys.toml").write_text(
        f'[[key]]\nnamespace = "tenant-a"\nkey = "{A_KEY}"\n\n'
        f'[[key]]\nnamespace = "tenant-b"\nkey = "{B_KEY}"\n\n'
        f'[[key]]\nnamespace = "rot"\nkey = "{OLD_KEY}"\nnot_after = {yesterday}\n\n'
        f'[[key]]\nnamespace = "rot"\nkey = "{NEW_KEY}"\n\n'
        f'[[key]]\nkey = "{ADMIN_KEY}"\nadmin = true\n'
    )
    srv = ServerProcess(str(d / "data"), "64MiB", "--keys", str(d / "keys.toml")).start()
    yield srv
    srv.stop()


def _connect(srv, ns: str, key: str, **kw) -> rdmakv.Store:
    return rdmakv.connect(srv.url(ns), key=key, transport="tcp", window=16, **kw)


def test_a_tenant_key_opens_only_its_namespace(keyed):
    with _connect(keyed, "tenant-a", A_KEY) as a:
        a.save("mine", _kv(1))
        assert a.restore("mine").equals(_kv(1))
    with pytest.raises(AuthError, match="does not open namespace 'tenant-b'"):
        _connect(keyed, "tenant-b", A_KEY)
    with pytest.raises(AuthError, match="not one this server knows"):
        _connect(keyed, "tenant-a", KEY_HEX)
    with _connect(keyed, "tenant-b", B_KEY) as b:
        assert b.list() == []  # nothing of tenant A is visible


def test_keys_rotate_and_expire(keyed):
    with pytest.raises(AuthError, match="expired"):
        _connect(keyed, "rot", OLD_KEY)
    with _connect(keyed, "rot", NEW_KEY) as st:
        st.save("x", _kv(2))


def test_an_admin_key_manages_but_never_reads(keyed):
    with _connect(keyed, "tenant-a", A_KEY) as a:
        a.save("kept", _kv(3))
    with _connect(keyed, "tenant-a", ADMIN_KEY) as adm:
        names = {r["name"] for r in adm.list()}
        assert "kept" in names
        stats = adm.stats()
        assert stats["store"]["namespaces"] >= 1  # the whole store: admins only
        adm.pin("kept")
        with pytest.raises(AuthError, match="does not read or write"):
            adm.restore("kept")
        with pytest.raises(AuthError, match="does not read or write"):
            adm.save("intruder", _kv(4))
        assert adm.compact()["segments_compacted"] >= 0
    with _connect(keyed, "tenant-a", A_KEY) as a:
        assert "store" not in a.stats()  # a tenant sees its own figures only
        with pytest.raises(AuthError, match="admin key"):
            a.compact()


def test_keys_new_makes_a_working_entry(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rdmakv", "keys", "new", "fresh"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    (tmp_path / "k.toml").write_text(out)
    key = out.split('key = "')[1].split('"')[0]
    srv = ServerProcess(str(tmp_path / "d"), "16MiB", "--keys", str(tmp_path / "k.toml")).start()
    try:
        with _connect(srv, "fresh", key) as st:
            st.save("ok", _kv(5))
    finally:
        srv.stop()


def test_a_bad_keys_file_fails_at_start_naming_the_entry(tmp_path):
    (tmp_path / "k.toml").write_text('[[key]]\nnamespace = "x"\nkey = "zz"\n')
    with pytest.raises(RuntimeError, match=r"\[\[key\]\] #1: key"):
        ServerProcess(str(tmp_path / "d"), "16MiB", "--keys", str(tmp_path / "k.toml")).start()
    (tmp_path / "k.toml").write_text(f'[[key]]\nnamespace = "x"\nkey = "{A_KEY}"\nexpires = 1\n')
    with pytest.raises(RuntimeError, match="unknown field"):
        ServerProcess(str(tmp_path / "d"), "16MiB", "--keys", str(tmp_path / "k.toml")).start()


class _Injector:
    """A TCP relay between a client and the server that can slip a frame into the server's stream."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.inject: bytes | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        c, _ = self.listener.accept()
        s = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pump, args=(c, s, False), daemon=True).start()
        self._pump(s, c, True)

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_server and self.inject is not None:
                    dst.sendall(self.inject)
                    self.inject = None
                dst.sendall(data)
        except OSError:
            pass


def test_a_forged_plaintext_error_after_the_handshake_is_refused(server, ns):
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        st.save("real", _kv(6))
    relay = _Injector(server.port)
    with rdmakv.connect(f"rdmakv://127.0.0.1:{relay.port}/{ns}", key=KEY_HEX, transport="tcp") as st:
        assert st.restore("real").equals(_kv(6))
        relay.inject = plain_frame(Op.ERROR, FLAG_RESPONSE, 0, msg.enc_error(7, "no manifest named 'real'"))
        with pytest.raises(AuthError, match="unauthenticated frame after the handshake"):
            st.restore("real")


def _raw(server, ns: str) -> FramedSocket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    fs = FramedSocket(sock)
    client_handshake(fs, parse_key(KEY_HEX), ns)
    return fs


def test_a_request_repeating_one_key_gets_it_once(server, ns):
    chunk = np.random.default_rng(1).bytes(64 << 10)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        (key,) = st.put_chunks([chunk])
        st.put_manifest("hold", rdmakv.wire.manifest.Manifest(2, b"", [key], [len(chunk)], [0]))
    fs = _raw(server, ns)
    fs.send(Op.GET_CHUNKS, 0, 1, [msg.enc_keys([key] * 16384)])  # 128 KiB asking for 1 GiB
    before = fs.bytes_received
    header, payload = fs.recv()
    served, absent = msg.dec_chunks(payload)
    assert header.op == Op.GET_CHUNKS and len(served) == 1 and not absent
    assert fs.bytes_received - before < 2 * len(chunk)  # one copy, not 16,384
    fs.close()


def test_list_pages_its_results(server, ns):
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        kv = _kv(7, 4)
        st.save("s0000", kv)
        m = st.get_manifest("s0000")
        for i in range(1, 2500):
            assert st.put_manifest(f"s{i:04d}", m) == []
        fs = _raw(server, ns)
        fs.send(Op.LIST, 0, 1, [msg.enc_list("", "")])
        page = msg.dec_json(fs.recv()[1])
        assert len(page["sessions"]) == msg.LIST_PAGE and page["more"]
        fs.close()
        rows = st.list()
        assert [r["name"] for r in rows] == [f"s{i:04d}" for i in range(2500)]


def test_chunks_larger_than_a_frame_travel_in_continuation_frames(fresh_server):
    srv = fresh_server("256MiB", "--max-frame", "1MiB")
    big = ModelShape("big", 2, 2048, 2048)  # 8 KiB per token per K or V: W=512 makes 4 MiB chunks
    kv = kvgen.generate(kvgen.token_stream(8, 600), big)
    with rdmakv.connect(srv.url("cont"), key=KEY_HEX, transport="tcp", window=512) as st:
        st.save("s", kv)
        assert max(st.get_manifest("s").lengths) > 1 << 20
        assert st.restore("s").equals(kv)
        blob = np.random.default_rng(2).bytes(5 << 20)
        st.put_blob("blob", blob)
        assert st.get_blob("blob") == blob


@pytest.mark.parametrize("mac", ["poly1305", "blake3", "hmac-sha256"])
def test_blake3_chunk_keys_and_both_macs(server, ns, mac):
    kv = _kv(9, 200)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp", window=32, hash_alg="blake3", mac=mac) as st:
        rep = st.save("b3", kv)
        m = st.get_manifest("b3")
        assert m.hash_alg == HASH_BLAKE3_256 and isinstance(m.keys.tolist()[0], bytes)
        assert st.save("b3-again", kv).chunks_sent == 0 and rep.chunks_sent > 0  # dedup by BLAKE3 key
        assert st.restore("b3").equals(kv)
        bogus = bytes(32)
        fs = _raw(server, ns)
        fs.send(Op.PUT_CHUNKS, 0, 1, msg.enc_put_chunks([bogus], [b"not the bytes of that key"]))
        header, payload = fs.recv()
        assert header.op == Op.ERROR and "do not hash to the key" in msg.dec_error(payload)[1]
        fs.close()


def test_control_characters_in_names_are_refused(server, ns):
    with pytest.raises(ValueError, match="printable"):
        rdmakv.connect(server.url("a%0ab"), key=KEY_HEX, transport="tcp")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(plain_frame(Op.HELLO, 0, 0, bytes(32) + b"\x03\x00a\nb" + bytes(16) + b"\x02"))
    fs = FramedSocket(sock)
    header, payload = fs.recv()
    assert header.op == Op.ERROR and "unprintable" in msg.dec_error(payload)[1]
    sock.close()
    assert not any("a\nb" in line for line in server.log)  # never in a log line


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                       x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_tls_for_untrusted_networks(tmp_path):
    cert, key = _self_signed(tmp_path)
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--tls-cert", str(cert), "--tls-key", str(key)).start()
    try:
        url = f"rdmakvs://127.0.0.1:{srv.port}/tls"
        with rdmakv.connect(url, key=KEY_HEX, transport="tcp", tls_ca=str(cert), window=16) as st:
            kv = _kv(10, 300)
            st.save("s", kv)
            assert st.restore("s").equals(kv)
            big = np.random.default_rng(2).bytes(3 << 20)  # a frame of its own buffer size (>= 1 MiB)
            (k,) = st.put_chunks([big])
            assert st.get_chunks([k]) == [big]
        with pytest.raises(AuthError, match="TLS"):
            rdmakv.connect(url, key=KEY_HEX, transport="tcp")  # the system CAs do not know this server
        with pytest.raises(RdmakvError):
            rdmakv.connect(srv.url("tls"), key=KEY_HEX, transport="tcp", timeout=5)  # plain TCP to a TLS port
    finally:
        srv.stop()


def test_node_keys_in_a_keys_file(tmp_path):
    from rdmakv.wire.keyring import KeyRing, KeysFileError

    out = subprocess.run([sys.executable, "-m", "rdmakv", "keys", "new", "--node"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert "node = true" in out and "namespace" not in out
    ring = KeyRing.parse(out, tmp_path / "k.toml")
    assert ring.node_key() == ring.entries[0].key
    entry = ring.select(rdmakv.wire.auth.fingerprint(ring.entries[0].key), "any-namespace")
    assert entry.node and not entry.admin
    for bad, why in ((f'[[key]]\nkey = "{A_KEY}"\nnode = true\nnamespace = "x"\n', "has no namespace"),
                     (f'[[key]]\nkey = "{A_KEY}"\nnode = true\nadmin = true\n', "not an admin key"),
                     (f'[[key]]\nkey = "{A_KEY}"\nnode = "yes"\n', "node must be true or false")):  # fmt: skip
        with pytest.raises(KeysFileError, match=why):
            KeyRing.parse(bad, tmp_path / "k.toml")
    with pytest.raises(KeysFileError, match="no valid"):
        KeyRing.parse(f'[[key]]\nnamespace = "x"\nkey = "{A_KEY}"\n', tmp_path / "k.toml").node_key()
    bad_cli = subprocess.run([sys.executable, "-m", "rdmakv", "keys", "new", "x", "--node"], capture_output=True,
                             text=True)  # fmt: skip
    assert bad_cli.returncode != 0 and "exactly one" in bad_cli.stderr
