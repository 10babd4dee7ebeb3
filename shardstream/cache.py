"""The on-disk window: the read plan, what the data dir holds, what it may hold, and what to delete.

The read order is known in advance, so it is an object: `ReadPlan(order, epochs)` says which shard is
read at every plan position (epoch after epoch), and how far away a shard's next read is. The default
plan of a StreamingDownloader is train shards 0..N-1 in order (`ReadPlan.sequential(N)`); a node of a
multi-node run reads every nodes-th shard (`ReadPlan.sequential(N, node=n, nodes=k)`).

Two pure functions decide, so they can be tested on hand-made plans and replaced without touching the
threads:

- `ahead_window(plan, cursor, size)`: the shards to keep ready after the reader's position.
- `choose_evictions(entries, ...)`: which cached shards to delete, routinely (consumed beyond `retain`,
  unless a later epoch reads them again and there is a budget to keep them in) and under budget
  pressure (Belady's rule: the shard read furthest in the future first, never a protected one, never
  one read sooner than the shard that needs the room).

`ShardCache` holds the bookkeeping and does the deleting: verified files, partial files, reservations
for in-flight downloads, leases by reader, the consumed order. Budget accounting counts final files +
partial files + reservations (an in-flight shard counts as max(its remote size, bytes so far)), so the
bytes really on disk never exceed what is accounted. Small metadata files (status.json, events.jsonl,
locks, .partial.json sidecars) are not counted.

Shard files are named by a `layout.Naming` (nanochat's shard_XXXXX.parquet, or a manifest's cache
names; `ShardCache(dir, budget, naming)`): paths, partials, locks and leases all follow it, and the scan
at start takes only this run's names. A shard-like file of another file set (`foreign`) is neither
adopted nor deleted.

Several processes may share one data dir (two training runs, `shardstream download` beside a trainer).
A lease is then also a shared flock on `.shardstream/NAME.lease` (layout.py), held while
any reader of this process holds the shard: `delete` takes the exclusive lock without blocking and keeps
a shard another process's reader holds (returns None); `lease` returns False for a file another process
deleted (the caller fetches it again). `delete` also keeps partial files whose fetch lock
(`lock_exclusive`, held by fetch.py) another fetch holds.

Lock files go once nobody needs them: a `.lease` when its shard is deleted or its last reader here lets
go while no other process holds it, a fetch's `.lock` when the fetch ends. Each is removed only while its
exclusive lock is held, and whoever locks one (lease, delete, lock_exclusive) checks afterwards that the
file it locked is still the one at that path, and starts over if not, so a lock on a removed file is
never trusted (filelock makes no such check, which is why the fetch lock is ours).

ShardCache is not thread-safe on its own: the downloader calls it with its lock held.
"""
import fcntl
import logging
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import layout
from .errors import ConfigError
from .safefs import ensure_book_dir, open_nofollow

logger = logging.getLogger(__name__)

PARTIAL_RE = re.compile(r"^shard_(\d{5,})\.parquet\..+\.partial$")     # nanochat's partials (the id)
# any shard partial shardstream writes: nanochat's or a cache name's (manifest.cache_name); group 1 the file
ANY_PARTIAL_RE = re.compile(r"^((?:shard_\d{5,}|\d{6,}-[0-9a-f]{12})\.parquet)\..+\.partial$")


@dataclass(frozen=True)
class ReadPlan:
    """The order the readers read shards in: `order` (each shard once) per epoch, for `epochs` epochs
    (None: forever). A plan position is global: position p is shard order[p % len(order)] of epoch
    p // len(order) (counting from 0)."""
    order: tuple
    epochs: int | None = 1

    def __post_init__(self):
        order = tuple(self.order)
        if not order:
            raise ConfigError("a read plan needs at least one shard")
        for s in order:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ConfigError(f"read plan entries must be shard ids (ints >= 0), got {s!r}")
        if len(set(order)) != len(order):
            raise ConfigError("a read plan reads each shard once per epoch: its order has duplicates")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int)
                                        or self.epochs < 1):
            raise ConfigError(f"epochs must be an int >= 1 or None (forever), got {self.epochs!r}")
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "_index", {s: k for k, s in enumerate(order)})

    @classmethod
    def sequential(cls, total_shards, epochs=1, node=0, nodes=1):
        """Shards 0..total_shards-1 in order (node n of `nodes` reads n, n+nodes, n+2*nodes, ...)."""
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 \
                or isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < nodes:
            raise ConfigError(f"node must be an int in 0..nodes-1 and nodes an int >= 1, got node={node!r}, "
                              f"nodes={nodes!r}")
        order = tuple(range(node, total_shards, nodes))
        if not order:
            raise ConfigError(f"node {node} of {nodes} gets no shard out of {total_shards}: use fewer nodes")
        return cls(order, epochs)

    @property
    def epoch_length(self):
        return len(self.order)

    @property
    def length(self):
        """Plan positions in all (None: forever)."""
        return None if self.epochs is None else self.epochs * len(self.order)

    def __contains__(self, shard):
        return shard in self._index

    def index(self, shard):
        """shard's position within an epoch (None: not in the plan)."""
        return self._index.get(shard)

    def at(self, pos):
        """The shard read at plan position pos (None past the end)."""
        if pos < 0 or (self.length is not None and pos >= self.length):
            return None
        return self.order[pos % len(self.order)]

    def locate(self, shard, near=-1):
        """The plan position of a read of shard nearest to position `near` (ties: the later one), or None.
        A reader moving on asks for the next position; a reader re-reading (a resume) for an earlier one."""
        k = self._index.get(shard)
        if k is None:
            return None
        n = len(self.order)
        before = k + n * ((near - k) // n) if near >= k else None       # largest position <= near
        after = k if near < k else before + n                            # smallest position > near
        if self.length is not None:
            if before is not None and before >= self.length:
                before = k + n * (self.epochs - 1)
            if after >= self.length:
                after = None
        if before is not None and before == near:
            return near
        if before is None:
            return after
        if after is None:
            return before
        return after if after - near <= near - before else before

    def next_read(self, shard, cursor):
        """Plan positions from `cursor` to the next read of shard after it (None: never again)."""
        k = self._index.get(shard)
        if k is None:
            return None
        n = len(self.order)
        pos = k if cursor < k else k + n * ((cursor - k) // n + 1)
        if self.length is not None and pos >= self.length:
            return None
        return pos - cursor

    def ahead(self, cursor, size):
        """The shards at positions cursor+1 .. cursor+size (fewer at the end; never a shard twice)."""
        out = []
        for p in range(cursor + 1, cursor + 1 + min(size, len(self.order))):
            s = self.at(p)
            if s is None:
                break
            out.append(s)
        return out


def ahead_window(plan, cursor, size, cycle=False):
    """The `size` plan entries after plan position `cursor` (-1: the reader has not started).

    plan is a ReadPlan (its epochs decide what follows the last shard) or a list of shard ids read once
    (with cycle=True the list repeats: the next epoch follows the last shard)."""
    if isinstance(plan, ReadPlan):
        return plan.ahead(cursor, size) if size > 0 else []
    plan = list(plan)
    if not plan or size <= 0:
        return []
    start = cursor + 1
    if not cycle:
        return plan[max(start, 0):max(start, 0) + size]
    return [plan[(start + k) % len(plan)] for k in range(min(size, len(plan)))]


def choose_evictions(entries, *, protected=(), consumed=(), retain=0, next_read=None, need_bytes=0,
                     keep_rereads=False, horizon=None):
    """Decide which cached shards to delete. Returns (shards to delete, in order; whether need_bytes fit).

    entries:      {shard: bytes} of what could be deleted (verified files, orphan partial files)
    protected:    never deleted (leased, pinned, in the ahead window, waited for)
    consumed:     shards the readers released, oldest first; all but the `retain` most recent that are
                  still cached go routinely...
    keep_rereads: ...except, when True (there is a budget to keep them in), those the plan reads again:
                  they stay until the budget needs their room (a later epoch finds them on disk)
    next_read:    shard -> how far in the future it is read next (None: never again). Under pressure the
                  shard read furthest away goes first (never-again before everything else): Belady's rule
    horizon:      under pressure, never delete a shard read at or before this distance (the shard that
                  needs the room is read then: deleting one read sooner would only cost a download)
    need_bytes:   bytes that must be freed beyond the routine deletions; when even deleting every
                  allowed shard cannot free them, only the routine deletions are returned
    """
    protected = set(protected)
    next_read = next_read or (lambda s: None)
    cands = [s for s in consumed if s in entries and s not in protected]
    keep = set(cands[max(0, len(cands) - retain):]) if retain > 0 else set()
    routine = [s for s in cands if s not in keep and not (keep_rereads and next_read(s) is not None)]
    freed = sum(entries[s] for s in routine)
    if freed >= need_bytes:
        return routine, True

    def urgency(s):            # smaller = evict sooner
        nr = next_read(s)
        return (0, -s) if nr is None else (1, -nr)

    def allowed(s):
        nr = next_read(s)
        return horizon is None or nr is None or nr > horizon

    rest = sorted((s for s in entries if s not in protected and s not in routine and allowed(s)), key=urgency)
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

    def __init__(self, data_dir, budget=None, naming=None):
        self.data_dir = Path(data_dir)
        self.budget = budget
        self.naming = naming if naming is not None else layout.Naming()     # nanochat's names by default
        self.files = {}          # shard -> bytes: verified files under their final name
        self.partials = {}       # shard -> bytes: partial files of shards not being downloaded
        self.inflight = {}       # shard -> [reserved bytes, bytes on disk so far]
        self.leases = {}         # shard -> Counter(reader -> count)
        self.consumed = {}       # shard -> None, in the order readers released them (oldest first)
        self._lease_fds = {}     # shard -> fd holding a shared flock on its .lease file while leased here

    # --- paths and the directory
    def name(self, shard):
        """shard's file name in the data dir (self.naming)."""
        return self.naming.name(shard)

    def path(self, shard):
        return self.data_dir / self.name(shard)

    def partial_files(self, shard):
        """shard's partial files and their sidecars (and sidecars an older layout kept beside them)."""
        prefix = self.name(shard) + "."
        out = []
        for d in (self.data_dir, layout.book_dir(self.data_dir)):
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for e in entries:
                if e.name.startswith(prefix) and (e.name.endswith(".partial") or e.name.endswith(".partial.json")):
                    out.append(Path(e.path))
        return out

    def partial_bytes(self, shard):
        return sum(p.stat().st_size for p in self.partial_files(shard) if p.name.endswith(".partial"))

    def scan(self):
        """({shard: bytes} of final-named shard files, {shard: bytes} of partial files) in the dir: this
        run's names only (self.naming); a file of another file set is not taken for one of ours."""
        finals, partials = {}, {}
        for e in os.scandir(self.data_dir):
            s = self.naming.shard_of(e.name)
            if s is not None and e.is_file():
                finals[s] = e.stat().st_size
                continue
            s = self.naming.partial_shard(e.name)
            if s is not None and e.is_file():
                partials[s] = partials.get(s, 0) + e.stat().st_size
        return finals, partials

    def foreign(self):
        """{name: bytes} of shard-like files in the dir that are none of this run's (layout.Naming.foreign):
        left by a run over another file set. Not counted in the budget, never deleted: the caller says so."""
        out = {}
        try:
            entries = list(os.scandir(self.data_dir))
        except FileNotFoundError:
            return out
        for e in entries:
            if self.naming.foreign(e.name) and e.is_file(follow_symlinks=False):
                out[e.name] = e.stat(follow_symlinks=False).st_size
        return out

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

    def abandon(self, shard, left=None):
        """A download stopped or failed: its reservation ends, whatever partial bytes it left count (`left`:
        partial_bytes(shard) measured by the caller before taking its lock; None: measured here)."""
        self.inflight.pop(shard, None)
        left = self.partial_bytes(shard) if left is None else left
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
        """Delete shard's file and its orphan partials. Returns bytes freed, or None (nothing deleted) when a
        reader in another process holds the shard. Never touches a leased or in-flight shard (raises, since
        that would be a bug in the caller)."""
        if self.leases.get(shard):
            raise RuntimeError(f"refusing to delete {self.name(shard)}: a reader holds it")
        if shard in self.inflight:
            raise RuntimeError(f"refusing to delete {self.name(shard)}: it is being downloaded")
        freed = 0
        if shard in self.files:
            fd = try_lock(self.lease_path(shard))
            if fd is False:
                return None
            try:
                _remove(self.path(shard))
                if fd is not None:              # still holding its lock: the lease file goes too
                    _remove(self.lease_path(shard))
            finally:
                if fd is not None:
                    os.close(fd)
            freed += self.files.pop(shard)
        if shard in self.partials and try_lock(layout.lock_path(self.data_dir, self.name(shard)),
                                                close=True) is not False:    # no fetch of it running
            for p in self.partial_files(shard):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
            freed += self.partials.pop(shard)
        self.consumed.pop(shard, None)
        return freed

    # --- readers
    def lease_path(self, shard):
        return layout.lease_path(self.data_dir, self.name(shard))

    def lease(self, shard, reader):
        """Lease shard to reader. Returns False, leasing nothing, when its file is gone (another process
        sharing the data dir deleted it while no reader held it): the caller must fetch it again."""
        if shard not in self._lease_fds:
            ensure_book_dir(self.data_dir)
            while True:
                fd = open_nofollow(self.lease_path(shard), os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits out another process's delete in progress
                if _is_current(fd, self.lease_path(shard)):
                    break
                os.close(fd)                    # that delete removed the file we locked: lock the new one
            if shard in self.files and not self.path(shard).is_file():
                os.close(fd)
                return False
            self._lease_fds[shard] = fd
        self.leases.setdefault(shard, Counter())[reader] += 1
        self.consumed.pop(shard, None)
        return True

    def release(self, shard, reader, consumed=True):
        """End one lease. Returns True when no reader holds the shard any more (then it is consumed, unless
        `consumed` is False: a reader that stopped mid-shard, or read it only to rebuild a resume)."""
        c = self.leases.get(shard)
        if not c or c[reader] <= 0:
            return None
        c[reader] -= 1
        if c[reader] == 0:
            del c[reader]
        if c:
            return False
        del self.leases[shard]
        fd = self._lease_fds.pop(shard, None)
        if fd is not None:
            try:                                # no other process's reader holds it: the file goes too
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _is_current(fd, self.lease_path(shard)):
                    _remove(self.lease_path(shard))
            except OSError:
                pass
            os.close(fd)                        # the lock goes with it
        if consumed:
            self.consumed[shard] = None
        return True

    def leased(self):
        return {s for s, c in self.leases.items() if c}


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _is_current(fd, path):
    """Whether fd is still the file at path (a delete may have removed it while we waited for its lock)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def discard_partials(data_dir):
    """Remove partial downloads (`NAME.*.partial` of nanochat's names and of cache names, their sidecars,
    and lock and lease files an older layout left at the top) that no process holds the lock of. Returns
    how many partial files went."""
    d = Path(data_dir)
    removed = 0
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return 0
    for name in names:
        m = ANY_PARTIAL_RE.match(name)
        if not m:
            continue
        if try_lock(layout.lock_path(d, m.group(1)), close=True) is False:
            continue        # another process is fetching that shard: its partial is live
        for p in (d / name, layout.sidecar_path(d / name), d / (name + ".json")):
            _remove(p)
        removed += 1
    for p in layout.legacy_files(d):
        if try_lock(p, close=True) is not False:
            _remove(p)
    return removed


def lock_exclusive(path, stop=None, poll=0.25, on_wait=None):
    """Take the exclusive flock on path (creating the file), waiting for another holder: the fd holding
    it, or None when `stop` is set first. on_wait() is called once, when it has to wait."""
    waited = False
    while True:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            if stop is not None:
                if stop.wait(poll):
                    return None
            else:
                time.sleep(poll)
            continue
        if _is_current(fd, path):
            return fd
        os.close(fd)                            # removed meanwhile: lock the file at the path now


def unlock_and_remove(path, fd):
    """Remove the lock file at path (fd holds its exclusive lock, so nobody else does) and let go."""
    try:
        if _is_current(fd, path):
            _remove(path)
    finally:
        os.close(fd)


def try_lock(path, close=False):
    """Take the exclusive flock on path without waiting. False: another holder has it. None: path does
    not exist (nobody ever locked it). Else the fd holding the lock, or True with close=True (the lock
    was free and is released again at once)."""
    while True:
        try:
            fd = open_nofollow(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        if _is_current(fd, path):
            break
        os.close(fd)                            # removed meanwhile: look again
    if close:
        os.close(fd)
        return True
    return fd
