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

Any parquet corpus (issue 15): `source="hf://datasets/ORG/NAME", files="sample/10BT/*.parquet"` (globs),
`val_files=` (a glob, or "none"), `manifest=` (a file listing the paths) go to listing.make_source, which
pins the run's manifest; `text_column=` names the column the shards' text is in (checked by every
verification; the loader reads it). Shard i is then the manifest's file i, stored under its cache name
(source.file_name(i): the index and a digest of its path, never the path), and every file the data dir
holds for it follows that name (partials, locks, leases); logs and events name the source path beside
it. The val shards are `val_shards` (all of them, in order, fetched early and kept, counted in the
budget; none with val_files="none"). nanochat's layout (shard_XXXXX.parquet) is unchanged.

Faults: fetch.py retries transient errors within one call; when a call gives up, the shard is retried
after a backoff while other shards go on. Once the reader has waited longer than `FailurePolicy.deadline`
for a failing shard (at once for a permanent failure such as a 404), the policy decides: "fail" raises
the fetch error, "wait" keeps waiting (warning every `warn_every` s), "skip" records the shard as skipped
and raises ShardSkipped so the reader moves on. A crashed worker makes the reader's next call raise.

Every shard event goes to <data_dir>/.shardstream/events.jsonl (each with the window's size) and
refreshes status.json there (see status.py; its buffer_size is the window's current size). Both are
written by the status thread: events queue under the lock and are written outside it, in order, each
with the time it happened.

This module is the executor; the decisions are pure functions elsewhere: schedule.py (what to fetch,
probe, evict; transfer_limit), prefetch.py (the adaptive window), policies.py (the arguments, the budget
and free-space checks), failures.py (failed fetches and what a waiting reader gets), report.py (the
status and event records), existing.py (what a data dir holds at start); statuswriter.py writes the
status files on the status thread.
"""
import contextlib
import errno
import logging
import os
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from . import failures, layout, report, schedule
from .cache import ShardCache
from .errors import (ConfigError, CorruptShardError, DiskSpaceError, DownloaderCrashed, DownloaderStopped,
                     FetchCancelled, FetchError, ShardSkipped, ShardWaitTimeout)
from .existing import SHA_AUTO_LIMIT, scan_existing  # noqa: F401  (SHA_AUTO_LIMIT: re-exported)
from .fetch import remote_info
from .fetchproc import FetchHelper, run_fetch
from .listing import make_source, pin_when_reachable
from .policies import (FAILURE_MODES, DiskPolicy, FailurePolicy, WindowPolicy,  # noqa: F401  (re-exported)
                       budget_problem, disk_check, resolve_options, resolve_plan)
from .prefetch import LinkClock, PrefetchController
from .report import RATE_WINDOW  # noqa: F401  (re-exported)
from .shards import DEFAULT_DATASET, default_data_dir
from .source import Source, redact_url
from .status import human_bytes
from .statuswriter import StatusWriter

logger = logging.getLogger(__name__)
P = "[StreamingDownloader]"


class StreamingDownloader:
    """Background download of train shards 0..total_shards-1 (and the val shard), a window ahead of the
    reader, under a disk budget. Thread-safe; a context manager (start on enter, stop on exit).

    Threads: `workers` + 1 workers (each runs one probe or one fetch at a time; the last is kept for a
    shard a reader waits for), one status thread, and the readers' own. One lock (`_cond`) guards the
    bookkeeping, and schedule.py decides under it on a Snapshot. It is never held across a fetch or a
    HEAD, a hash or verification, the free-space statvfs (measured just before taking it: _next_job,
    get_status), a scan of partial files (_download_failed), or a write of status.json / events.jsonl
    (records queue in `_outbox`; the status thread writes them). The only file operations under it are
    the cache's own on one shard, which must be atomic with the bookkeeping: a lease's flock (lease,
    release) and an eviction's unlink (delete), so no reader is handed a file being deleted."""

    def __init__(self, total_shards=-1, buffer_size=5, data_dir=None, source=None, retain=0,
                 max_cache_bytes=None, workers=2, initial_buffer=1, failure_policy="fail", *,
                 window=None, disk_policy=None, fetch_policy=None, deadline=None,
                 warn_free_bytes=None, min_free_bytes=None, dataset=DEFAULT_DATASET, dataset_shards=None,
                 verify_existing="auto", progress=True, status_interval=0.5, plan=None, prefetch=None,
                 start_at=None, files=None, val_files=None, manifest=None, text_column="text"):
        opts = resolve_options(buffer_size=buffer_size, retain=retain, max_cache_bytes=max_cache_bytes,
                               initial_buffer=initial_buffer, window=window, failure_policy=failure_policy,
                               deadline=deadline, disk_policy=disk_policy, warn_free_bytes=warn_free_bytes,
                               min_free_bytes=min_free_bytes, fetch_policy=fetch_policy, prefetch=prefetch,
                               workers=workers, verify_existing=verify_existing)
        self.window, self.failure_policy, self.disk_policy = opts.window, opts.failure, opts.disk
        self.fetch_policy, self.prefetch, self.workers = opts.fetch, opts.prefetch, opts.workers
        self.verify_existing, self.progress, self.status_interval = opts.verify_existing, progress, status_interval
        self._text_column = _check_text_column(text_column)
        self.fetch_policy = _with_text_column(self.fetch_policy, self._text_column)
        self._source = _resolve_source(source, dataset, dataset_shards, files, val_files, manifest)
        self._labelled = any(self._source.path(i) != self._source.file_name(i)
                             for i in range(self._source.dataset_shards))
        self.plan, self.total_shards, self._start_pos = resolve_plan(self._source, plan, total_shards,
                                                                     self.window, start_at)
        self._data_dir = _writable_data_dir(data_dir, dataset, self._source)
        self._init_state()
        w = self.window
        logger.info(f"{P} Initialized StreamingDownloader: {self.total_shards} shards, buffer_size={w.buffer_size}"
                    f"{' (adaptive)' if self.prefetch is not None else ''}, retain={w.retain}, budget="
                    f"{'none' if w.max_cache_bytes is None else human_bytes(w.max_cache_bytes)}"
                    f", workers={self.workers}, failure policy={self.failure_policy.mode}")
        logger.info(f"{P} Data directory: {self._data_dir}")

    def _init_state(self):
        """The bookkeeping, all guarded by self._cond."""
        self._cond = threading.Condition(threading.RLock())
        self.cache = ShardCache(self._data_dir, self.window.max_cache_bytes, layout.Naming.of(self._source))
        self._stop = threading.Event()
        self._threads = []
        self._helper = FetchHelper()     # the process big transfers run in (fetchproc.use_helper), on first need
        self._state = "created"
        self._status = StatusWriter(self._data_dir, self._locked_progress, self._status_of, self.status_interval)
        self._origin = report.Origin(self.total_shards, self.val_shard, str(self._data_dir),
                                     redact_url(self._source.base_url), os.getpid(), _hostname(),
                                     val_shards=self._val_list(),
                                     label=self._label if self._labelled else None)
        self._counts = report.Counts()
        self._info = {}                  # shard -> RemoteInfo
        self._sizes = {}                 # shard -> its remote size (None: the source did not say)
        self._info_pending = set()       # shards whose remote_info a worker is asking for
        self._failures = {}              # shard -> schedule.Failure (failures.record)
        self._troubled = {}              # shard -> (tries failed, last cause) inside its fetch call in flight
        self._skipped = {}               # shard -> reason
        self._blocked = {}               # shard -> why it is waiting for room in the budget
        self._demand = Counter()         # shard -> readers waiting for it
        self._demand_order = {}          # shard -> when the first of them started
        self._cursor = {}                # reader -> plan position of the shard it last asked for
        self._verified = set()           # plan shards verified during this run (downloaded or reused)
        self._crash = None
        self._disk_error = None
        self._disk_retry_at = 0.0
        self._last_disk_warn = 0.0
        self._initial = ()               # while start() fills the initial buffer: only these are fetched
        self._last_read = {}             # reader -> (plan position, monotonic time it got the shard, bytes)
        self._ctl = None if self.prefetch is None else PrefetchController(self.prefetch,
                                                                          start_ahead=self.window.buffer_size)
        self._clock = LinkClock(None if self._ctl is None else self._ctl.meter)   # transfers on the link
        self._win = self.window.buffer_size   # the window's current size (fixed, or the controller's decision)
        self._win_base = None            # what the measured rates alone ask for (adaptive)
        self._max_shard_bytes = 0        # the largest known size of a planned shard (the window's unit)

    # --- what the reader sees
    @property
    def source(self):
        return self._source

    @property
    def data_dir(self):
        return self._data_dir

    @property
    def val_shard(self):
        """The first val shard, None when there is none (val_files="none")."""
        return self._source.val_shard

    @property
    def val_shards(self):
        """Every val shard id, in order: the dataset's last shard (nanochat's), a manifest's val files, or ()."""
        return tuple(self._source.val_shards)

    @property
    def text_column(self):
        """The parquet column the shards' text is in ("text" unless text_column= said otherwise)."""
        return self._text_column

    def _val_list(self):
        """val_shards for the scheduler and the status: None for nanochat's one val shard (so both stay as
        they always were), else the tuple."""
        v = self.val_shards
        return None if self._source.manifest is None and v == (self.val_shard,) else v

    def _label(self, shard):
        """How logs name a shard: shard_XXXXX.parquet, or a manifest file's source path and cache name."""
        return layout.shard_label(self._source, shard)

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
            # the default source (the Hub at a branch) is read at one commit: resolved here, where fetching
            # starts, so a downloader that is only made sends nothing
            self._source = pin_when_reachable(self._source)
            self._status.open()
            logger.info(f"{P} Starting download of {self.total_shards} shards with buffer_size={self.buffer_size}")
            with self._cond:
                extra = {} if self._val_list() is None else {"val_shards": list(self.val_shards)}
                self._event("start", total_shards=self.total_shards, buffer_size=self.buffer_size,
                            retain=self.window.retain, val_shard=self.val_shard, **extra)
            self._adopt(scan_existing(self.cache, self._source, set(self.plan.order) | set(self.val_shards),
                                      self.verify_existing, self.fetch_policy, self._stop, self.workers,
                                      text_column=self._text_column))
            self._check_budget()
            with self._cond:
                self._initial = tuple(self._initial_targets())
                self._update_window()
            for k in range(self.workers + 1):       # the last one is free for a shard a reader waits for
                self._spawn(self._worker_loop, f"shardstream-dl-worker-{k}", k)
            self._spawn(self._status.run, "shardstream-dl-status", self._stop)
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

    def _adopt(self, found):
        """Take what existing.scan_existing found on disk into the bookkeeping; delete what the budget
        cannot hold (shards not needed soon)."""
        with self._cond:
            for shard in sorted(set(found.files) | set(found.corrupt)):
                if shard in found.infos:
                    self._note_info(shard, found.infos[shard])
                if shard in found.corrupt:
                    self._event("corrupt_removed", shard, error=found.corrupt[shard])
                    continue
                self.cache.files[shard] = found.files[shard]
                if shard in self.plan:
                    self._verified.add(shard)
            self.cache.partials = dict(found.partials)
            if found.foreign:
                names = sorted(found.foreign)
                logger.warning(f"{P} {len(names)} shard file(s) in {self._data_dir} belong to another file set "
                               f"(another manifest, --files or revision), e.g. {', '.join(names[:3])} "
                               f"({human_bytes(sum(found.foreign.values()))}): not read and not deleted, nor "
                               f"counted in the budget; remove them to free the space if no other run uses them")
            logger.info(f"{P} Found {len(self.cache.files)} shards already downloaded"
                        + (f" ({len(found.partials)} partial downloads to resume)" if found.partials else ""))
            self._event("scan", found=sorted(self.cache.files), partials=sorted(found.partials))
            evict = schedule.over_budget_evictions(self._snapshot())
            if evict:
                logger.warning(f"{P} The data dir holds {human_bytes(self.cache.used_bytes())} of shards, over the "
                               f"budget of {human_bytes(self.cache.budget)}: deleting {len(evict)} not needed soon")
                for e in evict:
                    self._delete(e.shard, e.why)

    def _check_budget(self):
        """A budget must hold the val shards plus two train shards, or the window cannot move (the sizes are
        asked with the lock released)."""
        if self.cache.budget is None:
            return
        vals = self.val_shards
        with self._cond:
            first = self.plan.at(max(0, schedule.reader_pos(self._snapshot()) + 1))
            infos = {s: self._info.get(s) for s in (first, *vals)}
        for s, info in infos.items():
            if info is None:
                infos[s] = info = remote_info(self._source, s, self.fetch_policy, stop=self._stop)
                with self._cond:
                    self._note_info(s, info)
        problem = budget_problem(self.cache.budget, sum(infos[v].size or 0 for v in vals), infos[first].size or 0,
                                 len(vals))
        if problem is not None:
            raise ConfigError(problem)

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
        """Stop the workers (mid-transfer too: partial files stay for a later resume) and join every thread;
        then write the last events and status.json. A second call does nothing."""
        with self._cond:
            if self._stop.is_set():
                return
            self._stop.set()
            self._status.wake()
            self._cond.notify_all()
            started = bool(self._threads)
        if started:
            logger.info(f"{P} Stopping download thread...")
        for t in self._threads:
            t.join(timeout=15)
            if t.is_alive():
                logger.error(f"{P} thread {t.name} did not stop within 15 s")
        self._helper.close()
        with self._cond:
            if self._state != "crashed":
                self._state = "stopped"
            self._event("stopped")
        self._status.close()
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
                raise ConfigError(f"release({shard_id}): reader {reader!r} holds no lease on {self._label(shard_id)} "
                                  f"(wait_for_shard({shard_id}) first, and release each lease once)")
            if done and consumed:
                self._event("consumed", shard_id)
            self._evict_routine()
            self._cond.notify_all()

    mark_consumed = release

    def get_status(self):
        """A DownloaderStatus snapshot (status.py); the free disk space is measured outside the lock."""
        return self._status_of(self._locked_progress())

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
            self._counts.waits += reader is not None
            self._event("wait_start", shard, reader=reader)
            logger.info(f"{P} Waiting for {self._label(shard)}...")
            self._cond.notify_all()
            try:
                return self._wait_loop(shard, timeout, reader, lease, t0)
            finally:
                waited = time.monotonic() - t0
                self._demand[shard] -= 1
                if self._demand[shard] <= 0:
                    del self._demand[shard]
                    self._demand_order.pop(shard, None)
                if reader is not None:
                    self._counts.wait_seconds += waited
                self._event("wait_end", shard, reader=reader, seconds=round(waited, 4),
                            ok=shard in self.cache.files)

    def _wait_loop(self, shard, timeout, reader, lease, t0):
        """_wait's loop (lock held): until shard is handed over, the failure policy or the timeout raises."""
        last_warn = t0
        while True:
            self._raise_if_crashed()
            if self._stop.is_set():
                raise DownloaderStopped(f"the downloader was stopped while waiting for {self._label(shard)}")
            if shard in self.cache.files:
                path = self._hand_over(shard, reader, lease, waited=True)
                if path is not None:
                    return path
            now = time.monotonic()
            waited = now - t0
            self._check_failure(shard, waited)
            if timeout is not None and waited >= timeout:
                raise ShardWaitTimeout(f"{self._label(shard)} was not ready within {timeout:g} s "
                                       f"({self._why_not_ready(shard)})")
            if now - last_warn >= self.failure_policy.warn_every:
                last_warn = now
                logger.warning(f"{P} still waiting for {self._label(shard)} after {waited:.0f} s: "
                               f"{self._why_not_ready(shard)}")
            self._cond.wait(0.25 if timeout is None else max(0.0, min(0.25, timeout - waited)))

    def _hand_over(self, shard, reader, lease, waited=False):
        """Lease shard and return its path; None when another process sharing the data dir deleted it
        while no reader held it (it is then fetched again)."""
        if lease and not self.cache.lease(shard, reader):
            logger.info(f"{P} {self._label(shard)} was deleted by another process sharing {self._data_dir}; "
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
        self._evict_routine(keep=shard)         # it is read now: not consumed, whatever the plan says next
        self._cond.notify_all()

    def _check_failure(self, shard, waited):
        """Apply the failure policy to a shard a reader is waiting for (lock held): failures.reader_outcome."""
        out = failures.reader_outcome(self._snapshot(), shard, waited, self.failure_policy, skipped=self._skipped,
                                      blocked=self._blocked, disk_error=self._disk_error,
                                      url=redact_url(self._source.url(shard)))
        if out is None:
            return
        if out.kind is failures.Outcome.SKIP:
            self._skipped[shard] = out.reason
            self._counts.failures += out.counts
            logger.error(f"{P} SKIPPING {self._label(shard)} ({redact_url(self._source.url(shard))}): {out.reason}. "
                         f"Training goes on without it (failure policy 'skip').")
            self._event("skipped", shard, error=out.reason)
        raise out.error

    def _why_not_ready(self, shard):
        return failures.why_not_ready(shard, inflight=self.cache.inflight, troubled=self._troubled,
                                      blocked=self._blocked, failures=self._failures, disk_error=self._disk_error)

    # -------------------------------------------------------------------------
    # the window

    def _snapshot(self):
        """What the scheduler (schedule.py) needs to know, lock held. Mappings are the live ones: the
        scheduler only reads them, and it runs under the same lock."""
        c = self.cache
        snap = schedule.Snapshot(
            plan=self.plan, val_shard=self.val_shard, val_shards=self._val_list(), cursors=self._cursor, start_pos=self._start_pos,
            initial=self._initial, initial_buffer=self.window.initial_buffer, window=self._win,
            window_base=self._win_base, adaptive=self._ctl is not None, verified=len(self._verified),
            files=c.files, partials=c.partials, inflight=c.inflight.keys(), leased=c.leased(),
            transferring=self._clock.transferring, consumed=tuple(c.consumed),
            demand=tuple(sorted(self._demand, key=lambda s: self._demand_order.get(s, 0))),
            sizes=self._sizes, probing=self._info_pending, failures=self._failures, troubled=self._troubled,
            skipped=self._skipped.keys(), blocked=self._blocked.keys(), budget=c.budget, used_bytes=c.used_bytes(),
            retain=self.window.retain, parallel=self.workers, max_shard_bytes=self._max_shard_bytes)
        if self._ctl is None:                   # a fixed window: every worker
            return snap
        return replace(snap, parallel=schedule.transfer_limit(snap, self._ctl.rates(), self.workers))

    def _update_window(self):
        """Adaptive prefetch: ask the controller for the window's size, within what the budget holds beside
        the val shard and the leased shards (lock held)."""
        if self._ctl is None:
            return
        w = self._ctl.window(schedule.window_room(self._snapshot()))
        self._win_base = w.base
        if w.size != self._win:
            logger.info(f"{P} Window {self._win} -> {w.size} shards ahead ({w.reason})")
            self._win = w.size
            self._event("window", size=w.size, base=w.base, bump=w.bump, room=w.room, reason=w.reason)
            self._cond.notify_all()

    def _evict_routine(self, keep=None):
        """Carry out schedule.routine_evictions. `keep`: a shard a reader is asking for right now."""
        for e in schedule.routine_evictions(self._snapshot(), keep):
            self._delete(e.shard, e.why)

    def _make_room(self, shard, size):
        """Evict what must go so that a download of shard (size bytes) fits the budget. False: it does not."""
        evict, room = schedule.make_room(self._snapshot(), shard, size)
        if evict is None:
            if shard not in self._blocked:
                logger.info(f"{P} {self._label(shard)} waits for room: the budget "
                            f"({human_bytes(self.cache.budget)}) is full of shards in use or ahead")
            self._blocked[shard] = (f"budget {human_bytes(self.cache.budget)} holds "
                                    f"{human_bytes(self.cache.used_bytes())} of shards in use, pinned or ahead; "
                                    f"{self._label(shard)} needs {human_bytes(size)} more (release shards, or raise "
                                    f"max_cache_bytes)")
            return False
        for e in evict:
            self._delete(e.shard, e.why)
        if self.cache.budget is not None and not self.cache.fits(room):    # another process's reader
            self._blocked[shard] = (f"the room {self._label(shard)} needs is held by readers in another process "
                                    f"sharing {self._data_dir}")
            return False
        self._blocked.pop(shard, None)
        return True

    def _delete(self, shard, reason):
        freed = self.cache.delete(shard)
        if freed is None:
            logger.debug(f"{P} Kept {self._label(shard)}: a reader in another process holds it")
            return
        logger.info(f"{P} Deleted {self._label(shard)} ({reason}, {human_bytes(freed)} freed)")
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
        """Block until there is something to do: ("info", shard), ("fetch", shard) or None to stop. Before a
        fetch begins, the free space is measured with the lock released (statvfs may block on a slow or
        network disk), then the job is picked again under the lock and checked against that measure."""
        free = None                             # (shard, free bytes) measured for it just now
        while True:
            with self._cond:
                while not self._stop.is_set() and self._crash is None:
                    now = time.monotonic()
                    job = self._pick(now)
                    if job is None:
                        free = None
                        self._cond.wait(0.25)
                        continue
                    kind, shard = job
                    if kind == "info":
                        self._info_pending.add(shard)
                        return job
                    if free is None or free[0] != shard:
                        break                   # measure outside the lock, then pick again
                    size = schedule.fetch_size(self._snapshot(), shard)
                    ok = self._disk_ok(shard, size, free[1], now) and self._make_room(shard, size)
                    free = None
                    if not ok:
                        self._cond.wait(0.25)
                        continue
                    self._begin(shard, size, now)
                    return job
                else:
                    return None
            free = (shard, self.cache.free_bytes())

    def _pick(self, now):
        """schedule.next_action as a job: ("info", shard) to ask its size first, or ("fetch", shard)."""
        if now < self._disk_retry_at:
            return None
        action = schedule.next_action(self._snapshot(), now)
        if action is None:
            return None
        return ("info" if action.kind is schedule.JobKind.PROBE else "fetch"), action.shard

    def _begin(self, shard, size, now):
        """A fetch of shard begins (lock held): its room is reserved, it holds the link."""
        self.cache.begin(shard, size)
        self._clock.begin(shard, now)
        self._cond.notify_all()
        self._event("download_start", shard, size=size)

    def _disk_ok(self, shard, size, free, now):
        """policies.disk_check on `free` bytes measured just before (lock held); pauses downloads under the
        floor for DiskPolicy.recheck_seconds, and tells the readers."""
        dp = self.disk_policy
        v = disk_check(free, max(0, size - self.cache.partials.get(shard, 0)), dp, now=now,
                       last_warn=self._last_disk_warn, where=self._data_dir, what=self._label(shard))
        if not v.ok:
            if self._disk_error is None:
                logger.error(f"{P} Downloads paused: {v.message}")
                self._event("disk_low", shard, free=free, floor=dp.min_free_bytes)
            self._disk_error = DiskSpaceError(v.message)
            self._disk_retry_at = now + dp.recheck_seconds
            self._cond.notify_all()
            return False
        if self._disk_error is not None:
            logger.info(f"{P} Free space is back above the floor ({free / 1e9:.2f} GB): downloads resume")
            self._disk_error = None
        if v.warn:
            self._last_disk_warn = now
            logger.warning(f"{P} Low disk space: {free / 1e9:.2f} GB free in {self._data_dir} "
                           f"(warning under {dp.warn_free_bytes / 1e9:.2f} GB)")
        return True

    def _get_info(self, shard, session):
        try:
            info = remote_info(self._source, shard, self.fetch_policy, session=session, stop=self._stop)
        except FetchError as e:
            with self._cond:
                self._info_pending.discard(shard)
                if not isinstance(e, FetchCancelled):
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

    def _on_link(self, shard, busy):
        """fetch_shard's on_link: the transfer starts or stops receiving (then the next one may start)."""
        with self._cond:
            if self._clock.hold(shard, busy, time.monotonic()):
                self._cond.notify_all()

    def _transfer_over(self, shard, nbytes=0):
        """A transfer ended (lock held): measure it when it brought bytes, for the adaptive window."""
        self._troubled.pop(shard, None)
        if self._clock.end(shard, nbytes, time.monotonic()):
            self._update_window()
        self._cond.notify_all()

    def _download(self, shard, session):
        name = self._label(shard)
        logger.info(f"{P} Downloading {name}...")
        try:
            res = run_fetch(self._helper, self._source, shard, self._data_dir, self.fetch_policy, session=session,
                            stop=self._stop, on_bytes=lambda n: self._on_bytes(shard, n), info=self._info[shard],
                            on_retry=lambda cause: self._on_retry(shard, cause),
                            on_link=lambda busy: self._on_link(shard, busy))
        except BaseException as e:              # (re-raised there unless it is a fetch's own outcome)
            self._download_failed(shard, e)
            return
        with self._cond:
            self.cache.finish(shard, res.size)
            self._counts.retries += max(0, res.attempts - 1)  # fetch_shard retried (resumed) within the call
            self._transfer_over(shard, 0 if res.already_present else res.bytes_downloaded)
            self._failures.pop(shard, None)
            if shard in self.plan:
                self._verified.add(shard)
            where = f"[{len(self._verified)}/{self.total_shards}]" if shard in self.plan else "[val]" \
                if shard in self.val_shards else "[on demand]"
            logger.info(f"{P} Downloaded {name} ({human_bytes(res.size)}) {where}")
            self._event("downloaded", shard, size=res.size, seconds=round(res.seconds, 4),
                        attempts=res.attempts, resumed_from=res.resumed_from, checked=res.checked)
            if res.checked is not None:
                self._counts.checked[res.checked] += 1
            self._evict_routine()
            self._cond.notify_all()

    def _download_failed(self, shard, e):
        """fetch_shard raised e: the reservation ends (the partial bytes left are counted, measured before
        taking the lock); a fetch error is retried after a backoff, a full disk pauses downloads, a
        cancelled fetch (stop) is noted, anything else is a bug and crashes the worker."""
        left = self.cache.partial_bytes(shard)
        with self._cond:
            self.cache.abandon(shard, left)
            self._transfer_over(shard)
            if isinstance(e, FetchCancelled):
                self._event("cancelled", shard)
            elif isinstance(e, (FetchError, CorruptShardError)):
                self._record_failure(shard, e)
            elif isinstance(e, DiskSpaceError) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
                self._disk_error = DiskSpaceError(f"the disk of {self._data_dir} is full (while downloading "
                                                  f"{self._label(shard)}: {e}): free some space or lower "
                                                  f"max_cache_bytes")
                self._disk_retry_at = time.monotonic() + self.disk_policy.recheck_seconds
                logger.error(f"{P} {self._disk_error}")
                self._event("disk_full", shard, error=str(e))
                self._cond.notify_all()
            else:
                raise e

    def _on_retry(self, shard, cause):
        with self._cond:
            tries = self._troubled.get(shard, (0, None))[0] + 1
            self._troubled[shard] = (tries, cause)
            self._cond.notify_all()

    def _on_bytes(self, shard, n):
        with self._cond:
            self.cache.progress(shard, n)
            self._counts.add_bytes(n, time.monotonic())
            if self._ctl is not None:
                self._ctl.meter.add_bytes(n)

    def _record_failure(self, shard, e):
        """A fetch call (or a probe) of shard failed (lock held): failures.record, then log and tell."""
        r = failures.record(self._failures.get(shard), e, self.failure_policy, time.monotonic(), random.random())
        self._failures[shard] = r.failure
        self._counts.retries += r.retries
        self._counts.failures += r.failures
        if r.gave_up:
            logger.error(f"{P} {self._label(shard)} failed permanently: {e}")
            self._event("failed", shard, error=f"{type(e).__name__}: {e}", attempts=r.failure.attempts)
        else:
            logger.warning(f"{P} {self._label(shard)} failed ({type(e).__name__}: {e}); retrying in {r.delay:.1f} s")
            self._event("retry", shard, error=f"{type(e).__name__}: {e}", attempts=r.failure.attempts,
                        delay=round(r.delay, 3))
        self._cond.notify_all()

    # -------------------------------------------------------------------------
    # status and events: built under the lock (report.py), written by the status thread (statuswriter.py)

    def _progress(self):
        """report.progress of now (lock held): copied out, so it may leave the lock."""
        return report.progress(self._snapshot(), self._counts, state=self._state, disk_bytes=self.cache.disk_bytes(),
                               reserved_bytes=self.cache.reserved_bytes(), now=time.monotonic(),
                               error=self._crash or self._disk_error)

    def _status_of(self, progress):
        """The DownloaderStatus of a Progress, with the free space measured now (lock not held: statvfs)."""
        try:
            free = self.cache.free_bytes()
        except OSError:
            free = None
        return report.status(progress, self._origin, free, time.time())

    def _locked_progress(self):
        with self._cond:
            return self._progress()

    def _event(self, event, shard=None, **extra):
        """Queue one events.jsonl record for the status thread (lock held); it refreshes status.json too."""
        if shard is not None and self._labelled and 0 <= shard < self._source.dataset_shards:
            extra = {"path": self._source.path(shard), "file": self._source.file_name(shard), **extra}
        if self._status.opened:
            self._status.queue(report.event_record(self._snapshot(), event, shard, t=time.time(),
                                                   disk_bytes=self.cache.disk_bytes(), **extra))


def _resolve_source(source, dataset, dataset_shards, files=None, val_files=None, manifest=None):
    """The Source to stream from: a Source as given, or one made from a base URL string or the dataset's
    default (listing.make_source: a listed source is listed now; files/val_files/manifest pick its files)."""
    if source is None or isinstance(source, str):
        return make_source(source, dataset=dataset, dataset_shards=dataset_shards, files=files,
                           val_files=val_files, manifest=manifest)
    if not isinstance(source, Source):
        raise ConfigError(f"source must be a Source or a base URL string, got {type(source).__name__}")
    given = [n for n, v in (("files", files), ("val_files", val_files), ("manifest", manifest)) if v is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} pick(s) the files of a source URL, but source is a Source already "
                          f"({source.name}): pass them to make_source(url, files=..., val_files=..., "
                          f"manifest=...), or give the URL as source=")
    if dataset_shards is not None and dataset_shards != source.dataset_shards:
        raise ConfigError(f"dataset_shards={dataset_shards} disagrees with the Source's "
                          f"dataset_shards={source.dataset_shards}")
    return source


def _check_text_column(name):
    """The text column's name, or ConfigError: a non-empty string without control characters."""
    if not isinstance(name, str) or not name.strip() or any(ord(c) < 32 for c in name):
        raise ConfigError(f"text_column must be the name of a string column of the shards (like 'text' or "
                          f"'content'), got {name!r}")
    return name


def _with_text_column(policy, name):
    """The fetch policy whose verification checks `name` as the text column (the run's, whatever the
    FetchPolicy given said: one column per run)."""
    return policy if policy.text_column == name else replace(policy, text_column=name)


def _writable_data_dir(data_dir, dataset, source):
    """The data dir, created and writable, or a clear ConfigError now (never a local source's own folder:
    eviction would delete its shards)."""
    d = Path(data_dir) if data_dir is not None else default_data_dir(dataset)
    source.check_data_dir(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"data dir {d} is not a writable directory ({e.strerror or e}): "
                          f"pass data_dir= (or SHARDSTREAM_DATA_DIR) pointing somewhere writable") from None
    return d


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
