"""Streaming configured by environment variables, for an unmodified nanochat (docs/NANOCHAT.md).

nanochat's training script calls the loader without a downloader. With SHARDSTREAM_STREAMING=1 the
loader (shardstream/loader.py) asks this module for one instead of reading a local directory:

    lease = env_downloader("train")          # None when SHARDSTREAM_STREAMING is off
    gen = lease.run(lambda dl: make_the_loader(streaming_downloader=dl))

- Settings: `StreamingSettings.from_env()` reads the SHARDSTREAM_* variables through settings.py (VARIABLES
  below); a bad value raises ConfigError naming the variable, what it holds, and what to write instead.
- One downloader per data dir and process, shared by reference count: the train generator and the val
  generators nanochat builds for every evaluation use the same one, so a val loader never starts a
  second downloader on the same cache dir. Train shards stream for as long as the run reads (the window
  wraps to shard 0 after the last one: nanochat's loader is infinite); the val split reads the val shard.
- Under torchrun it is `make_node_downloader(...)`: one downloader per node, the other local ranks read
  through it. It then stays up until the process exits, because the other ranks' readers depend on it.
- Clean stop: when the last generator using it is closed or garbage-collected (a weakref.finalize on
  each generator), and at interpreter exit (atexit), the downloader is stopped, its threads joined, and
  the partial files of downloads it had in flight are removed (a killed process leaves them instead, and
  the next run resumes them).
- Visible: a `[Streaming] ...` status line is logged when training moves on to a new shard (the train
  loader's state's pq_idx; at most every SHARDSTREAM_STATUS_EVERY seconds), naming both the shard in
  training and the loader's read-ahead, with the data wait (status.py's one definition). The shard in
  training also goes into the event log ("training_shard"), so `shardstream status` from a second
  terminal shows it beside the downloader's own status.json.
"""
import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Generator
from dataclasses import dataclass, fields

from .cache import discard_partials
from .errors import ConfigError
from .node import NodeReader
from .settings import DROP_IN, SETTINGS, read, read_all, torchrun_env, warn_unknown
from .shards import DEFAULT_DATASET, default_data_dir
from .verify import configure_row_group_limits

logger = logging.getLogger(__name__)
P = "[Streaming]"

# every variable this module reads (settings.SETTINGS holds their types, defaults and meanings)
VARIABLES = tuple(s.name for s in SETTINGS if DROP_IN in s.where)
_FIELDS = {"SHARDSTREAM_SOURCE": "source", "SHARDSTREAM_DATASET": "dataset",
           "SHARDSTREAM_DATASET_SHARDS": "dataset_shards", "SHARDSTREAM_MAX_CACHE_BYTES": "max_cache_bytes",
           "SHARDSTREAM_TOTAL_SHARDS": "total_shards", "SHARDSTREAM_RETAIN": "retain",
           "SHARDSTREAM_WORKERS": "workers", "SHARDSTREAM_FAILURE_POLICY": "failure_policy",
           "SHARDSTREAM_MIN_FREE_BYTES": "min_free_bytes", "SHARDSTREAM_PARTITION": "partition",
           "SHARDSTREAM_SCOPE": "scope", "SHARDSTREAM_STATUS_EVERY": "status_every",
           "SHARDSTREAM_REQUIRE_CHECKSUM": "require_checksum", "SHARDSTREAM_VERIFY": "verify",
           "SHARDSTREAM_FETCH_PROCESS": "fetch_process",
           "SHARDSTREAM_MAX_ROW_GROUP_BYTES": "max_row_group_bytes",
           "SHARDSTREAM_MAX_ROW_GROUP_ROWS": "max_row_group_rows", "SHARDSTREAM_DIST_TIMEOUT": "dist_timeout",
           "SHARDSTREAM_SHARE_STATE": "share_state", "SHARDSTREAM_FILES": "files",
           "SHARDSTREAM_VAL_FILES": "val_files", "SHARDSTREAM_MANIFEST": "manifest",
           "SHARDSTREAM_TEXT_COLUMN": "text_column"}


# -----------------------------------------------------------------------------------------------------
# Settings from the environment

def streaming_enabled(env=None):
    """SHARDSTREAM_STREAMING as a bool (unset: off)."""
    return read("SHARDSTREAM_STREAMING", env)


def local_settings(env=None):
    """(data_dir, share_state, dist_timeout) for a loader called with neither a downloader nor a data dir,
    reading nanochat's local dir; sets the process's row-group caps too. ConfigError for a bad value."""
    v = read_all(["SHARDSTREAM_DATA_DIR", "SHARDSTREAM_SHARE_STATE", "SHARDSTREAM_DIST_TIMEOUT",
                  "SHARDSTREAM_MAX_ROW_GROUP_BYTES", "SHARDSTREAM_MAX_ROW_GROUP_ROWS"], env)
    configure_row_group_limits(v["SHARDSTREAM_MAX_ROW_GROUP_BYTES"], v["SHARDSTREAM_MAX_ROW_GROUP_ROWS"])
    return (v["SHARDSTREAM_DATA_DIR"] or os.fspath(default_data_dir(env=env)), v["SHARDSTREAM_SHARE_STATE"],
            v["SHARDSTREAM_DIST_TIMEOUT"])


@dataclass(frozen=True)
class StreamingSettings:
    """What the SHARDSTREAM_* variables ask for (_FIELDS says which variable sets which field)."""
    source: str | None = None           # None: the Hub URL of `dataset`
    dataset: str = DEFAULT_DATASET
    dataset_shards: int | None = None   # None: the dataset's (or the listed) count
    data_dir: str = ""                  # resolved: SHARDSTREAM_DATA_DIR, else nanochat's dir for `dataset`
    max_cache_bytes: int | None = None
    buffer_size: int = 5
    adaptive: bool = False              # SHARDSTREAM_BUFFER_SIZE=auto
    total_shards: int = -1
    retain: int = 0
    workers: int = 2
    failure_policy: str = "fail"
    min_free_bytes: int | None = None   # None: the downloader's default floor
    partition: str = "global"
    scope: str = "node"
    status_every: float | None = 0.0    # None: no status lines
    require_checksum: bool = False
    verify: str = "footer"              # fetch.VERIFY_LEVELS
    fetch_process: bool | str = "auto"  # FetchPolicy.process
    max_row_group_bytes: int | None = None     # None: verify.py's defaults
    max_row_group_rows: int | None = None
    dist_timeout: float | None = None   # None: torchrun.DEFAULT_TIMEOUT
    share_state: bool = True
    files: tuple | None = None          # train globs (manifest.py); None: nanochat's shards, else **/*.parquet
    val_files: str | None = None        # a glob or "none"; None: the last file
    manifest: str | None = None         # a manifest file's path
    text_column: str = "text"

    @classmethod
    def from_env(cls, env=None):
        """The settings, or one ConfigError listing every bad variable."""
        v = read_all([name for name in VARIABLES if name != "SHARDSTREAM_STREAMING"], env,
                     what="bad streaming settings in the environment")
        kw = {field: v[name] for name, field in _FIELDS.items()}
        kw["files"] = tuple(kw["files"]) if kw["files"] is not None else None     # frozen: compared, hashed
        buffer = v["SHARDSTREAM_BUFFER_SIZE"]
        kw["adaptive"] = buffer == "auto"
        kw["buffer_size"] = 5 if buffer == "auto" else buffer
        data_dir = v["SHARDSTREAM_DATA_DIR"] or os.fspath(default_data_dir(kw["dataset"], env=env))
        warn_unknown(env, logger, P)
        return cls(data_dir=data_dir, **kw)

    def describe(self):
        from .source import redact_url
        from .status import human_bytes
        budget = "none" if self.max_cache_bytes is None else human_bytes(self.max_cache_bytes)
        shards = "all" if self.total_shards == -1 else str(self.total_shards)
        window = "auto" if self.adaptive else str(self.buffer_size)
        checks = ", ".join((["sha256/md5 required"] if self.require_checksum else [])
                           + (["every page decoded"] if self.verify == "decode" else []))
        picked = "; ".join((["files " + ";".join(self.files)] if self.files else [])
                           + ([f"val files {self.val_files}"] if self.val_files else [])
                           + ([f"manifest {self.manifest}"] if self.manifest else [])
                           + ([f"text column {self.text_column}"] if self.text_column != "text" else []))
        return (f"source {redact_url(self.source) if self.source else self.dataset + ' (the Hub)'}"
                + (f" ({picked})" if picked else "")
                + f", data dir {self.data_dir}, budget {budget}, buffer {window} shards, train shards {shards} "
                  f"(+ the val shard)" + (f", checks: {checks}" if checks else ""))

    def make_source(self):
        """The Source, with errors naming the variables they come from."""
        from .listing import make_source
        try:
            src = make_source(self.source, dataset=self.dataset, dataset_shards=self.dataset_shards,
                              files=list(self.files) if self.files is not None else None, val_files=self.val_files,
                              manifest=self.manifest)
        except ConfigError as e:
            names = "SHARDSTREAM_SOURCE" if self.source else "SHARDSTREAM_DATASET"
            picked = [(f"SHARDSTREAM_{n.upper()}", ";".join(v) if n == "files" else v)
                      for n, v in (("files", self.files), ("val_files", self.val_files), ("manifest", self.manifest))
                      if v is not None]
            raise ConfigError(f"{names}={self.source or self.dataset!r}"
                              + (f", SHARDSTREAM_DATASET_SHARDS={self.dataset_shards}" if self.dataset_shards else "")
                              + "".join(f", {n}={v!r}" for n, v in picked)
                              + f": {e}") from None
        if self.total_shards > src.num_train_shards:
            why = (f" ({self.total_shards} is its count with the val shard, but the variable counts train shards "
                   f"only: the val shard comes besides)" if self.total_shards == src.dataset_shards else
                   " (train shards only: the val shard comes besides)")
            raise ConfigError(f"SHARDSTREAM_TOTAL_SHARDS={self.total_shards}, but {src.name} has "
                              f"{src.num_train_shards} train shards{why}: ask for at most {src.num_train_shards}, "
                              f"or -1 for all")
        return src

    def downloader_kwargs(self, split, resuming=False):
        """make_node_downloader's / StreamingDownloader's arguments for a downloader first made by a loader of
        `split`. Only a fresh train loader waits for shard 0 in start() (the fast start); a val loader or a
        resuming one asks for the shard it needs first."""
        from .downloader import WindowPolicy
        from .fetch import FetchPolicy
        kw = dict(source=self.source, dataset=self.dataset, dataset_shards=self.dataset_shards,
                  data_dir=self.data_dir, total_shards=self.total_shards, workers=self.workers,
                  failure_policy=self.failure_policy, progress=sys.stderr.isatty(),
                  window=WindowPolicy(self.buffer_size, self.retain, self.max_cache_bytes,
                                      initial_buffer=1 if split == "train" and not resuming else 0,
                                      cycle=True),
                  prefetch="auto" if self.adaptive else None, text_column=self.text_column,
                  fetch_policy=FetchPolicy(require_checksum=self.require_checksum, verify=self.verify,
                                           text_column=self.text_column, process=self.fetch_process))
        if self.min_free_bytes is not None:
            kw["min_free_bytes"] = self.min_free_bytes
            kw["warn_free_bytes"] = max(self.min_free_bytes, min(5 * self.min_free_bytes, 5_000_000_000))
        return kw


# -----------------------------------------------------------------------------------------------------
# One shared downloader per data dir, reference-counted by the generators using it

_lock = threading.RLock()       # re-entrant: a generator's finalizer may run in a GC pass inside our code
_live = {}                      # realpath of the data dir -> _Shared


class _Shared:
    """A started downloader (StreamingDownloader, or a NodeLeader/NodeReader under torchrun) and its users."""

    def __init__(self, settings, downloader, distributed):
        self.settings = settings
        self.downloader = downloader
        self.distributed = distributed
        self.users = 0
        self.alive = True
        self.trained = None             # the shard the train loader's batches come from now
        self.last_report = float("-inf")
        self.talk = distributed is False or torchrun_env().get("RANK", "0") == "0"   # one rank prints
        self.events = None              # our own lines in the downloader's event log (opened on first use)

    @classmethod
    def open(cls, settings, split, resuming):
        from .node import make_node_downloader
        from .torchrun import node_info
        info = node_info()
        _make_visible()
        kw = settings.downloader_kwargs(split, resuming)
        kw["source"] = settings.make_source()
        configure_row_group_limits(settings.max_row_group_bytes, settings.max_row_group_rows)
        dl = make_node_downloader(partition=settings.partition, scope=settings.scope,
                                  timeout=settings.dist_timeout, **kw)
        shared = cls(settings, dl, info.distributed)
        if shared.talk:
            logger.info(f"{P} streaming on (SHARDSTREAM_STREAMING=1): {settings.describe()}"
                        + (f", {settings.partition} partition, one downloader per {settings.scope}"
                           if info.distributed else ""))
            logger.info(f"{P} watch it from another terminal: shardstream status --watch --data-dir "
                        f"{settings.data_dir}")
        try:
            dl.start()
        except BaseException as e:
            dl.stop()                   # a NodeReader that could not attach still runs its heartbeat
            if isinstance(e, ConfigError):
                raise ConfigError(_name_variables(str(e))) from None
            raise
        return shared

    def on_batch(self, batch):
        """A train batch reached the training loop: when its loader state (pq_idx) is in a new shard, say so in
        the event log (`shardstream status` shows it) and in a status line."""
        state = batch[2] if isinstance(batch, tuple) and len(batch) == 3 else None
        pq_idx = state.get("pq_idx") if isinstance(state, dict) else None
        if not isinstance(pq_idx, int) or not self.talk:
            return
        order = self.downloader.plan.order
        shard = order[pq_idx] if 0 <= pq_idx < len(order) else None
        if shard is None or shard == self.trained:
            return
        self.trained = shard
        try:
            from .status import EventLog, event_fields
            if self.events is None and not isinstance(self.downloader, NodeReader):
                self.events = EventLog(self.settings.data_dir)
            if self.events is not None:
                self.events.write("training_shard", shard=shard, **event_fields(self.downloader.get_status()))
        except (OSError, ConfigError) as e:     # (UnsafePathError: a planted link) never fail a batch over it
            logger.debug(f"{P} could not write the event log: {e}")
        self.report()

    def status(self):
        """The downloader's status with the shard in training and a wait in progress (status.with_events)."""
        from .status import with_events
        st = self.downloader.get_status()
        if self.trained is not None:
            st = with_training(st, self.trained, self.downloader.source)
        if st.current_shard is not None and st.current_shard not in st.cached:    # the reader may be waiting
            st = with_events(st, self.settings.data_dir)
        return st

    def report(self):
        """Log a status line, at most every SHARDSTREAM_STATUS_EVERY seconds."""
        if not self.talk or self.settings.status_every is None:
            return
        now = time.monotonic()
        if now - self.last_report < self.settings.status_every:
            return
        self.last_report = now
        try:
            line = self.status().line()
        except Exception as e:      # a reader's status comes from the store: never fail a read over it
            line = f"(status unavailable: {type(e).__name__}: {e})"
        logger.info(f"{P} {line}")

    def _status_or_none(self):
        try:
            return self.downloader.get_status()
        except Exception:           # a NodeReader's status comes from the store, gone after its stop
            return None

    def stop(self):
        """Stop the downloader, join its threads, remove the partial files it left (lock held)."""
        if not self.alive:
            return
        self.alive = False
        key = _key(self.settings)
        if _live.get(key) is self:
            del _live[key]
        before = self._status_or_none()
        self.downloader.stop()
        status = self._status_or_none() or before       # after the stop: the figures of its last status.json
        if self.events is not None:
            self.events.close()
        owns_dir = not isinstance(self.downloader, NodeReader)     # a NodeReader's leader owns the dir
        removed = discard_partials(self.settings.data_dir) if owns_dir else 0
        if self.talk and status is not None:
            logger.info(f"{P} stopped: {status.downloaded_bytes / 1e6:.1f} MB downloaded, data wait "
                        f"{status.data_wait()}"
                        + (f", {removed} partial file(s) of unfinished downloads removed" if removed else ""))


def _key(settings):
    return os.path.realpath(settings.data_dir)


class Lease:
    """One generator's use of the shared downloader. release() is idempotent."""

    def __init__(self, shared, split):
        self.shared = shared
        self.split = split
        self.released = False
        self.downloader = _Reporting(shared, split)

    def run(self, make):
        """gen = make(downloader), wrapped in an OwnedLoader that ends this lease when it is closed,
        garbage-collected, or the interpreter exits. A failing make() releases at once."""
        try:
            gen = make(self.downloader)
        except BaseException:
            self.release()
            raise
        return OwnedLoader(gen, self)

    def release(self):
        with _lock:
            if self.released:
                return
            self.released = True
            shared = self.shared
            shared.users -= 1
            if shared.users > 0 or shared.distributed:
                return
            if threading.current_thread().name.startswith("shardstream"):
                # a GC pass in one of our own threads collected the last loader: that thread cannot join
                # itself, so another one stops the downloader
                threading.Thread(target=_stop_locked, args=(shared,), name="shardstream-env-stop", daemon=True).start()
            else:
                shared.stop()


def _stop_locked(shared):
    with _lock:
        shared.stop()


class OwnedLoader(Generator):
    """The loader's generator, holding a lease on the shared downloader. Closing it, dropping it (garbage
    collection) or interpreter exit closes the loader and ends the lease, whether it was started or not
    (a plain generator closed before its first next() would never run its cleanup)."""

    def __init__(self, gen, lease):
        self._gen = gen
        self._finalizer = weakref.finalize(self, _close, gen, lease)
        self._on_batch = lease.shared.on_batch if lease.split == "train" else None

    def send(self, value):
        batch = self._gen.send(value)
        if self._on_batch is not None:
            self._on_batch(batch)
        return batch

    def throw(self, *args):
        return self._gen.throw(*args)

    def close(self):
        self._finalizer()


def _close(gen, lease):
    try:
        gen.close()
    finally:
        lease.release()


class _Reporting:
    """The shared downloader as one loader sees it (a reader.ShardReader): every member is the
    downloader's."""

    def __init__(self, shared, split):
        self._shared = shared
        self._split = split

    source = property(lambda self: self._shared.downloader.source)
    data_dir = property(lambda self: self._shared.downloader.data_dir)
    val_shard = property(lambda self: self._shared.downloader.val_shard)
    val_shards = property(lambda self: self._shared.downloader.val_shards)
    text_column = property(lambda self: self._shared.downloader.text_column)
    total_shards = property(lambda self: self._shared.downloader.total_shards)
    plan = property(lambda self: self._shared.downloader.plan)

    def row_group_stride(self, split):
        return self._shared.downloader.row_group_stride(split)

    def wait_for_shard(self, shard_id, timeout=None, *, reader=0):
        return self._shared.downloader.wait_for_shard(shard_id, timeout, reader=reader)

    def release(self, shard_id, *, reader=0, consumed=True):
        self._shared.downloader.release(shard_id, reader=reader, consumed=consumed)

    def get_status(self):
        return self._shared.downloader.get_status()

    def start(self):
        self._shared.downloader.start()
        return self

    def stop(self):
        self._shared.downloader.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def env_downloader(split, resuming=False):
    """A Lease on the process's env-configured downloader (made and started on first use), or None when
    SHARDSTREAM_STREAMING is off. Raises ConfigError for bad settings. `resuming`: the loader starts from a
    resume state (so the downloader does not fetch shard 0 before anything else)."""
    if not streaming_enabled():
        return None
    settings = StreamingSettings.from_env()
    key = _key(settings)
    with _lock:
        shared = _live.get(key)
        if shared is not None:
            shared.users += 1
            if not shared.alive:                    # a finalizer stopped it just now
                shared = None
            elif shared.settings != settings:
                shared.users -= 1
                changed = [f.name for f in fields(settings)
                           if getattr(settings, f.name) != getattr(shared.settings, f.name)]
                raise ConfigError(f"the streaming settings changed ({', '.join(changed)}) while a loader of "
                                  f"{settings.data_dir} is open: close the open loaders first, or keep the "
                                  f"SHARDSTREAM_* variables the same for the whole run")
        if shared is None:
            shared = _Shared.open(settings, split, resuming)
            shared.users += 1
            _live[key] = shared
    return Lease(shared, split)


def shutdown():
    """Stop every env-configured downloader of this process now (also run at interpreter exit)."""
    with _lock:
        for shared in list(_live.values()):
            try:
                shared.stop()
            except Exception as e:
                logger.error(f"{P} stopping the downloader of {shared.settings.data_dir} failed: {e}")


atexit.register(shutdown)


# -----------------------------------------------------------------------------------------------------
# Helpers

_KWARG_VARIABLES = {"max_cache_bytes": "SHARDSTREAM_MAX_CACHE_BYTES", "buffer_size": "SHARDSTREAM_BUFFER_SIZE",
                    "total_shards": "SHARDSTREAM_TOTAL_SHARDS", "min_free_bytes": "SHARDSTREAM_MIN_FREE_BYTES"}


def _name_variables(message):
    """The downloader's errors name its arguments; say which variable set them."""
    named = [var for kwarg, var in _KWARG_VARIABLES.items() if kwarg in message]
    return message + (f" (set through {', '.join(named)})" if named else "")


def with_training(status, shard, source):
    """status naming `shard` as the one in training (the trainer's too), by its source path when the source
    has a manifest: a status labels only the shards it lists itself."""
    from dataclasses import replace

    from .layout import shard_label
    paths = status.shard_paths
    if getattr(source, "manifest", None) is not None and str(shard) not in paths:
        paths = {**paths, str(shard): shard_label(source, shard)}
    return replace(status, training_shard=shard, shard_paths=paths)


def _make_visible():
    """nanochat configures logging at INFO; a bare script has no handler and would hide the status lines."""
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
