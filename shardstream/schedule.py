"""The downloader's decisions as pure functions: a Snapshot of what is known goes in, actions come out.

No threads, no I/O, no clock (the time is an argument). StreamingDownloader (downloader.py) builds a
Snapshot under its lock, asks, and carries the answer out (probes, fetches, deletions, errors); the
planner (simulate.py, `shardstream plan`) asks the same functions inside a simulated run. Every rule of
the window lives here, so it is tested on hand-made snapshots in milliseconds (tests/test_schedule.py).

What a shard is, as the scheduler sees it (`shard_state`), and how it moves:

    ABSENT --probe--> PROBING --size known--> KNOWN --fetch--> FETCHING --verified--> ON_DISK
    ON_DISK --a reader's lease--> LEASED --last lease released--> CONSUMED (or ON_DISK when released
    unconsumed) ; ON_DISK / CONSUMED --evicted--> ABSENT (or KNOWN: its size stays known)
    PROBING / FETCHING --failed--> FAILED --backoff over--> KNOWN or ABSENT ; FAILED --policy--> SKIPPED

The rules (each a function below):
- priority: shards a reader waits for (oldest wait first); then, while start() fills the initial buffer,
  only its shards; else the next VAL_AFTER shards of the window, the val shards (in order; none with
  --val-files none), the rest of the window (adaptive window: the val shards after the shards the
  measured rates say the reader needs).
- next_action: the most urgent shard not on disk, in flight, skipped or backing off: its size is asked
  first (Probe), then it is fetched (Fetch) while fewer transfers receive bytes than allowed (one that is
  verifying or committing does not hold the link, so the next starts at once); a shard a reader waits
  for may start one transfer beyond the limit (a spare worker), so it never queues behind prefetches.
- routine_evictions: consumed shards beyond `retain` go; with a budget, those a later epoch reads again
  stay until their room is needed.
- make_room: the evictions a download needs to fit the budget beside the val shard's reserved room:
  Belady's rule over the plan (cache.choose_evictions), never a leased shard, the val shard, one a reader
  waits for, one inside the window (unless the download is for a waiting reader), or one read before the
  shard that needs the room; None when nothing allowed frees enough (the download waits for room).
- transfer_limit: transfers allowed at once with the adaptive window (prefetch.parallel_transfers over
  the measured rates); it tries one transfer more than measured (k+1) only while every reader has k+1
  verified shards ready (ready_ahead): a trial splits the link while a reader may need it.
- failure_verdict: what a waiting reader gets for a shard that fails: at once for a permanent failure,
  after FailurePolicy.deadline for a transient one or for a download in flight whose tries keep failing.
"""
from dataclasses import dataclass, field
from enum import Enum

from .cache import ReadPlan, choose_evictions
from .prefetch import parallel_transfers

VAL_AFTER = 2                   # fixed window: the val shard is fetched after this many window shards
                                # (after the initial buffer; then it is first in line until it is on disk)


class ShardState(Enum):
    ABSENT = "absent"           # not on disk, size not asked
    PROBING = "probing"         # its size is being asked
    KNOWN = "known"             # size known, not on disk
    FETCHING = "fetching"       # a transfer is in flight
    ON_DISK = "on_disk"         # verified under its final name, no reader holds it
    LEASED = "leased"           # verified, a reader holds it
    CONSUMED = "consumed"       # verified, every reader released it after reading it
    FAILED = "failed"           # the last try failed; retried after a backoff
    SKIPPED = "skipped"         # the "skip" failure policy gave up on it


class JobKind(Enum):
    PROBE = "probe"
    FETCH = "fetch"


@dataclass(frozen=True)
class Failure:
    """Why a shard is not on disk yet (the downloader's record of failed fetch calls)."""
    attempts: int = 0           # requests tried in all
    rounds: int = 0             # failed fetch calls (drives the backoff)
    permanent: bool = False
    retry_at: float = 0.0       # the time before which it is not tried again (inf: never)
    error: object = None        # the last error (an exception), None while nothing failed


@dataclass(frozen=True)
class Snapshot:
    """What the scheduler knows at one moment. Mappings are read, never changed. The val shards are
    `val_shards` (a manifest's, in order; () for none), or when that is None the one `val_shard`
    (nanochat's: the last shard; see vals())."""
    plan: ReadPlan
    val_shard: int | None
    cursors: dict = field(default_factory=dict)      # reader -> plan position of the shard it asked for last
    start_pos: int | None = None    # where the window starts before any reader asks (None: not anchored)
    initial: tuple = ()             # while start() fills the initial buffer: only these shards
    initial_buffer: int = 1
    window: int = 5                 # the window's size in shards
    window_base: int | None = None  # what the measured rates alone ask for (adaptive)
    adaptive: bool = False
    verified: int = 0               # plan shards verified so far in this run
    files: dict = field(default_factory=dict)        # shard -> bytes of its verified file
    partials: dict = field(default_factory=dict)     # shard -> bytes of its partial files
    inflight: frozenset = frozenset()   # downloads begun (their room reserved), until verified or given up
    transferring: frozenset | None = None   # of those, the ones receiving bytes now (None: all of them);
                                            # one that verifies, commits or backs off frees its link slot
    leased: frozenset = frozenset()
    consumed: tuple = ()            # released shards still on disk, oldest first
    demand: tuple = ()              # shards readers wait for, oldest wait first
    sizes: dict = field(default_factory=dict)        # shard -> remote size (None: unknown) once asked
    probing: frozenset = frozenset()
    failures: dict = field(default_factory=dict)     # shard -> Failure
    troubled: dict = field(default_factory=dict)     # shard in flight -> (tries failed, last cause)
    skipped: frozenset = frozenset()
    blocked: frozenset = frozenset()                 # shards that wait for room in the budget
    budget: int | None = None
    used_bytes: int = 0             # files + partials + reservations, as the budget counts them
    retain: int = 0
    parallel: int = 2               # transfers allowed at once (the adaptive rule or every worker)
    max_shard_bytes: int = 0        # the largest known size of a planned shard
    val_shards: tuple | None = None  # every val shard, in order (None: just val_shard)


def vals(snap):
    """The val shards, in order: fetched after the first window shards and kept, counted in the budget."""
    if snap.val_shards is not None:
        return tuple(snap.val_shards)
    return () if snap.val_shard is None else (snap.val_shard,)


@dataclass(frozen=True)
class Probe:
    shard: int
    kind: JobKind = JobKind.PROBE


@dataclass(frozen=True)
class Fetch:
    shard: int
    kind: JobKind = JobKind.FETCH


@dataclass(frozen=True)
class Evict:
    shard: int
    why: str                    # "consumed", "unneeded" or "budget"


@dataclass(frozen=True)
class Verdict:
    """What a reader waiting for a failing shard gets: mode "fail" (raise `failure`) or "skip"."""
    mode: str
    failure: Failure
    in_flight: bool = False     # the failure is a download in flight whose tries keep failing


# -----------------------------------------------------------------------------
# where the readers are

def anchored(snap):
    """Whether the window has a place in the plan yet (a reader asked, start_at, or an initial buffer)."""
    return bool(snap.cursors) or snap.start_pos is not None


def reader_pos(snap):
    """The slowest reader's plan position; before any reader asks, the position before the window's start."""
    if snap.cursors:
        return min(snap.cursors.values())
    return -1 if snap.start_pos is None else snap.start_pos - 1


def reader_shard(snap):
    return snap.plan.at(reader_pos(snap)) if snap.cursors else None


def ahead(snap):
    """The window: the plan's next `window` shards after the slowest reader."""
    return snap.plan.ahead(reader_pos(snap), snap.window) if anchored(snap) else []


def next_read(snap, shard):
    """Plan positions until any reader reads shard again (None: never, as the plan says)."""
    best = None
    for c in (snap.cursors.values() or (reader_pos(snap),)):
        d = snap.plan.next_read(shard, c)
        if d is not None and (best is None or d < best):
            best = d
    return best


def shard_state(snap, shard, now=0.0):
    """The ShardState of one shard (see the module docstring)."""
    if shard in snap.skipped:
        return ShardState.SKIPPED
    if shard in snap.files:
        if shard in snap.leased:
            return ShardState.LEASED
        return ShardState.CONSUMED if shard in snap.consumed else ShardState.ON_DISK
    if shard in snap.inflight:
        return ShardState.FETCHING
    f = snap.failures.get(shard)
    if f is not None and f.error is not None and f.retry_at > now:
        return ShardState.FAILED
    if shard in snap.probing:
        return ShardState.PROBING
    return ShardState.KNOWN if shard in snap.sizes else ShardState.ABSENT


# -----------------------------------------------------------------------------
# what to do next

def priority(snap):
    """Shards to have on disk, most urgent first (see the module docstring)."""
    order = list(snap.demand)
    if snap.initial:
        order += list(snap.initial)
    elif anchored(snap):
        win = ahead(snap)
        k = VAL_AFTER if not snap.adaptive else max(1, snap.window_base or snap.window)
        if not snap.adaptive:
            if snap.verified >= snap.initial_buffer + VAL_AFTER:
                k = 0                       # its turn came: a reader faster than the link must not starve it
            elif not snap.cursors:          # the initial buffer is not "next"
                k += snap.initial_buffer
        if any(s in snap.blocked for s in win[:k]):
            k = 0                           # they wait for room; the budget always holds the val shard
        order += win[:k] + list(vals(snap)) + win[k:]
    seen, out = set(), []
    for s in order:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def next_action(snap, now):
    """Probe(shard) to ask its size, Fetch(shard) to download it, or None: nothing to start now."""
    slots = snap.parallel - len(snap.inflight if snap.transferring is None else snap.transferring)
    demand = set(snap.demand)
    for s in priority(snap):
        if s in snap.files or s in snap.inflight or s in snap.skipped:
            continue
        f = snap.failures.get(s)
        if f is not None and f.retry_at > now:
            continue
        if s in snap.probing:               # its size comes soon: it keeps its turn
            slots -= 1
            continue
        if s not in snap.sizes:
            return Probe(s)
        if slots + (s in demand) > 0:       # a reader waits for it: one transfer beyond the limit
            return Fetch(s)
    return None


def ready_ahead(snap, limit):
    """Verified shards every reader has ready after the shard it reads, counted up to `limit` (the plan's
    end counts as ready: nothing more is needed); 0 while a reader waits or before the window is anchored.
    Before any reader asks, counted from the window's start."""
    if snap.demand or not anchored(snap):
        return 0
    ready = limit
    for c in (snap.cursors.values() or (reader_pos(snap),)):
        n = 0
        while n < ready:
            nxt = snap.plan.at(c + 1 + n)
            if nxt is not None and nxt not in snap.files:
                break
            n += 1
        ready = n
    return ready


def transfer_limit(snap, rates, workers):
    """Transfers allowed at once with the adaptive window (snap.parallel is not read): what the measured
    link rates ask for (prefetch.parallel_transfers). It tries k+1 transfers (one more than the best
    measured k) only while every reader has k+1 verified shards ready (ready_ahead): the trial splits the
    link, so each of its shards lands after about (k+1) shard-downloads, and a reader that is not behind
    reads k+1 shards in at least that long; with fewer ready it would wait for the split link (issue 17:
    W/R = 1.25 waited 0.6 % instead of 0.1-0.2 %). The downloader and the planner (simulate.py) both ask this."""
    return min(parallel_transfers(rates, workers, ready=ready_ahead(snap, workers + 1)), workers)


def window_room(snap):
    """Shards of the largest known size the budget holds beside the val shards and the leased shards: the
    most the adaptive window may keep ahead (None: no budget, or no size known yet)."""
    if snap.budget is None or not snap.max_shard_bytes:
        return None
    vs = vals(snap)
    val = sum((snap.sizes[v] or 0) if v in snap.sizes else snap.max_shard_bytes for v in vs)
    pinned = val + sum(snap.files.get(s, snap.max_shard_bytes) for s in snap.leased if s not in vs)
    return int((snap.budget - pinned) // snap.max_shard_bytes)


def fetch_size(snap, shard):
    """The bytes a download of shard reserves: its remote size, else the largest size known."""
    size = snap.sizes.get(shard)
    if size is not None:
        return size
    known = [v for v in snap.sizes.values() if v is not None]
    return max(known) if known else 0


# -----------------------------------------------------------------------------
# what to delete

def protected(snap, for_demand=False):
    """Shards never deleted: leased, the val shards, waited for, and (unless making room for a waiting
    reader) the window."""
    prot = set(snap.leased) | set(vals(snap)) | set(snap.demand)
    if not for_demand:
        prot |= set(ahead(snap))
    return prot


def routine_evictions(snap, keep=None):
    """[Evict] of consumed shards beyond `retain` (kept while a budget holds them and a later epoch reads
    them again). keep: a shard a reader is asking for right now."""
    evict, _ = choose_evictions(_entries(snap), protected=protected(snap) | {keep}, consumed=list(snap.consumed),
                                retain=snap.retain, next_read=lambda s: next_read(snap, s),
                                keep_rereads=snap.budget is not None)
    return [Evict(s, "consumed" if s in snap.consumed else "unneeded") for s in evict]


def val_room(snap, shard):
    """Bytes kept free for the val shards not on disk yet (the budget check promised them room beside two
    train shards; the window must not fill it first). A val shard's own download does not count itself."""
    room = 0
    for val in vals(snap):
        f = snap.failures.get(val)
        if shard == val or val in snap.files or val in snap.inflight or val in snap.skipped \
                or (f is not None and f.retry_at == float("inf")):
            continue
        size = snap.sizes.get(val)
        size = size if size is not None else snap.max_shard_bytes
        room += max(0, size - snap.partials.get(val, 0))
    return room


def make_room(snap, shard, size):
    """([Evict] that let a download of shard (size bytes) fit the budget, room it must still find after
    them) or (None, why) when nothing allowed frees enough: the download waits for room."""
    if snap.budget is None:
        return [], 0
    have = snap.partials.get(shard, 0)
    extra = max(size, have) - have
    room = extra + val_room(snap, shard)
    need = snap.used_bytes + room - snap.budget
    entries = _entries(snap)
    entries.pop(shard, None)
    demand = shard in snap.demand
    evict, ok = choose_evictions(entries, protected=protected(snap, for_demand=demand),
                                 consumed=list(snap.consumed), retain=snap.retain,
                                 next_read=lambda s: next_read(snap, s), need_bytes=max(0, need),
                                 keep_rereads=True, horizon=None if demand else next_read(snap, shard))
    if not ok:
        return None, need
    return [Evict(s, "consumed" if s in snap.consumed else "budget") for s in evict], room


def over_budget_evictions(snap):
    """[Evict] that bring a data dir found over the budget at start back under it (shards not needed soon)."""
    if snap.budget is None or snap.used_bytes <= snap.budget:
        return []
    evict, _ = choose_evictions(_entries(snap), protected=protected(snap), next_read=lambda s: next_read(snap, s),
                                need_bytes=snap.used_bytes - snap.budget)
    return [Evict(s, "budget") for s in evict]


def _entries(snap):
    """{shard: bytes} of what could be deleted: verified files and orphan partials."""
    out = dict(snap.partials)
    for s, b in snap.files.items():
        out[s] = out.get(s, 0) + b
    return out


# -----------------------------------------------------------------------------
# failures

def failure_verdict(snap, shard, waited, policy):
    """What a reader that has waited `waited` seconds for shard gets under FailurePolicy `policy`: None
    (keep waiting) or a Verdict. A permanent failure counts at once, a transient one after the deadline;
    so does a download in flight whose tries keep failing (resets, a trickle), which has no failure yet."""
    f = snap.failures.get(shard)
    in_flight = False
    if (f is None or f.error is None) and shard in snap.troubled and waited >= policy.deadline:
        tries, cause = snap.troubled[shard]
        f, in_flight = Failure(attempts=tries, error=cause), True
    if f is None or f.error is None or not (f.permanent or waited >= policy.deadline):
        return None
    if policy.mode == "wait":
        return None
    return Verdict(policy.mode, f, in_flight)


def backoff_cap(policy, failure):
    """The longest wait before a shard whose fetch calls failed `failure.rounds` times is tried again
    (full jitter: the caller draws in [cap/2, cap])."""
    if failure.permanent:
        return policy.retry_max
    return min(policy.retry_max, policy.retry_initial * 2 ** (failure.rounds - 1))
