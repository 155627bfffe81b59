"""llama.cpp slot files in the store: chunked and deduplicated when they parse, whole when not."""

from __future__ import annotations

import xxhash

from ..client import Store
from ..kvstate import RestoreReport, SaveReport
from ..wire import manifest as mf
from . import slotfile


def put_slotfile(
    store: Store, name: str, data: bytes | memoryview, window: int | None = None
) -> tuple[SaveReport, str]:
    """Store a slot file; returns (report, parse error or ""). Unparseable files are kept whole."""
    body, chunks, error = slotfile.split_any(data, window or store.window)
    report = store.save_object(name, mf.KIND_SLOTFILE, body, [c for _, c in chunks], [t for t, _ in chunks])
    return report, error or ""


def get_slotfile(store: Store, name: str, report: RestoreReport | None = None) -> bytes:
    """The exact bytes that were stored under ``name``."""
    return b"".join(get_slotfile_parts(store, name, report)[0])


def get_slotfile_parts(store: Store, name: str, report: RestoreReport | None = None) -> tuple[list, int]:
    """(the file as consecutive parts, checked whole; the xxh3 of the manifest they came from)."""
    manifest, pieces = store.load_object(name, report)
    if manifest.kind != mf.KIND_SLOTFILE:
        raise slotfile.SlotFileError(f"{name!r} is a {mf.KIND_NAMES[manifest.kind]} manifest, not a slot file")
    return slotfile.rebuild_parts(manifest.body, pieces), xxhash.xxh3_64_intdigest(manifest.encode())


def manifest_xxh3(store: Store, name: str) -> int:
    """Which version of ``name`` the store holds now (one small round trip; NotFoundError if none)."""
    data, _, _ = store.channel.get_manifest(name)
    return xxhash.xxh3_64_intdigest(data)
