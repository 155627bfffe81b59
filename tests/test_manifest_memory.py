"""What a manifest costs the server is what the store charges for it: 16 maximal manifests (2^20
entries, 20 MiB each) through a 64 MiB store keep the process within its capacity plus the fixed
overhead docs/operations.md states. A real `rdmakv serve` process."""

from __future__ import annotations

import numpy as np

import rdmakv
from rdmakv.wire import manifest as mf

from .conftest import KEY_HEX

FIXED_OVERHEAD_MIB = 100  # docs/operations.md, "Memory": the interpreter and its libraries, buffers


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_sixteen_maximal_manifests_keep_the_process_within_capacity(fresh_server):
    srv = fresh_server("64MiB", "--fsync", "never")
    n = mf.MAX_CHUNKS
    with rdmakv.connect(srv.url("max"), key=KEY_HEX, transport="tcp") as st:
        (key,) = st.put_chunks([b"x"])
        peak = 0.0
        for i in range(16):
            m = mf.Manifest(mf.KIND_OPAQUE, b"", np.full(n, key, dtype=np.uint64), np.ones(n, np.uint32),
                            np.arange(n, dtype=np.uint64) + i)  # fmt: skip
            assert st.put_manifest(f"max{i}", m) == []
            if i % 4 == 0:
                assert st.get_manifest(f"max{i}").n_chunks == n  # resident again: charged again
            peak = max(peak, _rss_mib(srv.pid()))
        stats = st.stats()
    print(f"\n[memory] 16 manifests of 2^20 entries, 64 MiB store: RSS peak {peak:.0f} MiB, "
          f"charged {stats['used_bytes'] >> 20} MiB, {stats['resident_sessions']} resident")
    assert stats["used_bytes"] <= 64 << 20
    assert peak <= 64 + FIXED_OVERHEAD_MIB, f"RSS {peak:.0f} MiB over capacity + {FIXED_OVERHEAD_MIB} MiB"
