"""A StreamingDownloader's configuration, checked before anything runs: pure functions over its arguments.

- The policies (frozen, checked on construction): `WindowPolicy` (how many shards ahead and behind, the
  byte budget), `FailurePolicy` (what a reader waiting for a failing shard gets), `DiskPolicy` (the
  free-space floor).
- `resolve_options(...)`: the constructor's keyword arguments (the policies, or the seed's loose keywords
  for them, never both) into one frozen `Options`, or a ConfigError naming the argument.
- `resolve_plan(source, plan, total_shards, window, start_at)`: the read plan, the train-shard count and
  where the window starts before any reader asks, checked against the dataset the source has.
- `budget_problem(budget, val_bytes, first_bytes)`: why a budget cannot move the window (None: it can).
- `disk_check(free, need, policy, ...)`: whether a download may start given the free space measured
  (statvfs is the caller's, outside its lock) - a `DiskVerdict`.

No I/O here (the source's listing is done before resolve_plan is asked); every rule is tested on values
(tests/test_downloader.py).
"""
from dataclasses import dataclass

from .cache import ReadPlan
from .errors import ConfigError
from .fetch import FetchPolicy
from .prefetch import PrefetchPolicy
from .source import redact_url
from .status import human_bytes

FAILURE_MODES = ("fail", "wait", "skip")
VERIFY_EXISTING = ("auto", "size", "sha256")
DISK_WARN_EVERY = 60.0          # seconds between two low-space warnings


def check_int(name, value, minimum, hint):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r} ({hint})")


@dataclass(frozen=True)
class WindowPolicy:
    """How many shards to keep, ahead and behind, and the hard byte budget."""
    buffer_size: int = 5                  # verified shards kept ready ahead of the slowest reader
    retain: int = 0                       # consumed shards kept behind it
    max_cache_bytes: int | None = None    # hard budget: files + partials + reservations (None = none)
    initial_buffer: int = 1               # train shards start() downloads before returning
    cycle: bool = False                   # after the last train shard, prefetch shard 0.. (next epoch)

    def __post_init__(self):
        check_int("buffer_size", self.buffer_size, 1, "keep at least one shard ahead of the reader")
        check_int("retain", self.retain, 0, "use 0 to delete consumed shards at once")
        check_int("initial_buffer", self.initial_buffer, 0, "use 0 to return from start() at once")
        if self.initial_buffer > self.buffer_size:
            raise ConfigError(f"initial_buffer={self.initial_buffer} is larger than buffer_size={self.buffer_size}: "
                              f"the window never holds more than buffer_size shards ahead")
        if self.max_cache_bytes is not None:
            if isinstance(self.max_cache_bytes, bool) or not isinstance(self.max_cache_bytes, (int, float)) \
                    or self.max_cache_bytes <= 0:
                raise ConfigError(f"max_cache_bytes must be a positive number of bytes or None (no budget), "
                                  f"got {self.max_cache_bytes!r}")
            object.__setattr__(self, "max_cache_bytes", int(self.max_cache_bytes))


@dataclass(frozen=True)
class FailurePolicy:
    """What happens when a shard the reader waits for cannot be fetched."""
    mode: str = "fail"                    # "fail": raise; "wait": keep waiting; "skip": move on without it
    deadline: float = 300.0               # seconds the reader waits on a failing shard before `mode` applies
    warn_every: float = 60.0              # a waiting reader logs a warning this often
    retry_initial: float = 1.0            # backoff between fetch calls for one shard (full jitter)...
    retry_max: float = 60.0               # ...doubling up to this

    def __post_init__(self):
        if self.mode not in FAILURE_MODES:
            raise ConfigError(f"failure policy mode must be one of {', '.join(FAILURE_MODES)}, got {self.mode!r}")
        for name in ("deadline", "warn_every", "retry_initial", "retry_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"FailurePolicy.{name} must be a number of seconds >= 0, got {v!r}")


@dataclass(frozen=True)
class DiskPolicy:
    """Free-space guard, checked before every download against the shard's known size."""
    warn_free_bytes: int = 5_000_000_000  # warn when a download would leave less than this free
    min_free_bytes: int = 1_000_000_000   # refuse to download (and tell the reader) under this
    recheck_seconds: float = 5.0          # how often a paused downloader looks again

    def __post_init__(self):
        for name in ("warn_free_bytes", "min_free_bytes", "recheck_seconds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"DiskPolicy.{name} must be a number >= 0, got {v!r}")


@dataclass(frozen=True)
class Options:
    """Everything a StreamingDownloader was configured with, besides its source, plan and data dir."""
    window: WindowPolicy
    failure: FailurePolicy
    disk: DiskPolicy
    fetch: FetchPolicy
    prefetch: PrefetchPolicy | None     # None: a fixed window of buffer_size
    workers: int
    verify_existing: str


def resolve_options(*, buffer_size=5, retain=0, max_cache_bytes=None, initial_buffer=1, window=None,
                    failure_policy="fail", deadline=None, disk_policy=None, warn_free_bytes=None,
                    min_free_bytes=None, fetch_policy=None, prefetch=None, workers=2, verify_existing="auto"):
    """The constructor's policy arguments as Options (defaults as StreamingDownloader's), or ConfigError.
    Each policy comes as a dataclass or as the seed's loose keywords, not both."""
    if window is None:
        window = WindowPolicy(buffer_size, retain, max_cache_bytes, initial_buffer)
    elif not isinstance(window, WindowPolicy):
        raise ConfigError(f"window must be a WindowPolicy, got {type(window).__name__}")
    elif (buffer_size, retain, max_cache_bytes, initial_buffer) != (5, 0, None, 1):
        raise ConfigError("give either window=WindowPolicy(...) or buffer_size/retain/max_cache_bytes/"
                          "initial_buffer, not both")
    if isinstance(failure_policy, str):
        failure_policy = FailurePolicy(failure_policy, **({} if deadline is None else {"deadline": deadline}))
    elif not isinstance(failure_policy, FailurePolicy):
        raise ConfigError(f"failure_policy must be 'fail', 'wait', 'skip' or a FailurePolicy, "
                          f"got {failure_policy!r}")
    elif deadline is not None:
        raise ConfigError("give the deadline inside FailurePolicy(...), or failure_policy as a string, not both")
    if disk_policy is None:
        kw = {k: v for k, v in (("warn_free_bytes", warn_free_bytes), ("min_free_bytes", min_free_bytes))
              if v is not None}
        disk_policy = DiskPolicy(**kw)
    elif not isinstance(disk_policy, DiskPolicy):
        raise ConfigError(f"disk_policy must be a DiskPolicy, got {type(disk_policy).__name__}")
    elif warn_free_bytes is not None or min_free_bytes is not None:
        raise ConfigError("give either disk_policy=DiskPolicy(...) or warn_free_bytes/min_free_bytes, not both")
    if prefetch == "auto":
        prefetch = PrefetchPolicy()
    elif prefetch is not None and not isinstance(prefetch, PrefetchPolicy):
        raise ConfigError(f"prefetch must be None (a fixed window of buffer_size), 'auto' or a PrefetchPolicy, "
                          f"got {prefetch!r}")
    check_int("workers", workers, 1, "parallel downloads")
    if verify_existing not in VERIFY_EXISTING:
        raise ConfigError(f"verify_existing must be 'auto', 'size' or 'sha256', got {verify_existing!r}")
    return Options(window, failure_policy, disk_policy, fetch_policy or FetchPolicy(), prefetch, workers,
                   verify_existing)


def _val_words(source):
    """'shard 9 is val', 'shards 7, 8 are val', 'no val shards' (for messages)."""
    v = source.val_shards
    if not v:
        return "no val shards"
    return f"shard {v[0]} is val" if len(v) == 1 else f"shards {', '.join(map(str, v))} are val"


def resolve_plan(source, plan, total_shards, window, start_at):
    """(read plan, train shards in one epoch, the window's start position or None) for a Source whose
    dataset is known, or ConfigError. The start: start_at's first read, else the plan's start when start()
    fills an initial buffer, else nowhere yet (None): a run resuming with initial_buffer=0 prefetches
    nothing until its reader's first request anchors the window there (schedule.reader_pos)."""
    n_train = source.num_train_shards
    if plan is None:
        if total_shards is None or total_shards == -1:
            total_shards = n_train
        check_int("total_shards", total_shards, 1, "-1 or None streams every train shard")
        if total_shards > n_train:
            raise ConfigError(f"total_shards={total_shards} but the dataset at {redact_url(source.base_url)} has "
                              f"only {n_train} train shards (0..{n_train - 1}; {_val_words(source)}): "
                              f"ask for at most {n_train}, or -1 for all")
        plan = ReadPlan.sequential(total_shards, epochs=None if window.cycle else 1)
    elif not isinstance(plan, ReadPlan):
        raise ConfigError(f"plan must be a ReadPlan (shardstream.cache), got {type(plan).__name__}")
    else:
        bad = [s for s in plan.order if s >= n_train]
        if bad:
            raise ConfigError(f"the read plan names shard {bad[0]}, but the dataset at "
                              f"{redact_url(source.base_url)} has train shards 0..{n_train - 1} only "
                              f"({_val_words(source)})")
        if total_shards not in (None, -1, plan.epoch_length):
            raise ConfigError(f"total_shards={total_shards} disagrees with the plan's {plan.epoch_length} "
                              f"shards: leave total_shards out (-1) when passing plan=")
        total_shards = plan.epoch_length
    if window.initial_buffer > total_shards:
        raise ConfigError(f"initial_buffer={window.initial_buffer} is more than total_shards={total_shards}")
    if start_at is None:
        return plan, total_shards, (0 if window.initial_buffer > 0 else None)
    if isinstance(start_at, bool) or not isinstance(start_at, int) or start_at not in plan:
        raise ConfigError(f"start_at must be a shard id of the read plan (the shard the reader asks for "
                          f"first, e.g. a resume's), got {start_at!r}")
    return plan, total_shards, plan.locate(start_at)


def budget_problem(budget, val_bytes, first_bytes, val_count=1):
    """Why `budget` cannot move the window (it must hold the val shards, `val_bytes` in all, plus two train
    shards of the first one's size), as a ConfigError message; None when it can (or there is no budget).
    val_count: how many val shards val_bytes covers (a manifest may have several, or none)."""
    if budget is None:
        return None
    need = val_bytes + 2 * first_bytes
    if budget >= need:
        return None
    vals = "" if val_count == 0 else (f"{'the val shard' if val_count == 1 else f'the {val_count} val shards'} "
                                      f"({human_bytes(val_bytes)}) plus ")
    return (f"max_cache_bytes={budget} ({human_bytes(budget)}) cannot hold {vals}two train shards "
            f"(~{human_bytes(first_bytes)} each): give at least {need} bytes, or None")


@dataclass(frozen=True)
class DiskVerdict:
    """Whether a download may start, from the free space measured just before."""
    ok: bool
    free: int
    after: int                  # free bytes once the download has landed
    warn: bool = False          # log a low-space warning now (at most every DISK_WARN_EVERY seconds)
    message: str | None = None  # not ok: the DiskSpaceError the readers get while downloads pause


def disk_check(free, need, policy, *, now, last_warn, where, what):
    """May a download of `need` more bytes start with `free` bytes free (DiskPolicy `policy`)? `where`
    names the data dir and `what` the shard in the message; `last_warn`: when the last warning was."""
    after = free - need
    if after < policy.min_free_bytes:
        msg = (f"only {free / 1e9:.2f} GB free in {where}; downloading {what} ({human_bytes(need)}) would leave "
               f"{after / 1e9:.2f} GB, under the floor of {policy.min_free_bytes / 1e9:.2f} GB: free some space, "
               f"lower max_cache_bytes or buffer_size, or lower DiskPolicy.min_free_bytes")
        return DiskVerdict(False, free, after, message=msg)
    return DiskVerdict(True, free, after, warn=after < policy.warn_free_bytes and now - last_warn >= DISK_WARN_EVERY)
