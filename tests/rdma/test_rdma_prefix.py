"""The auto-cache's restore path on real rxe: a prefix entry READ by RDMA writes the same slot
file as over TCP, and its report says rdma (runs inside the guest: `rdmakv rxe-vm -- pytest -m rdma`)."""

from __future__ import annotations

import numpy as np
import pytest

import rdmakv
from rdmakv.client.reports import RestoreReport
from rdmakv.llama import prefix_entry as pe
from rdmakv.llama import prefix_names as pn
from rdmakv.llama import prefix_store as ps
from rdmakv.llama import slotfile
from rdmakv.llama.mapped_scratch import MappedScratch

from ..conftest import KEY_HEX
from ..slot_writer import Block, Layer, prompt_cells, write_slot

pytestmark = pytest.mark.rdma


def test_a_prefix_entry_restores_by_rdma_read(server, ns, tmp_path) -> None:
    tokens = list(range(100, 400))
    data = write_slot("v4", tokens, [Block([prompt_cells(tokens)], [Layer(k_row=256, v_row=256)] * 3)])
    cut = pe.cut(slotfile.parse(data), 64)
    h0 = pn.seed("rdma-test", 64)
    with rdmakv.connect(server.url(ns), KEY_HEX, transport="rdma", window=64) as st:
        assert st.active_transport == "rdma", st.rdma_reason
        ps.register(st, cut, h0, also=(250,))
        found = ps.longest_prefix(st, h0, np.array(tokens[:250] + [7, 7], np.int32), 64)
        assert found.length == 250
        rep = RestoreReport()
        entry, pieces = ps.fetch_entry(st, found.name, rep)
        assert rep.transport == "rdma" and rep.fallback_reason == "", rep
        by_rdma = b"".join(bytes(memoryview(p).cast("B")) for p in pe.synthesize(entry, pieces))
    with rdmakv.connect(server.url(ns), KEY_HEX, transport="tcp", window=64) as st:
        mapped = MappedScratch(tmp_path)
        rep = RestoreReport()
        got = ps.fetch_into_map(st, found.name, mapped, tmp_path / "x.slot", None, rep)
        assert got is not None and rep.transport == "tcp"
        by_tcp = (tmp_path / "x.slot").read_bytes()
        mapped.give_back(tmp_path / "x.slot", got[2])
        mapped.close()
    assert by_rdma == by_tcp
    assert slotfile.parse(by_rdma).tokens.tolist() == tokens[:250]
