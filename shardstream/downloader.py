"""StreamingDownloader: keep a window of verified shards ahead of the reader, inside a disk budget.

    with StreamingDownloader(total_shards=20, buffer_size=5, max_cache_bytes=2e9) as dl:
        for i in range(20):
            path = dl.wait_for_shard(i)      # blocks until verified; leases it
            ...read path...
            dl.release(i)                    # consumed: deleted once beyond `retain`

The read plan (cache.ReadPlan; default train shards 0..total_shards-1, one epoch, or forever with
WindowPolicy(cycle=True); `plan=` for another order, several epochs, or one node's share) says which
shard is read when. Each reader's cursor is a plan position; the window is the next shards of the plan
after the slowest reader's position.

The window's size is `buffer_size` shards, or, with `prefetch="auto"` (or a PrefetchPolicy), what the
measured rates ask for (prefetch.py): enough that the next shard is verified before the reader needs it,
with a margin for the slow tail of recent downloads, growing after any wait, within min/max and what the
budget holds. Adaptive transfers run one at a time (the next shard gets the whole link) unless behind.

start() fetches the first `initial_buffer` train shards alone and returns as soon as they are verified
(time to first batch = one shard's download by default); then background workers fetch the nearest
needed shard first: shards a reader is waiting for, then the next two shards of the window, the val
shard (first in line once two shards came after the initial buffer; adaptive: after the shards the rates
say the reader needs), the rest of the window. A shard a
reader waits for (the val shard of the first evaluation, an evicted one) starts at once: one worker
beyond `workers` is kept for it, so it never queues behind prefetches.

A resumed run starts mid-plan. `start_at=` (a shard of the plan) puts the initial buffer and the window
there. Without it, initial_buffer=0 means nothing is prefetched until a reader's first request anchors
the window at the shard it asks for, so a resume at shard k never downloads shard 0 (nor the val shard
before it is asked for). Before a download
starts, its remote size is reserved in the budget (cache.py); when it does not fit, shards are evicted
by the plan (Belady: the one read furthest in the future first, never a leased one, the val shard, one
inside the window, or one read before the shard that needs the room), and if that is not enough the
download waits for room rather than overshoot. A shard a reader waits for outranks the window: to make
room for it, even prefetched window shards may be evicted (never leased ones, never the val shard).
With a budget, consumed shards that a later epoch reads again stay until their room is needed, so a
second epoch of a small dataset does not download everything again. Free disk space is checked against
a floor before every download.

Readers are named (`reader=`, default 0): leases are counted per reader and the window follows the
slowest one, which leaves room for several ranks per node.

Faults: fetch.py retries transient errors within one call; when a call gives up, the shard is retried
after a backoff while other shards go on. Once the reader has waited longer than `FailurePolicy.deadline`
for a failing shard (at once for a permanent failure such as a 404), the policy decides: "fail" raises
the fetch error, "wait" keeps waiting (warning every `warn_every` s), "skip" records the shard as skipped
and raises ShardSkipped so the reader moves on. A crashed worker makes the reader's next call raise.

Every shard event goes to <data_dir>/events.jsonl (each with the window's size) and refreshes
<data_dir>/status.json (see status.py; its buffer_size is the window's current size).
"""
import contextlib
import errno
import logging
import os
import random
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path

from . import schedule
from .cache import ReadPlan, ShardCache
from .errors import (ConfigError, CorruptShardError, DiskSpaceError, DownloaderCrashed, DownloaderStopped,
                     FetchCancelled, FetchError, PermanentFetchError, ShardSkipped, ShardWaitTimeout,
                     TransientFetchError)
from .fetch import FetchPolicy, fetch_shard, remote_info
from .prefetch import PrefetchController, PrefetchPolicy
from .shards import DEFAULT_DATASET, default_data_dir, shard_name
from .source import Source, redact_url
from .listing import make_source
from .status import DownloaderStatus, EventLog, human_bytes, write_status
from .verify import row_group_limits, verify_shard

logger = logging.getLogger(__name__)
P = "[StreamingDownloader]"
SHA_AUTO_LIMIT = 2 << 30        # verify_existing="auto": hash shards found on disk when they total <= 2 GiB
RATE_WINDOW = 5.0               # seconds of transfer history behind "download MB/s (recent)"


# -----------------------------------------------------------------------------
# Policies

@dataclass(frozen=True)
class WindowPolicy:
    """How many shards to keep, ahead and behind, and the hard byte budget."""
    buffer_size: int = 5                  # verified shards kept ready ahead of the slowest reader
    retain: int = 0                       # consumed shards kept behind it
    max_cache_bytes: int | None = None    # hard budget: files + partials + reservations (None = none)
    initial_buffer: int = 1               # train shards start() downloads before returning
    cycle: bool = False                   # after the last train shard, prefetch shard 0.. (next epoch)

    def __post_init__(self):
        _check_int("buffer_size", self.buffer_size, 1, "keep at least one shard ahead of the reader")
        _check_int("retain", self.retain, 0, "use 0 to delete consumed shards at once")
        _check_int("initial_buffer", self.initial_buffer, 0, "use 0 to return from start() at once")
        if self.initial_buffer > self.buffer_size:
            raise ConfigError(f"initial_buffer={self.initial_buffer} is larger than buffer_size={self.buffer_size}: "
                              f"the window never holds more than buffer_size shards ahead")
        if self.max_cache_bytes is not None:
            if isinstance(self.max_cache_bytes, bool) or not isinstance(self.max_cache_bytes, (int, float)) \
                    or self.max_cache_bytes <= 0:
                raise ConfigError(f"max_cache_bytes must be a positive number of bytes or None (no budget), "
                                  f"got {self.max_cache_bytes!r}")
            object.__setattr__(self, "max_cache_bytes", int(self.max_cache_bytes))


FAILURE_MODES = ("fail", "wait", "skip")


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


def _check_int(name, value, minimum, hint):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r} ({hint})")


@dataclass
class _Failure:
    """Why a shard is not on disk yet."""
    attempts: int = 0          # HTTP attempts in all
    rounds: int = 0            # failed fetch calls (drives the backoff)
    error: BaseException | None = None
    permanent: bool = False
    retry_at: float = 0.0      # monotonic time before which no worker retries it


# -----------------------------------------------------------------------------

class StreamingDownloader:
    """Background download of train shards 0..total_shards-1 (and the val shard), a window ahead of the
    reader, under a disk budget. Thread-safe; a context manager (start on enter, stop on exit)."""

    def __init__(self, total_shards=-1, buffer_size=5, data_dir=None, source=None, retain=0,
                 max_cache_bytes=None, workers=2, initial_buffer=1, failure_policy="fail", *,
                 window=None, disk_policy=None, fetch_policy=None, deadline=None,
                 warn_free_bytes=None, min_free_bytes=None, dataset=DEFAULT_DATASET, dataset_shards=None,
                 verify_existing="auto", progress=True, status_interval=0.5, plan=None, prefetch=None,
                 start_at=None):
        # --- policies: dataclasses, or the seed's loose keyword arguments
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
        if fetch_policy is None:
            fetch_policy = FetchPolicy()
        if prefetch == "auto":
            prefetch = PrefetchPolicy()
        elif prefetch is not None and not isinstance(prefetch, PrefetchPolicy):
            raise ConfigError(f"prefetch must be None (a fixed window of buffer_size), 'auto' or a PrefetchPolicy, "
                              f"got {prefetch!r}")
        _check_int("workers", workers, 1, "parallel downloads")
        if verify_existing not in ("auto", "size", "sha256"):
            raise ConfigError(f"verify_existing must be 'auto', 'size' or 'sha256', got {verify_existing!r}")
        self.window = window
        self.failure_policy = failure_policy
        self.disk_policy = disk_policy
        self.fetch_policy = fetch_policy
        self.workers = workers
        self.verify_existing = verify_existing
        self.progress = progress
        self.status_interval = status_interval
        self.prefetch = prefetch

        # --- source and plan
        if source is None or isinstance(source, str):
            source = make_source(source, dataset=dataset, dataset_shards=dataset_shards)
        elif not isinstance(source, Source):
            raise ConfigError(f"source must be a Source or a base URL string, got {type(source).__name__}")
        elif dataset_shards is not None and dataset_shards != source.dataset_shards:
            raise ConfigError(f"dataset_shards={dataset_shards} disagrees with the Source's "
                              f"dataset_shards={source.dataset_shards}")
        self._source = source
        n_train = source.num_train_shards
        if plan is None:
            if total_shards is None or total_shards == -1:
                total_shards = n_train
            _check_int("total_shards", total_shards, 1, "-1 or None streams every train shard")
            if total_shards > n_train:
                raise ConfigError(f"total_shards={total_shards} but the dataset at {redact_url(source.base_url)} has "
                                  f"only {n_train} train shards (0..{n_train - 1}; shard {source.val_shard} is val): "
                                  f"ask for at most {n_train}, or -1 for all")
            plan = ReadPlan.sequential(total_shards, epochs=None if window.cycle else 1)
        elif not isinstance(plan, ReadPlan):
            raise ConfigError(f"plan must be a ReadPlan (shardstream.cache), got {type(plan).__name__}")
        else:
            bad = [s for s in plan.order if s >= n_train]
            if bad:
                raise ConfigError(f"the read plan names shard {bad[0]}, but the dataset at "
                                  f"{redact_url(source.base_url)} has train shards 0..{n_train - 1} only "
                                  f"(shard {source.val_shard} is val)")
            if total_shards not in (None, -1, plan.epoch_length):
                raise ConfigError(f"total_shards={total_shards} disagrees with the plan's {plan.epoch_length} "
                                  f"shards: leave total_shards out (-1) when passing plan=")
            total_shards = plan.epoch_length
        if window.initial_buffer > total_shards:
            raise ConfigError(f"initial_buffer={window.initial_buffer} is more than total_shards={total_shards}")
        self.total_shards = total_shards
        self.plan = plan
        # Where the window starts before any reader asks (see schedule.reader_pos): start_at's first read, else the
        # plan's start when start() fills an initial buffer, else nowhere yet (None): a run resuming with
        # initial_buffer=0 prefetches nothing until its reader's first request anchors the window there.
        if start_at is not None:
            if isinstance(start_at, bool) or not isinstance(start_at, int) or start_at not in plan:
                raise ConfigError(f"start_at must be a shard id of the read plan (the shard the reader asks for "
                                  f"first, e.g. a resume's), got {start_at!r}")
            self._start_pos = plan.locate(start_at)
        else:
            self._start_pos = 0 if window.initial_buffer > 0 else None

        row_group_limits()      # a bad SHARDSTREAM_MAX_ROW_GROUP_* is a ConfigError now, not at the first verify

        # --- data dir: created and writable, or a clear error now
        self._data_dir = Path(data_dir) if data_dir is not None else default_data_dir(dataset)
        source.check_data_dir(self._data_dir)   # eviction must never delete a local source's own shards
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self._data_dir, prefix=".write-test-"):
                pass
        except OSError as e:
            raise ConfigError(f"data dir {self._data_dir} is not a writable directory ({e.strerror or e}): "
                              f"pass data_dir= (or SHARDSTREAM_DATA_DIR) pointing somewhere writable") from None

        # --- state, all guarded by self._cond
        self._cond = threading.Condition(threading.RLock())
        self.cache = ShardCache(self._data_dir, window.max_cache_bytes)
        self._stop = threading.Event()
        self._threads = []
        self._state = "created"
        self._events = None
        self._info = {}                  # shard -> RemoteInfo
        self._sizes = {}                 # shard -> its remote size (None: the source did not say)
        self._info_pending = set()       # shards whose remote_info a worker is asking for
        self._failures = {}              # shard -> _Failure
        self._troubled = {}              # shard -> (tries failed, last cause) inside its fetch call in flight
        self._skipped = {}               # shard -> reason
        self._blocked = {}               # shard -> why it is waiting for room in the budget
        self._demand = Counter()         # shard -> readers waiting for it
        self._demand_order = {}          # shard -> when the first of them started
        self._cursor = {}                # reader -> plan position of the shard it last asked for
        self._current = {}               # reader -> that shard
        self._verified = set()           # plan shards verified during this run (downloaded or reused)
        self._crash = None
        self._disk_error = None
        self._disk_retry_at = 0.0
        self._last_disk_warn = 0.0
        self._retries = self._n_failures = self._waits = 0
        self._checked = Counter()        # what vouched for each shard downloaded: "sha256", "size+footer"...
        self._wait_seconds = 0.0
        self._downloaded_bytes = 0
        self._rate = deque()             # (monotonic time, bytes)
        self._last_status_write = 0.0
        self._begun = {}                 # shard -> monotonic time its transfer began
        self._transferring = set()       # shards in flight whose bytes are arriving now (they hold the link)
        self._body_seconds = {}          # shard -> seconds its bytes took (verify and commit not counted)
        self._initial = ()               # while start() fills the initial buffer: only these are fetched
        self._last_read = {}             # reader -> (plan position, monotonic time it got the shard, bytes)
        self._ctl = None if prefetch is None else PrefetchController(prefetch, start_ahead=window.buffer_size)
        self._win = window.buffer_size   # the window's current size (fixed, or the controller's decision)
        self._win_reason = "fixed" if prefetch is None else "not measured yet"
        self._win_base = None            # what the measured rates alone ask for (adaptive)
        self._max_shard_bytes = 0        # the largest known size of a planned shard (the window's unit)
        logger.info(f"{P} Initialized StreamingDownloader: {total_shards} shards, buffer_size={window.buffer_size}"
                    f"{' (adaptive)' if prefetch is not None else ''}"
                    f", retain={window.retain}, budget="
                    f"{'none' if window.max_cache_bytes is None else human_bytes(window.max_cache_bytes)}"
                    f", workers={workers}, failure policy={failure_policy.mode}")
        logger.info(f"{P} Data directory: {self._data_dir}")

    # --- what the reader sees
    @property
    def source(self):
        return self._source

    @property
    def data_dir(self):
        return self._data_dir

    @property
    def val_shard(self):
        return self._source.val_shard

    @property
    def buffer_size(self):
        """The configured window (with prefetch=, where the adaptive window starts)."""
        return self.window.buffer_size

    def row_group_stride(self, split):
        """(rank, world) to stride a shard's row groups by, or None: the loader's own DDP rank and world
        (a node leader of partition="node" says otherwise; see reader.ShardReader)."""
        return None

    @property
    def window_size(self):
        """The window's current size: buffer_size, or what the adaptive rule decided last."""
        with self._cond:
            return self._win

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def __repr__(self):
        return (f"StreamingDownloader(total_shards={self.total_shards}, buffer_size={self.buffer_size}, "
                f"data_dir={str(self._data_dir)!r}, source={redact_url(self._source.base_url)!r}, "
                f"state={self._state!r})")

    # -------------------------------------------------------------------------
    # start / stop

    def start(self):
        """Scan the data dir, start the workers, and block until the first `initial_buffer` train shards are
        verified. Returns self. Calling it again does nothing."""
        with self._cond:
            if self._state != "created":
                if self._state in ("stopped", "crashed"):
                    raise DownloaderStopped(f"{self!r} was stopped; make a new one to start again")
                return self
            self._state = "starting"
        try:
            self._events = EventLog(self._data_dir)
            logger.info(f"{P} Starting download of {self.total_shards} shards with buffer_size={self.buffer_size}")
            with self._cond:
                self._event("start", total_shards=self.total_shards, buffer_size=self.buffer_size,
                            retain=self.window.retain, val_shard=self.val_shard)
            self._scan_existing()
            self._check_budget()
            with self._cond:
                self._initial = tuple(self._initial_targets())
                self._update_window()
            for k in range(self.workers + 1):       # the last one is free for a shard a reader waits for
                self._spawn(self._worker_loop, f"shardstream-dl-worker-{k}", k)
            self._spawn(self._status_loop, "shardstream-dl-status")
            with self._cond:
                if self._state == "starting":   # a worker may have crashed already: keep saying so
                    self._state = "running"
            self._initial_buffer()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, fn, name, *args):
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _initial_targets(self):
        return self.plan.ahead((self._start_pos or 0) - 1, self.window.initial_buffer)

    def _initial_buffer(self):
        n = self.window.initial_buffer
        if n == 0:
            return
        targets = self._initial_targets()
        which = f"shard {targets[0]}" if n == 1 else f"shards {targets[0]}-{targets[-1]}"
        logger.info(f"{P} Downloading initial buffer: {which}")
        bar = _progress_bar(n) if self.progress else None        # progress off: no bar at all
        try:                                    # (self._initial: nothing else competes for the link meanwhile)
            with contextlib.nullcontext() if bar is None else bar:
                for s in targets:
                    try:
                        self._wait(s, None, reader=None, lease=False)
                    except ShardSkipped:
                        pass
                    if bar is not None:
                        bar.update(1)
        finally:
            with self._cond:
                self._initial = ()
                self._cond.notify_all()
        logger.info(f"{P} Initial buffer ready, training can start")

    def stop(self):
        """Stop the workers (mid-transfer too: partial files stay for a later resume) and join every thread.
        A second call does nothing."""
        with self._cond:
            if self._stop.is_set():
                return
            self._stop.set()
            self._cond.notify_all()
            started = bool(self._threads)
        if started:
            logger.info(f"{P} Stopping download thread...")
        for t in self._threads:
            t.join(timeout=15)
            if t.is_alive():
                logger.error(f"{P} thread {t.name} did not stop within 15 s")
        with self._cond:
            if self._state != "crashed":
                self._state = "stopped"
            if self._events is not None:
                self._event("stopped")
                self._events.close()
        if started:
            logger.info(f"{P} Download thread stopped")

    # -------------------------------------------------------------------------
    # the reader's side

    def wait_for_shard(self, shard_id, timeout=None, *, reader=0):
        """Block until shard_id is verified on disk; lease it to `reader` and return its path.

        A shard outside the window (evicted, or never planned) is fetched on demand, before anything else.
        Raises ShardWaitTimeout after `timeout` seconds, the fetch error / ShardSkipped as the failure
        policy says, DiskSpaceError under the free-space floor, DownloaderCrashed if a worker died."""
        self._check_shard(shard_id)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout < 0):
            raise ConfigError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
        return self._wait(shard_id, timeout, reader=reader, lease=True)

    def release(self, shard_id, *, reader=0, consumed=True):
        """The reader is done with shard_id: end its lease. Once no reader holds it, it is consumed and
        deleted as soon as it falls beyond `retain` (and outside the window). consumed=False: the reader
        stopped before the shard's end (or read it only to rebuild a resume): it stays on disk for the
        read to come, going only when the budget needs its room."""
        self._check_shard(shard_id)
        with self._cond:
            self._raise_if_crashed()
            done = self.cache.release(shard_id, reader, consumed)
            if done is None:
                raise ConfigError(f"release({shard_id}): reader {reader!r} holds no lease on {shard_name(shard_id)} "
                                  f"(wait_for_shard({shard_id}) first, and release each lease once)")
            if done and consumed:
                self._event("consumed", shard_id)
            self._evict_routine()
            self._cond.notify_all()

    mark_consumed = release

    def get_status(self):
        """A DownloaderStatus snapshot (status.py)."""
        with self._cond:
            return self._status()

    # -------------------------------------------------------------------------
    # waiting

    def _check_shard(self, shard_id):
        n = self._source.dataset_shards
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < n:
            raise ConfigError(f"shard id must be an int in 0..{n - 1} (the dataset's shards), got {shard_id!r}")

    def _raise_if_crashed(self):
        if self._crash is not None:
            e = self._crash
            raise DownloaderCrashed(f"a download worker crashed: {type(e).__name__}: {e} "
                                    f"(see the traceback logged by {__name__})") from e

    def _wait(self, shard, timeout, *, reader, lease):
        t0 = time.monotonic()
        with self._cond:
            self._raise_if_crashed()
            if self._state == "created":
                raise DownloaderStopped(f"wait_for_shard({shard}): call start() (or use `with`) first")
            if self._stop.is_set():
                raise DownloaderStopped(f"wait_for_shard({shard}): the downloader was stopped")
            if reader is not None:
                self._move_reader(reader, shard, t0)
            if shard in self.cache.files:
                path = self._hand_over(shard, reader, lease)
                if path is not None:
                    return path
            if reader is not None and shard in self.plan and self._ctl is not None:
                self._ctl.on_wait()
                self._update_window()
            self._demand[shard] += 1
            self._demand_order.setdefault(shard, t0)
            self._waits += reader is not None
            self._event("wait_start", shard, reader=reader)
            logger.info(f"{P} Waiting for {shard_name(shard)}...")
            self._cond.notify_all()
            last_warn = t0
            try:
                while True:
                    self._raise_if_crashed()
                    if self._stop.is_set():
                        raise DownloaderStopped(f"the downloader was stopped while waiting for {shard_name(shard)}")
                    if shard in self.cache.files:
                        path = self._hand_over(shard, reader, lease, waited=True)
                        if path is not None:
                            return path
                    now = time.monotonic()
                    waited = now - t0
                    self._check_failure(shard, waited)
                    if timeout is not None and waited >= timeout:
                        raise ShardWaitTimeout(f"{shard_name(shard)} was not ready within {timeout:g} s "
                                               f"({self._why_not_ready(shard)})")
                    if now - last_warn >= self.failure_policy.warn_every:
                        last_warn = now
                        logger.warning(f"{P} still waiting for {shard_name(shard)} after {waited:.0f} s: "
                                       f"{self._why_not_ready(shard)}")
                    left = 0.25 if timeout is None else max(0.0, min(0.25, timeout - waited))
                    self._cond.wait(left)
            finally:
                waited = time.monotonic() - t0
                self._demand[shard] -= 1
                if self._demand[shard] <= 0:
                    del self._demand[shard]
                    self._demand_order.pop(shard, None)
                if reader is not None:
                    self._wait_seconds += waited
                self._event("wait_end", shard, reader=reader, seconds=round(waited, 4),
                            ok=shard in self.cache.files)

    def _hand_over(self, shard, reader, lease, waited=False):
        """Lease shard and return its path; None when another process sharing the data dir deleted it
        while no reader held it (it is then fetched again)."""
        if lease and not self.cache.lease(shard, reader):
            logger.info(f"{P} {shard_name(shard)} was deleted by another process sharing {self._data_dir}; "
                        f"fetching it again")
            self.cache.files.pop(shard, None)
            self.cache.consumed.pop(shard, None)
            self._event("vanished", shard)
            self._cond.notify_all()
            return None
        if reader is not None and shard in self.plan:
            pos = self._cursor.get(reader)
            self._last_read[reader] = (pos, time.monotonic(), self.cache.files.get(shard, 0))
            if self._ctl is not None:
                self._ctl.on_read(waited)
                self._update_window()
        return self.cache.path(shard)

    def _move_reader(self, reader, shard, now):
        """The reader asks for shard: move its cursor to that read in the plan (the nearest one to where it
        was: the next epoch's read for a reader moving on, an earlier one for a reader going back), and
        measure how long it took to read the shard before."""
        pos = self.plan.locate(shard, near=self._cursor.get(reader, -1))
        if pos is None:
            return
        last = self._last_read.get(reader)
        if self._ctl is not None and last is not None and last[0] is not None and pos == last[0] + 1:
            self._ctl.meter.read_done(last[2], now - last[1])
        self._cursor[reader] = pos
        self._current[reader] = shard
        self._evict_routine(keep=shard)         # it is read now: not consumed, whatever the plan says next
        self._cond.notify_all()

    def _check_failure(self, shard, waited):
        """Apply the failure policy to a shard the reader is waiting for (lock held)."""
        if shard in self._skipped:
            raise ShardSkipped(f"{shard_name(shard)} was skipped: {self._skipped[shard]}", shard_id=shard)
        if self._disk_error is not None and shard not in self.cache.inflight:
            raise DiskSpaceError(str(self._disk_error))
        if shard in self._blocked and not self.cache.inflight and waited >= self.failure_policy.deadline:
            raise DiskSpaceError(f"{shard_name(shard)} cannot be downloaded: {self._blocked[shard]}")
        verdict = schedule.failure_verdict(self._snapshot(), shard, waited, self.failure_policy)
        if verdict is None:             # "wait" keeps waiting: the reader's loop warns every warn_every s
            return
        f, mode = verdict.failure, verdict.mode
        if verdict.in_flight:
            url = redact_url(self._source.url(shard))
            f = _Failure(attempts=f.attempts, error=TransientFetchError(
                f"{shard_name(shard)} ({url}): {f.attempts} tries failed while its download was in flight, last: "
                f"{f.error}", shard_id=shard, url=url, attempts=f.attempts, cause=f.error))
        if mode == "fail":
            raise self._failure_error(shard, f)
        if mode == "skip":
            reason = f"{type(f.error).__name__} after {f.attempts} attempts: {f.error}"
            self._skipped[shard] = reason
            self._n_failures += not f.permanent     # a permanent failure was counted when recorded
            logger.error(f"{P} SKIPPING {shard_name(shard)} ({redact_url(self._source.url(shard))}): {reason}. "
                         f"Training goes on without it (failure policy 'skip').")
            self._event("skipped", shard, error=reason)
            raise ShardSkipped(f"{shard_name(shard)} was skipped: {reason}", shard_id=shard, cause=f.error)

    def _failure_error(self, shard, f):
        e = f.error
        url = redact_url(self._source.url(shard))
        msg = (f"{shard_name(shard)} could not be downloaded from {url} after {f.attempts} attempts "
               f"({'permanent' if f.permanent else f'still failing after the {self.failure_policy.deadline:g} s deadline'}); "
               f"last cause: {type(e).__name__}: {e}")
        cls = type(e) if isinstance(e, FetchError) else (PermanentFetchError if f.permanent else TransientFetchError)
        err = cls(msg, shard_id=shard, url=url, attempts=f.attempts, cause=e)
        err.__cause__ = e
        return err

    def _why_not_ready(self, shard):
        if shard in self.cache.inflight:
            r, got = self.cache.inflight[shard]
            tries, cause = self._troubled.get(shard, (0, None))
            trouble = f"; {tries} tries failed, last: {cause}" if tries else ""
            return f"downloading, {human_bytes(got)} of {human_bytes(r)}{trouble}"
        if shard in self._blocked:
            return f"waiting for room: {self._blocked[shard]}"
        f = self._failures.get(shard)
        if f is not None and f.error is not None:
            return f"{f.attempts} failed attempts, last: {type(f.error).__name__}: {f.error}"
        if self._disk_error is not None:
            return str(self._disk_error)
        return "queued behind other downloads"

    # -------------------------------------------------------------------------
    # the window

    def _snapshot(self):
        """What the scheduler (schedule.py) needs to know, lock held. Mappings are the live ones: the
        scheduler only reads them, and it runs under the same lock."""
        c = self.cache
        return schedule.Snapshot(
            plan=self.plan, val_shard=self.val_shard, cursors=self._cursor, start_pos=self._start_pos,
            initial=self._initial, initial_buffer=self.window.initial_buffer, window=self._win,
            window_base=self._win_base, adaptive=self._ctl is not None, verified=len(self._verified),
            files=c.files, partials=c.partials, inflight=c.inflight.keys(), leased=c.leased(),
            transferring=self._transferring, consumed=tuple(c.consumed), demand=tuple(sorted(self._demand, key=lambda s: self._demand_order.get(s, 0))),
            sizes=self._sizes, probing=self._info_pending, failures=self._failures, troubled=self._troubled,
            skipped=self._skipped.keys(), blocked=self._blocked.keys(), budget=c.budget, used_bytes=c.used_bytes(),
            retain=self.window.retain, parallel=self._parallel_limit(), max_shard_bytes=self._max_shard_bytes)

    def _update_window(self):
        """Adaptive prefetch: ask the controller for the window's size, within what the budget holds beside
        the val shard and the leased shards (lock held)."""
        if self._ctl is None:
            return
        w = self._ctl.window(schedule.window_room(self._snapshot()))
        self._win_base = w.base
        if w.size != self._win:
            logger.info(f"{P} Window {self._win} -> {w.size} shards ahead ({w.reason})")
            self._win, self._win_reason = w.size, w.reason
            self._event("window", size=w.size, base=w.base, bump=w.bump, room=w.room, reason=w.reason)
            self._cond.notify_all()

    def _parallel_limit(self):
        """Transfers allowed at once: every worker with a fixed window; adaptive: see prefetch.py. A shard a
        reader waits for may start one more (_pick): it starts now, not after a prefetch."""
        if self._ctl is None:
            return self.workers
        return min(self._ctl.parallel(self.workers), self.workers)

    def _evict_routine(self, keep=None):
        """Carry out schedule.routine_evictions. `keep`: a shard a reader is asking for right now."""
        for e in schedule.routine_evictions(self._snapshot(), keep):
            self._delete(e.shard, e.why)

    def _make_room(self, shard, size):
        """Evict what must go so that a download of shard (size bytes) fits the budget. False: it does not."""
        evict, room = schedule.make_room(self._snapshot(), shard, size)
        if evict is None:
            if shard not in self._blocked:
                logger.info(f"{P} {shard_name(shard)} waits for room: the budget "
                            f"({human_bytes(self.cache.budget)}) is full of shards in use or ahead")
            self._blocked[shard] = (f"budget {human_bytes(self.cache.budget)} holds "
                                    f"{human_bytes(self.cache.used_bytes())} of shards in use, pinned or ahead; "
                                    f"{shard_name(shard)} needs {human_bytes(size)} more (release shards, or raise "
                                    f"max_cache_bytes)")
            return False
        for e in evict:
            self._delete(e.shard, e.why)
        if self.cache.budget is not None and not self.cache.fits(room):    # another process's reader
            self._blocked[shard] = (f"the room {shard_name(shard)} needs is held by readers in another process "
                                    f"sharing {self._data_dir}")
            return False
        self._blocked.pop(shard, None)
        return True

    def _delete(self, shard, reason):
        freed = self.cache.delete(shard)
        if freed is None:
            logger.debug(f"{P} Kept {shard_name(shard)}: a reader in another process holds it")
            return
        logger.info(f"{P} Deleted {shard_name(shard)} ({reason}, {human_bytes(freed)} freed)")
        self._event("evicted", shard, reason=reason, freed=freed)

    # -------------------------------------------------------------------------
    # workers

    def _worker_loop(self, k):
        import requests
        session = requests.Session()
        try:
            while True:
                job = self._next_job()
                if job is None:
                    return
                kind, shard = job
                if kind == "info":
                    self._get_info(shard, session)
                else:
                    self._download(shard, session)
        except BaseException as e:
            logger.exception(f"{P} download worker {k} crashed")
            with self._cond:
                if self._crash is None:
                    self._crash = e
                self._state = "crashed"
                self._event("crashed", error=f"{type(e).__name__}: {e}")
                self._cond.notify_all()
        finally:
            session.close()

    def _next_job(self):
        """Block until there is something to do: ("info", shard), ("fetch", shard) or None to stop."""
        with self._cond:
            while not self._stop.is_set() and self._crash is None:
                now = time.monotonic()
                job = self._pick(now)
                if job is None:
                    self._cond.wait(0.25)
                    continue
                kind, shard = job
                if kind == "info":
                    self._info_pending.add(shard)
                    return job
                size = schedule.fetch_size(self._snapshot(), shard)
                if not self._disk_ok(shard, size, now) or not self._make_room(shard, size):
                    self._cond.wait(0.25)
                    continue
                self.cache.begin(shard, size)
                self._begun[shard] = now
                self._link(shard, True, now)
                self._event("download_start", shard, size=size)
                return job
        return None

    def _pick(self, now):
        """schedule.next_action as a job: ("info", shard) to ask its size first, or ("fetch", shard)."""
        if now < self._disk_retry_at:
            return None
        action = schedule.next_action(self._snapshot(), now)
        if action is None:
            return None
        return ("info" if action.kind is schedule.JobKind.PROBE else "fetch"), action.shard

    def _disk_ok(self, shard, size, now):
        dp = self.disk_policy
        need = max(0, size - self.cache.partials.get(shard, 0))
        free = self.cache.free_bytes()
        after = free - need
        if after < dp.min_free_bytes:
            msg = (f"only {free / 1e9:.2f} GB free in {self._data_dir}; downloading {shard_name(shard)} "
                   f"({human_bytes(need)}) would leave {after / 1e9:.2f} GB, under the floor of "
                   f"{dp.min_free_bytes / 1e9:.2f} GB: free some space, lower max_cache_bytes or buffer_size, "
                   f"or lower DiskPolicy.min_free_bytes")
            if self._disk_error is None:
                logger.error(f"{P} Downloads paused: {msg}")
                self._event("disk_low", shard, free=free, floor=dp.min_free_bytes)
            self._disk_error = DiskSpaceError(msg)
            self._disk_retry_at = now + dp.recheck_seconds
            self._cond.notify_all()
            return False
        if self._disk_error is not None:
            logger.info(f"{P} Free space is back above the floor ({free / 1e9:.2f} GB): downloads resume")
            self._disk_error = None
        if after < dp.warn_free_bytes and now - self._last_disk_warn >= 60:
            self._last_disk_warn = now
            logger.warning(f"{P} Low disk space: {free / 1e9:.2f} GB free in {self._data_dir} "
                           f"(warning under {dp.warn_free_bytes / 1e9:.2f} GB)")
        return True

    def _get_info(self, shard, session):
        try:
            info = remote_info(self._source, shard, self.fetch_policy, session=session, stop=self._stop)
        except FetchCancelled:
            with self._cond:
                self._info_pending.discard(shard)
            return
        except FetchError as e:
            with self._cond:
                self._info_pending.discard(shard)
                self._record_failure(shard, e)
            return
        with self._cond:
            self._info_pending.discard(shard)
            self._note_info(shard, info)
            self._cond.notify_all()

    def _note_info(self, shard, info):
        self._info[shard] = info
        self._sizes[shard] = info.size
        if shard in self.plan and info.size and info.size > self._max_shard_bytes:
            self._max_shard_bytes = info.size
            self._update_window()

    def _link(self, shard, busy, now):
        """A transfer of shard starts or stops holding the link (lock held): its bytes arrive, or it
        verifies, commits or backs off (then the next transfer may start)."""
        if busy == (shard in self._transferring):
            return
        if busy:
            self._transferring.add(shard)
        else:
            self._transferring.discard(shard)
            began = self._begun.get(shard)
            if began is not None:
                self._body_seconds[shard] = now - began
        if self._ctl is not None:
            (self._ctl.meter.transfer_started if busy else self._ctl.meter.transfer_ended)(now)
        self._cond.notify_all()

    def _on_link(self, shard, busy):
        with self._cond:
            self._link(shard, busy, time.monotonic())

    def _transfer_over(self, shard, nbytes=0):
        """A transfer ended (lock held): measure it when it brought bytes, for the adaptive window."""
        self._troubled.pop(shard, None)
        now = time.monotonic()
        self._link(shard, False, now)
        began = self._begun.pop(shard, None)
        seconds = self._body_seconds.pop(shard, None)
        if self._ctl is not None and nbytes and began is not None:
            self._ctl.meter.download_done(nbytes, seconds if seconds is not None else now - began, now)
            self._update_window()

    def _download(self, shard, session):
        name = shard_name(shard)
        logger.info(f"{P} Downloading {name}...")
        info = self._info[shard]
        try:
            res = fetch_shard(self._source, shard, self._data_dir, self.fetch_policy, session=session,
                              stop=self._stop, on_bytes=lambda n: self._on_bytes(shard, n), info=info,
                              on_retry=lambda cause: self._on_retry(shard, cause),
                              on_link=lambda busy: self._on_link(shard, busy))
        except FetchCancelled:
            with self._cond:
                self.cache.abandon(shard)
                self._transfer_over(shard)
                self._event("cancelled", shard)
            return
        except (FetchError, CorruptShardError) as e:
            with self._cond:
                self.cache.abandon(shard)
                self._transfer_over(shard)
                self._record_failure(shard, e)
            return
        except (DiskSpaceError, OSError) as e:
            if not isinstance(e, DiskSpaceError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
                with self._cond:
                    self.cache.abandon(shard)
                    self._transfer_over(shard)
                raise
            with self._cond:
                self.cache.abandon(shard)
                self._transfer_over(shard)
                self._disk_error = DiskSpaceError(f"the disk of {self._data_dir} is full (while downloading "
                                                  f"{name}: {e}): free some space or lower max_cache_bytes")
                self._disk_retry_at = time.monotonic() + self.disk_policy.recheck_seconds
                logger.error(f"{P} {self._disk_error}")
                self._event("disk_full", shard, error=str(e))
                self._cond.notify_all()
            return
        with self._cond:
            self.cache.finish(shard, res.size)
            self._retries += max(0, res.attempts - 1)  # fetch_shard retried (resumed) within the call
            self._transfer_over(shard, 0 if res.already_present else res.bytes_downloaded)
            self._failures.pop(shard, None)
            if shard in self.plan:
                self._verified.add(shard)
            where = f"[{len(self._verified)}/{self.total_shards}]" if shard in self.plan else "[val]" \
                if shard == self.val_shard else "[on demand]"
            logger.info(f"{P} Downloaded {name} ({human_bytes(res.size)}) {where}")
            self._event("downloaded", shard, size=res.size, seconds=round(res.seconds, 4),
                        attempts=res.attempts, resumed_from=res.resumed_from, checked=res.checked)
            if res.checked is not None:
                self._checked[res.checked] += 1
            self._evict_routine()
            self._cond.notify_all()

    def _on_retry(self, shard, cause):
        with self._cond:
            tries = self._troubled.get(shard, (0, None))[0] + 1
            self._troubled[shard] = (tries, cause)
            self._cond.notify_all()

    def _on_bytes(self, shard, n):
        with self._cond:
            self.cache.progress(shard, n)
            self._downloaded_bytes += n
            if self._ctl is not None:
                self._ctl.meter.add_bytes(n)
            now = time.monotonic()
            self._rate.append((now, n))
            while self._rate and self._rate[0][0] < now - RATE_WINDOW:
                self._rate.popleft()

    def _record_failure(self, shard, e):
        f = self._failures.setdefault(shard, _Failure())
        tried = max(1, getattr(e, "attempts", 0) or 1)
        f.attempts += tried
        self._retries += tried - 1                  # the call's own retries; the call's retry is counted below
        f.rounds += 1
        f.error = e
        f.permanent = isinstance(e, PermanentFetchError)
        fp = self.failure_policy
        if f.permanent and fp.mode != "wait":
            f.retry_at = float("inf")
            self._n_failures += 1
            logger.error(f"{P} {shard_name(shard)} failed permanently: {e}")
            self._event("failed", shard, error=f"{type(e).__name__}: {e}", attempts=f.attempts)
        else:
            cap = schedule.backoff_cap(fp, f)
            delay = random.uniform(cap / 2, cap)
            f.retry_at = time.monotonic() + delay
            self._retries += 1
            logger.warning(f"{P} {shard_name(shard)} failed ({type(e).__name__}: {e}); retrying in {delay:.1f} s")
            self._event("retry", shard, error=f"{type(e).__name__}: {e}", attempts=f.attempts,
                        delay=round(delay, 3))
        self._cond.notify_all()

    # -------------------------------------------------------------------------
    # scanning what is already there

    def _scan_existing(self):
        finals, partials = self.cache.scan()
        wanted = set(self.plan.order) | {self.val_shard}
        do_sha = self.verify_existing == "sha256" or (
            self.verify_existing == "auto" and sum(finals.values()) <= SHA_AUTO_LIMIT)

        quick = replace(self.fetch_policy, max_attempts=2)     # one retry; a dead source must not stall start()
        unreachable = threading.Event()

        def check(shard):
            info = None
            if shard in wanted and not unreachable.is_set():
                try:
                    info = remote_info(self._source, shard, quick, stop=self._stop)
                except FetchError as e:
                    if not isinstance(e, PermanentFetchError):
                        unreachable.set()
                    logger.warning(f"{P} cannot ask the source about {shard_name(shard)} ({e}); "
                                   f"checking parquet footers only")
            path = self.cache.path(shard)
            try:
                verify_shard(path, size=info.size if info else None,
                             sha256=info.sha256 if (info and do_sha) else None)
            except CorruptShardError as e:
                return shard, info, e
            return shard, info, None

        results = []
        if finals:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(max_workers=max(2, self.workers), thread_name_prefix="shardstream-scan") as ex:
                results = list(ex.map(check, sorted(finals)))
        with self._cond:
            for shard, info, err in results:
                if info is not None:
                    self._note_info(shard, info)
                if err is not None:
                    logger.warning(f"{P} Removing corrupt {shard_name(shard)}: {err}")
                    try:
                        os.remove(self.cache.path(shard))
                    except FileNotFoundError:
                        pass
                    self._event("corrupt_removed", shard, error=str(err))
                    continue
                self.cache.files[shard] = finals[shard]
                if shard in self.plan:
                    self._verified.add(shard)
            self.cache.partials = dict(partials)
            found = sorted(self.cache.files)
            logger.info(f"{P} Found {len(found)} shards already downloaded"
                        + (f" ({len(partials)} partial downloads to resume)" if partials else ""))
            self._event("scan", found=found, partials=sorted(partials))
            evict = schedule.over_budget_evictions(self._snapshot())
            if evict:
                logger.warning(f"{P} The data dir holds {human_bytes(self.cache.used_bytes())} of shards, over the "
                               f"budget of {human_bytes(self.cache.budget)}: deleting {len(evict)} not needed soon")
                for e in evict:
                    self._delete(e.shard, e.why)

    def _check_budget(self):
        """A budget must hold the val shard plus two train shards, or the window cannot move."""
        budget = self.cache.budget
        if budget is None:
            return
        sizes = {}
        first = self.plan.at(max(0, schedule.reader_pos(self._snapshot()) + 1))
        for s in (first, self.val_shard):
            info = self._info.get(s)
            if info is None:
                info = remote_info(self._source, s, self.fetch_policy, stop=self._stop)
                with self._cond:
                    self._note_info(s, info)
            sizes[s] = info.size or 0
        need = sizes[self.val_shard] + 2 * sizes[first]
        if budget < need:
            raise ConfigError(f"max_cache_bytes={budget} ({human_bytes(budget)}) cannot hold the val shard "
                              f"({human_bytes(sizes[self.val_shard])}) plus two train shards "
                              f"(~{human_bytes(sizes[first])} each): give at least {need} bytes, or None")

    # -------------------------------------------------------------------------
    # status and events

    def _status(self):
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if t >= now - RATE_WINDOW]
        mbps = 0.0
        if recent:
            span = max(now - recent[0][0], 0.5)
            mbps = sum(n for _, n in recent) / span / 1e6
        try:
            free = self.cache.free_bytes()
        except OSError:
            free = None
        snap = self._snapshot()
        win = schedule.ahead(snap)
        err = self._crash or self._disk_error
        return DownloaderStatus(
            state=self._state, shards_verified=len(self._verified), total_shards=self.total_shards,
            ahead=sum(1 for s in win if s in self.cache.files), buffer_size=self._win,
            current_shard=schedule.reader_shard(snap), bytes_on_disk=self.cache.disk_bytes(),
            reserved_bytes=self.cache.reserved_bytes(), budget=self.cache.budget, free_disk_bytes=free,
            download_mbps=round(mbps, 3), downloaded_bytes=self._downloaded_bytes,
            in_flight=tuple(sorted(self.cache.inflight)), cached=tuple(sorted(self.cache.files)),
            retries=self._retries, failures=self._n_failures, skipped=tuple(sorted(self._skipped)),
            waits=self._waits, wait_seconds=round(self._wait_seconds, 4), checked=dict(self._checked),
            error=None if err is None else f"{type(err).__name__}: {err}", val_shard=self.val_shard,
            data_dir=str(self._data_dir), source=redact_url(self._source.base_url), pid=os.getpid(),
            host=_hostname(), updated=time.time())

    def _event(self, event, shard=None, **extra):
        """Log one event to events.jsonl and refresh status.json (lock held)."""
        if self._events is None:
            return
        snap = self._snapshot()
        win = schedule.ahead(snap)
        self._events.write(event, shard=shard, bytes_on_disk=self.cache.disk_bytes(), budget=self.cache.budget,
                           ahead=sum(1 for s in win if s in self.cache.files), reader_shard=schedule.reader_shard(snap),
                           **{"window": self._win, **extra})
        self._write_status()

    def _write_status(self):
        try:
            write_status(self._data_dir, self._status())
            self._last_status_write = time.monotonic()
        except (OSError, ConfigError) as e:     # (UnsafePathError: a planted file) never crashes a run
            logger.debug(f"{P} could not write status.json: {e}")

    def _status_loop(self):
        while not self._stop.wait(self.status_interval):
            with self._cond:
                if time.monotonic() - self._last_status_write >= self.status_interval:
                    self._write_status()


def _progress_bar(total):
    """The initial buffer's tqdm bar, without tqdm's monitor thread: tqdm starts that thread for the first
    bar of the process and never ends it, so it would outlive stop(). Our bar is updated once a shard and
    closed with the block, so it needs no monitor; the subclass leaves the process-wide tqdm setting alone."""
    from tqdm import tqdm

    class _Bar(tqdm):
        monitor_interval = 0

    return _Bar(total=total, unit="shard", desc="initial buffer", leave=False)


_HOST = None


def _hostname():
    global _HOST
    if _HOST is None:
        import socket
        _HOST = socket.gethostname()
    return _HOST
