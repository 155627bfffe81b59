"""``rdmakv demo``: the seed document's scenarios against an embedded loopback server.

Every byte count printed comes from the server (its STATS counters: what it
received and what it stores) or from the client's socket counters, never from
arithmetic on shapes.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Protocol

import numpy as np

from .. import kvgen
from ..client.reports import KVState
from ..client.store import connect
from ..store.server.embedded import EmbeddedServer
from ..wire.protocol import HEADER, TAG_LEN

CHAT_TURNS = (40, 100, 256, 272)  # KV tokens after each of the 4 turns
SHARED_PROMPT = 25
SESSION_TOKENS = 68
N_SESSIONS = 5
# What one STATS request adds to the server's received counter (header + tag, no payload);
# the "received" columns subtract the STATS call made between two readings.
_STATS_REQUEST_BYTES = HEADER.size + TAG_LEN
REFERENCE = {  # docs/data-model.md §6 (seed document; Mac mini M4, loopback TCP)
    "v1_turn3_wire": 3_150_428,
    "manifest_turn3": 5_728,
    "shared_prefix_save_wire": 1_952,
    "chat_storage": {"v1": 8_221_488, "W=64": 3_505_856, "W=8": 3_336_896},
    "shared_storage": {"v1": 4_210_988, "W=64": 4_212_288, "W=8": 2_554_560},
    "cold_save_ms": "10-16",
    "warm_save_ms": "~1",
    "restore_ms": "2.6-4.3",
}


def _slice(full: KVState, n: int) -> KVState:
    """The KV state of the first n tokens (prefix property: rows depend only on the prefix)."""
    return KVState([k[:n] for k in full.k], [v[:n] for v in full.v], full.tokens[:n])


def _stored(store) -> int:
    st = store.stats()
    return int(st["chunk_bytes"] + st["manifest_bytes"])


class ScenarioServer(Protocol):
    """What a scenario needs of a server: the embedded one here, the bench's server process there."""

    @property
    def key(self) -> str | bytes: ...
    def url(self, ns: str) -> str: ...


def _received(store) -> int:
    return int(store.stats()["bytes_received"])


def chat_scenario(srv: ScenarioServer, transport: str) -> dict:
    full = kvgen.generate(kvgen.token_stream(2026, max(CHAT_TURNS)))
    stores = {
        "v1": connect(srv.url("chat-v1"), srv.key, transport="tcp"),
        "W=64": connect(srv.url("chat-w64"), srv.key, transport="tcp", window=64),
        "W=8": connect(srv.url("chat-w8"), srv.key, transport="tcp", window=8),
    }
    rows = []
    try:
        for turn, n in enumerate(CHAT_TURNS, 1):
            kv = _slice(full, n)
            row: dict = {"turn": turn, "tokens": n}
            for label, st in stores.items():
                before = _received(st)
                if label == "v1":
                    rep = st.put_blob(f"chat-turn{turn}", kvgen.encode_v1(kv))
                else:
                    rep = st.save(f"chat-turn{turn}", kv)
                row[label] = {
                    "server_received": _received(st) - before - _STATS_REQUEST_BYTES,
                    "bytes_on_wire": rep.bytes_on_wire,
                    "chunks_sent": rep.chunks_sent,
                    "chunks_skipped": rep.chunks_skipped,
                    "round_trips": rep.round_trips,
                    "manifest_bytes": rep.manifest_bytes,
                }
            rows.append(row)
        storage = {label: _stored(st) for label, st in stores.items()}
    finally:
        for st in stores.values():
            st.close()
    return {"turns": rows, "storage": storage}


def shared_prompt_scenario(srv: ScenarioServer) -> dict:
    prompt = kvgen.token_stream(7, SHARED_PROMPT)
    sessions = [
        np.concatenate([prompt, kvgen.token_stream(100 + i, SESSION_TOKENS - SHARED_PROMPT)])
        for i in range(N_SESSIONS)
    ]
    out: dict = {"storage": {}, "last_save_received": {}}
    for label, w in (("v1", None), ("W=64", 64), ("W=8", 8)):
        url = srv.url(f"shared-{label.replace('=', '').lower()}")
        with connect(url, srv.key, transport="tcp", window=w or 256) as st:
            for i, toks in enumerate(sessions):
                kv = kvgen.generate(toks)
                before = _received(st)
                if w is None:
                    st.put_blob(f"session{i}", kvgen.encode_v1(kv))
                else:
                    st.save(f"session{i}", kv)
                out["last_save_received"][label] = _received(st) - before - _STATS_REQUEST_BYTES
            out["storage"][label] = _stored(st)
    return out


def timing_scenario(srv: EmbeddedServer, transport: str, runs: int) -> dict:
    kv = kvgen.generate(kvgen.token_stream(42, 256))
    cold, warm, restore = [], [], []
    rtrip = []
    used = "tcp"
    with connect(srv.url("timing"), srv.key, transport=transport, window=64) as st:
        for i in range(runs):
            # cold: a session whose chunks are all new (distinct tokens -> distinct KV)
            fresh = kvgen.generate(kvgen.token_stream(10_000 + i, 256))
            cold.append(st.save(f"cold{i}", fresh).wall_s)
            rep = st.save("warm", kv)
            warm.append(rep.wall_s)
            if i:  # the first save of "warm" is cold
                rtrip.append(rep.round_trips)
            t0 = time.perf_counter()
            got, rrep = st.restore("warm", report=True)
            restore.append(time.perf_counter() - t0)
            used = rrep.transport
            if not got.equals(kv):
                raise SystemExit("demo: restored KV differs from the saved KV")
    med = lambda xs: statistics.median(xs[1:] if len(xs) > 2 else xs) * 1e3  # noqa: E731 - drop warm-up
    return {
        "runs": runs,
        "kv_bytes": kv.nbytes,
        "cold_save_ms": med(cold),
        "warm_save_ms": med(warm),
        "warm_save_round_trips": max(rtrip) if rtrip else None,
        "restore_ms": med(restore),
        "restore_transport": used,
    }


def run(transport: str = "auto", runs: int = 20) -> dict:
    with EmbeddedServer(transport=transport) as srv:
        result = {
            "model": kvgen.QWEN25_05B.name,
            "bytes_per_token": kvgen.QWEN25_05B.bytes_per_token,
            "server": srv.server.url_base,
            "rdma": srv.rdma_reason if srv.server.rdma is None else "on",
            "chat": chat_scenario(srv, transport),
            "shared_prompt": shared_prompt_scenario(srv),
            "timing": timing_scenario(srv, transport, runs),
            "reference": REFERENCE,
        }
    return result


def render(r: dict) -> str:
    ref = r["reference"]
    out: list[str] = []
    w = out.append
    w(f"rdmakv demo — {r['model']} KV shape ({r['bytes_per_token']:,} B/token), embedded server {r['server']}")
    w("")
    w("1. 4-turn chat: bytes the server received per save (v1 single blob vs chunked manifest)")
    w(
        f"   {'turn':>4} {'tokens':>6} | {'v1 blob':>11} | {'W=64 recv':>10} {'sent/skip':>9} {'RT':>2} "
        f"{'manifest':>8} | {'W=8 recv':>10} {'sent/skip':>9}"
    )
    for row in r["chat"]["turns"]:
        a, b = row["W=64"], row["W=8"]
        w(
            f"   {row['turn']:>4} {row['tokens']:>6} | {row['v1']['server_received']:>11,} | "
            f"{a['server_received']:>10,} {a['chunks_sent']:>4}/{a['chunks_skipped']:<4} {a['round_trips']:>2} "
            f"{a['manifest_bytes']:>8,} | {b['server_received']:>10,} {b['chunks_sent']:>4}/{b['chunks_skipped']:<4}"
        )
    t3 = r["chat"]["turns"][2]
    w(f"   reference (turn 3, 257 tokens): v1 {ref['v1_turn3_wire']:,} B; v2 manifest {ref['manifest_turn3']:,} B"
      f"   | ours (turn 3): v1 {t3['v1']['server_received']:,} B; manifest {t3['W=64']['manifest_bytes']:,} B")
    w("")
    w("2. Cumulative storage after the 4-turn chat (bytes the server stores: chunks + manifests)")
    _storage_table(w, r["chat"]["storage"], ref["chat_storage"])
    w("")
    w(f"3. {N_SESSIONS} sessions sharing a {SHARED_PROMPT}-token system prompt ({SESSION_TOKENS} tokens each)")
    _storage_table(w, r["shared_prompt"]["storage"], ref["shared_storage"])
    last = r["shared_prompt"]["last_save_received"]
    w(f"   last session's save received: v1 {last['v1']:,} B, W=64 {last['W=64']:,} B, W=8 {last['W=8']:,} B"
      f" (reference shared-prefix save: {ref['shared_prefix_save_wire']:,} B)")
    w("")
    t = r["timing"]
    w(
        f"4. 256-token session ({t['kv_bytes']:,} B of KV), W=64, median of {t['runs']} runs, "
        f"restore over {t['restore_transport']}"
    )
    w(f"   cold save {t['cold_save_ms']:.2f} ms (ref {ref['cold_save_ms']} ms) | warm save {t['warm_save_ms']:.2f} ms,"
      f" {t['warm_save_round_trips']} round trip (ref {ref['warm_save_ms']} ms) | restore {t['restore_ms']:.2f} ms"
      f" (ref {ref['restore_ms']} ms)")
    if r["rdma"] != "on":
        w(f"   (RDMA: {r['rdma']})")
    return "\n".join(out)


def _storage_table(w, ours: dict, ref: dict) -> None:
    w(f"   {'':6} {'ours':>12} {'reference':>12}")
    for label in ("v1", "W=64", "W=8"):
        w(f"   {label:6} {ours[label]:>12,} {ref[label]:>12,}")


def main(transport: str = "auto", as_json: bool = False, runs: int = 20) -> int:
    result = run(transport, runs)
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(render(result))
    return 0
