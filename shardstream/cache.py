"""The on-disk window: what the data dir holds, what it may hold, and what to delete.

Two pure functions decide, so they can be tested on hand-made plans and replaced by smarter ones
(several readers, Belady over a multi-epoch plan) without touching the threads:

- `ahead_window(plan, cursor, size)`: the shards to keep ready after the reader's position.
- `choose_evictions(entries, ...)`: which cached shards to delete, routinely (consumed beyond `retain`)
  and under budget pressure (the one read furthest in the future first, never a protected one).

`ShardCache` holds the bookkeeping and does the deleting: verified files, partial files, reservations
for in-flight downloads, leases by reader, the consumed order. Budget accounting counts final files +
partial files + reservations (an in-flight shard counts as max(its remote size, bytes so far)), so the
bytes really on disk never exceed what is accounted. Small metadata files (status.json, events.jsonl,
locks, .partial.json sidecars) are not counted.

ShardCache is not thread-safe on its own: the downloader calls it with its lock held.
"""
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

from .shards import SHARD_RE, shard_name

logger = logging.getLogger(__name__)

PARTIAL_RE = re.compile(r"^shard_(\d{5,})\.parquet\..+\.partial$")


def ahead_window(plan, cursor, size, cycle=False):
    """The `size` plan entries after plan position `cursor` (-1: the reader has not started).

    With cycle=True the plan repeats (the next epoch follows the last shard)."""
    plan = list(plan)
    if not plan or size <= 0:
        return []
    start = cursor + 1
    if not cycle:
        return plan[max(start, 0):max(start, 0) + size]
    return [plan[(start + k) % len(plan)] for k in range(min(size, len(plan)))]


def choose_evictions(entries, *, protected=(), consumed=(), retain=0, next_read=None, need_bytes=0):
    """Decide which cached shards to delete. Returns (shards to delete, in order; whether need_bytes fit).

    entries:    {shard: bytes} of what could be deleted (verified files, orphan partial files)
    protected:  never deleted (leased, pinned, in the ahead window, waited for)
    consumed:   shards the readers released, oldest first; all but the `retain` most recent that are
                still cached go routinely
    next_read:  shard -> how far in the future it is read next (None: never again). Under pressure the
                shard read furthest away goes first (never-again before everything else)
    need_bytes: bytes that must be freed beyond the routine deletions; when even deleting every
                unprotected shard cannot free them, only the routine deletions are returned
    """
    protected = set(protected)
    next_read = next_read or (lambda s: None)
    cands = [s for s in consumed if s in entries and s not in protected]
    keep = set(cands[max(0, len(cands) - retain):]) if retain > 0 else set()
    routine = [s for s in cands if s not in keep]
    freed = sum(entries[s] for s in routine)
    if freed >= need_bytes:
        return routine, True

    def urgency(s):            # smaller = evict sooner
        nr = next_read(s)
        return (0, -s) if nr is None else (1, -nr)

    rest = sorted((s for s in entries if s not in protected and s not in routine), key=urgency)
    extra = []
    for s in rest:
        if freed >= need_bytes:
            break
        extra.append(s)
        freed += entries[s]
    if freed >= need_bytes:
        return routine + extra, True
    return routine, False


class ShardCache:
    """Bookkeeping of one data dir. Every method expects the caller's lock to be held."""

    def __init__(self, data_dir, budget=None):
        self.data_dir = Path(data_dir)
        self.budget = budget
        self.files = {}          # shard -> bytes: verified files under their final name
        self.partials = {}       # shard -> bytes: partial files of shards not being downloaded
        self.inflight = {}       # shard -> [reserved bytes, bytes on disk so far]
        self.leases = {}         # shard -> Counter(reader -> count)
        self.consumed = {}       # shard -> None, in the order readers released them (oldest first)

    # --- paths and the directory
    def path(self, shard):
        return self.data_dir / shard_name(shard)

    def partial_files(self, shard):
        prefix = shard_name(shard) + "."
        out = []
        for e in os.scandir(self.data_dir):
            if e.name.startswith(prefix) and (e.name.endswith(".partial") or e.name.endswith(".partial.json")):
                out.append(Path(e.path))
        return out

    def partial_bytes(self, shard):
        return sum(p.stat().st_size for p in self.partial_files(shard) if p.name.endswith(".partial"))

    def scan(self):
        """({shard: bytes} of final-named shard files, {shard: bytes} of partial files) in the dir."""
        finals, partials = {}, {}
        for e in os.scandir(self.data_dir):
            m = SHARD_RE.match(e.name)
            if m and e.is_file():
                finals[int(m.group(1))] = e.stat().st_size
                continue
            m = PARTIAL_RE.match(e.name)
            if m and e.is_file():
                s = int(m.group(1))
                partials[s] = partials.get(s, 0) + e.stat().st_size
        return finals, partials

    def free_bytes(self):
        return shutil.disk_usage(self.data_dir).free

    # --- accounting
    def used_bytes(self):
        """What counts against the budget: files + partials + in-flight reservations."""
        return (sum(self.files.values()) + sum(self.partials.values())
                + sum(max(r, got) for r, got in self.inflight.values()))

    def disk_bytes(self):
        """What is really on disk (as far as we know): files + partials + in-flight bytes so far."""
        return sum(self.files.values()) + sum(self.partials.values()) + sum(got for _, got in self.inflight.values())

    def reserved_bytes(self):
        return sum(max(0, r - got) for r, got in self.inflight.values())

    def fits(self, extra):
        return self.budget is None or self.used_bytes() + extra <= self.budget

    # --- the life of a shard
    def begin(self, shard, size):
        """Reserve `size` bytes for a download of shard; its existing partial bytes move into it."""
        got = self.partials.pop(shard, 0)
        self.inflight[shard] = [max(size, got), got]

    def progress(self, shard, n):
        if shard in self.inflight:
            self.inflight[shard][1] += n

    def finish(self, shard, size):
        self.inflight.pop(shard, None)
        self.files[shard] = size
        self.consumed.pop(shard, None)

    def abandon(self, shard):
        """A download stopped or failed: its reservation ends, whatever partial bytes it left count."""
        self.inflight.pop(shard, None)
        left = self.partial_bytes(shard)
        if left:
            self.partials[shard] = left
        else:
            self.partials.pop(shard, None)

    def entries(self):
        """{shard: bytes} of what could be deleted: verified files and orphan partials."""
        out = dict(self.partials)
        for s, b in self.files.items():
            out[s] = out.get(s, 0) + b
        return out

    def delete(self, shard):
        """Delete shard's file and its orphan partials. Returns bytes freed. Never touches a leased or
        in-flight shard (raises, since that would be a bug in the caller)."""
        if self.leases.get(shard):
            raise RuntimeError(f"refusing to delete {shard_name(shard)}: a reader holds it")
        if shard in self.inflight:
            raise RuntimeError(f"refusing to delete {shard_name(shard)}: it is being downloaded")
        freed = 0
        if shard in self.files:
            try:
                os.remove(self.path(shard))
            except FileNotFoundError:
                pass
            freed += self.files.pop(shard)
        if shard in self.partials:
            for p in self.partial_files(shard):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
            freed += self.partials.pop(shard)
        self.consumed.pop(shard, None)
        return freed

    # --- readers
    def lease(self, shard, reader):
        self.leases.setdefault(shard, Counter())[reader] += 1
        self.consumed.pop(shard, None)

    def release(self, shard, reader):
        """End one lease. Returns True when no reader holds the shard any more (it is consumed)."""
        c = self.leases.get(shard)
        if not c or c[reader] <= 0:
            return None
        c[reader] -= 1
        if c[reader] == 0:
            del c[reader]
        if c:
            return False
        del self.leases[shard]
        self.consumed[shard] = None
        return True

    def leased(self):
        return {s for s, c in self.leases.items() if c}
