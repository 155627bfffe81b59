"""Client side of the one-sided lookup: READ the index entries a name hashes to, then the blob
(manifest + chunk locations) its entry points at, each checked; the server's CPU does nothing.
The layout is wire.lookup_index; store.published says how the server keeps it."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from ..client.reports import RestoreReport
from ..wire.lookup_index import ENTRY, dec_blob, entry_check, home, name_hash
from ..wire.messages import Locations, dec_locations
from .requester import ReadOp, Sge

KNOWN_BLOBS = 256  # names whose blob address is remembered: entry and blob go in one READ call


class OneSidedIndex:
    def __init__(self, restorer, addr: int, rkey: int, entries: int, probe: int) -> None:
        self.r = restorer
        self.addr, self.rkey, self.entries, self.probe = addr, rkey, entries, probe
        self.known: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # name -> blob (addr, rkey, length)

    def _read(self, ranges: list[tuple[int, int, int]], rep: RestoreReport) -> list[bytes]:
        """READ each (addr, rkey, length) in one posting; the bytes of each."""
        r = self.r
        total = sum(n for _, _, n in ranges)
        if total <= len(r.scratch):
            buf, laddr, lkey = r.scratch, r.scratch_addr, r.scratch_lkey
        else:
            buf, laddr, lkey = r.pool.alloc(total)
        ops, at = [], 0
        for addr, rkey, n in ranges:
            ops.append(ReadOp(addr, rkey, [Sge(laddr + at, n, lkey)]))
            at += n
        rep.reads_posted += r.requester.read(ops)
        out, at, view = [], 0, memoryview(buf)
        for _, _, n in ranges:
            out.append(bytes(view[at : at + n]))
            at += n
        return out

    def lookup_many(self, names: list[str], rep: RestoreReport) -> list[tuple[bytes, Locations] | None]:
        """``lookup`` of many names in two READ postings: every name's entries (with the blob
        remembered for it beside them), then the blobs not remembered. A name whose entry or
        blob changed under the READ is looked up alone (``lookup``, which retries once)."""
        out: list[tuple[bytes, Locations] | None] = [None] * len(names)
        guesses = [self.known.get(n) for n in names]
        ranges = []
        for name, guess in zip(names, guesses):
            start = home(name_hash(name), self.entries)
            ranges.append((self.addr + start * ENTRY.itemsize, self.rkey, self.probe * ENTRY.itemsize))
            if guess:
                ranges.append(guess)
        got = iter(self._read(ranges, rep)) if ranges else iter(())
        later: list[tuple[int, tuple[int, int, int], int]] = []  # (index, blob range, its xxh3)
        alone: list[int] = []
        for i, (name, guess) in enumerate(zip(names, guesses)):
            table = np.frombuffer(next(got), ENTRY)
            beside = next(got) if guess else None
            hits = np.flatnonzero(table["hash"] == np.void(name_hash(name)))
            if not len(hits):
                rep.index_misses += 1
                continue
            e = table[int(hits[0])]
            if int(e["version"]) % 2 or entry_check(e.tobytes()) != int(e["check"]):
                alone.append(i)  # an update in flight, or a torn entry
                continue
            where = (int(e["addr"]), int(e["rkey"]), int(e["length"]))
            if guess == where and beside is not None:
                out[i] = self._open(name, beside, int(e["blob_xxh3"]), where)
                if out[i] is None:
                    alone.append(i)
            else:
                later.append((i, where, int(e["blob_xxh3"])))
        if later:
            for (i, where, check), blob in zip(later, self._read([w for _, w, _ in later], rep)):
                out[i] = self._open(names[i], blob, check, where)
                if out[i] is None:
                    alone.append(i)
        for i in alone:
            out[i] = self.lookup(names[i], rep)
        return out

    def _open(self, name: str, blob: bytes, check: int, where: tuple[int, int, int]) -> tuple[bytes, Locations] | None:
        """A blob READ for ``name``: (manifest, locations), or None when it is not (any more) the
        blob its entry names."""
        if xxhash.xxh3_64_intdigest(blob) != check:
            return None
        try:
            named, manifest, loc = dec_blob(blob)
            if named != name:
                return None
            found = bytes(manifest), dec_locations(loc)
        except (ValueError, UnicodeDecodeError):
            return None
        self.known[name] = where
        self.known.move_to_end(name)
        if len(self.known) > KNOWN_BLOBS:
            self.known.popitem(last=False)
        return found

    def lookup(self, name: str, rep: RestoreReport) -> tuple[bytes, Locations] | None:
        """(manifest, locations) of ``name``, or None: not in the index, or still inconsistent
        after one retry (the caller then looks it up over TCP). Raises RdmaError on a bad READ."""
        h = name_hash(name)
        start = home(h, self.entries)
        for attempt in range(2):
            if attempt:
                rep.index_retries += 1
            guess = self.known.get(name) if not attempt else None
            ranges = [(self.addr + start * ENTRY.itemsize, self.rkey, self.probe * ENTRY.itemsize)]
            got = self._read(ranges + ([guess] if guess else []), rep)
            table = np.frombuffer(got[0], ENTRY)
            hits = np.flatnonzero(table["hash"] == np.void(h))
            if not len(hits):
                rep.index_misses += 1
                return None
            e = table[int(hits[0])]
            if int(e["version"]) % 2 or entry_check(e.tobytes()) != int(e["check"]):
                continue  # an update in flight, or a torn entry
            where = (int(e["addr"]), int(e["rkey"]), int(e["length"]))
            # the blob read beside the entry is good when the entry still points at it
            blob = got[1] if guess == where else self._read([where], rep)[0]
            if xxhash.xxh3_64_intdigest(blob) != int(e["blob_xxh3"]):
                continue  # the blob's slot was reused since the entry was read
            try:
                named, manifest, loc = dec_blob(blob)
                if named != name:
                    continue
                found = bytes(manifest), dec_locations(loc)
            except (ValueError, UnicodeDecodeError):
                continue
            self.known[name] = where
            self.known.move_to_end(name)
            if len(self.known) > KNOWN_BLOBS:
                self.known.popitem(last=False)
            return found
        rep.index_fallbacks += 1
        return None
