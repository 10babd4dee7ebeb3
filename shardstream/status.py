"""What the downloader is doing, for programs and for people.

- `DownloaderStatus`: a frozen snapshot (`StreamingDownloader.get_status()`, or `shardstream download`'s),
  with `line()` for the trainer's one-line log and `render()` for a person.
- `write_status` / `read_status`: the snapshot as `<data_dir>/.shardstream/status.json`, replaced atomically;
  read_status raises ConfigError naming the file when it is not a shardstream status file.
- `EventLog`: `<data_dir>/.shardstream/events.jsonl`, one JSON object per shard event (t, event, shard, bytes_on_disk,
  budget, ahead, reader_shard, ...) for the timeline plot. A trainer adds its own: "training_shard" (the
  shard its batches come from) and "downloaded" with by="trainer" (a shard it fetched itself).
- `with_events(status, data_dir)`: the snapshot plus what only the event log knows: a reader's wait in
  progress and the shard in training.
- `cli(argv)`: `shardstream status [--data-dir DIR] [--watch]`, the better `watch ls` (default data dir:
  SHARDSTREAM_DATA_DIR, else nanochat's for SHARDSTREAM_DATASET, as the downloader chooses it).

**Data wait**, one figure under one name on every surface (this status, the `[Streaming]` lines, the
trainer's step and Done lines, the demo's summary): the seconds the loaders' readers were blocked in
wait_for_shard on a shard not yet on disk (the downloader's `waits` / `wait_seconds`, summed over readers),
a wait in progress counted up to now. Filling the initial buffer in start() is not a wait: it is the time
to the first step. The loader reads ahead of training, so training itself may have lost less than this.
`DownloaderStatus.data_wait()` writes it, e.g. "6.5s (5 waits; waiting 1.2s now for shard_00004)".

Sizes are decimal everywhere (human_bytes: 1 MB = 10**6 bytes, as units.parse_bytes reads them).

The data dir is shared ground: both files are written through safefs (a symbolic link planted under
either name, or under the temp file's, is never written through).
"""
import argparse
import json
import os
import secrets
import socket
import stat
import sys
import threading
import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from . import layout
from .errors import ConfigError, UnsafePathError
from .safefs import ensure_book_dir, fopen_nofollow, open_nofollow
from .shards import shard_name
from .units import positive_number

STALE_SECONDS = 10.0          # a running downloader rewrites status.json every ~0.5 s
FILES_SHOWN = 8              # `shardstream status`: files named (source path and cache name) at most
EVENTS_TAIL = 64 << 10        # bytes of the event log's end read for a wait in progress (~250 events)
# what vouched for a shard (FetchResult.checked), in words
CHECK_WORDS = {"sha256": "sha256", "md5": "md5", "size+footer": "size+footer only",
               "sha256+decode": "sha256+decode", "md5+decode": "md5+decode",
               "size+footer+decode": "size+footer+decode only"}


@dataclass(frozen=True)
class DownloaderStatus:
    """One snapshot of a StreamingDownloader (kind "stream") or of `shardstream download` (kind "download")."""
    state: str                      # created, starting, running, stopped, crashed
    shards_verified: int            # train shards of the plan verified so far (downloaded or reused)
    total_shards: int               # train shards in the plan
    ahead: int                      # verified shards in the window ahead of the reader
    buffer_size: int                # the window's size
    current_shard: int | None       # the shard the loader's reader last asked for (its read-ahead)
    bytes_on_disk: int              # shard files + partial files
    reserved_bytes: int             # budget held for in-flight downloads beyond their partial bytes
    budget: int | None              # max_cache_bytes (None = no budget)
    free_disk_bytes: int | None
    download_mbps: float            # recent download rate, MB/s (10**6 bytes)
    downloaded_bytes: int           # bytes fetched in this run
    in_flight: tuple = ()           # shards being downloaded
    cached: tuple = ()              # verified shards on disk
    retries: int = 0                # failed attempts retried (inside a fetch, and fetches retried later)
    failures: int = 0               # shards that failed permanently or past the deadline
    skipped: tuple = ()             # shards the "skip" policy gave up on
    waits: int = 0                  # times a reader had to wait (a wait in progress included)
    wait_seconds: float = 0.0       # seconds readers spent in waits that ended (see "Data wait" above)
    error: str | None = None        # the error that stopped downloading (disk floor, crash), if any
    val_shard: int | None = None
    data_dir: str = ""
    source: str = ""
    pid: int = 0
    host: str = ""
    updated: float = 0.0            # unix time of this snapshot
    kind: str = "stream"            # "stream": a StreamingDownloader; "download": `shardstream download`
    checked: dict = field(default_factory=dict)    # downloads by what vouched for them: "sha256", "md5",
                                    # "size+footer" (no checksum at the source), each maybe "+decode"
    training_shard: int | None = None   # the shard training reads its batches from (a trainer reports it)
    wait_shard: int | None = None       # the shard a reader is waiting for now (None: no wait in progress)
    wait_started: float | None = None   # unix time that wait began
    val_shards: tuple | None = None     # every val shard (a manifest's; () for none); None: just val_shard
    shard_paths: dict[str, str] = field(default_factory=dict)   # str(shard id) -> "path (cache name)" for
                                    # the shards named here, when the source names files by path (a
                                    # manifest): status and `shardstream status` show the source's path
                                    # beside the cache name; empty for nanochat's shard_XXXXX.parquet

    def to_dict(self):
        d = asdict(self)
        for k in ("in_flight", "cached", "skipped", "val_shards"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("in_flight", "cached", "skipped", "val_shards"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def label(self, shard):
        """How this status names a shard: 'shard_00004' (nanochat's), or its source path and cache name."""
        return self.shard_paths.get(str(shard)) or _short(shard)

    def val_words(self):
        """'val shard 9', 'val shards 7, 8', 'no val shards'."""
        v = (self.val_shard,) if self.val_shards is None else tuple(self.val_shards)
        if not v or v == (None,):
            return "no val shards"
        return f"val shard {v[0]}" if len(v) == 1 else f"val shards {_ids(v)}"

    def waiting_now(self, now=None):
        """Seconds the wait in progress has lasted (None: no reader waits now)."""
        if self.wait_started is None or self.state not in ("starting", "running"):
            return None
        return max(0.0, (time.time() if now is None else now) - self.wait_started)

    def data_wait_seconds(self, now=None):
        """The data wait (module docstring) in seconds, a wait in progress counted up to now."""
        return self.wait_seconds + (self.waiting_now(now) or 0.0)

    def data_wait(self, now=None):
        """The data wait in words, the same on every surface: '6.5s (5 waits)', or with a wait in progress
        '7.7s (5 waits; waiting 1.2s now for shard_00004)'."""
        s = f"{self.data_wait_seconds(now):.1f}s ({self.waits} wait{'' if self.waits == 1 else 's'}"
        elapsed = self.waiting_now(now)
        if elapsed is not None:
            s += f"; waiting {elapsed:.1f}s now for {self.label(self.wait_shard)}"
        return s + ")"

    def position(self):
        """Where training and the loader are: 'training: shard_00003, loader: shard_00004'. The loader
        reads ahead of training (current_shard is its read-ahead); training_shard is known when a trainer
        reports it."""
        loader = f"loader: {self.label(self.current_shard)}"
        return loader if self.training_shard is None else f"training: {self.label(self.training_shard)}, {loader}"

    def verified_by(self):
        """'sha256: 12, size+footer only: 3': this downloader's fetches by what vouched for them ('-' before
        any; shards found on disk at start are not counted, nor shard 0 when the trainer fetched it itself)."""
        if not self.checked:
            return "-"
        return ", ".join(f"{CHECK_WORDS.get(k, k)}: {n}" for k, n in sorted(self.checked.items(), key=lambda kv: -kv[1]))

    def line(self, now=None):
        """The seed's status line, with both positions and the data wait: `7/10 shards downloaded, buffer:
        5/5, training: shard_00000, loader: shard_00001, disk: ..., 41.3 MB/s, data wait 0.0s (0 waits)`."""
        disk = _mb(self.bytes_on_disk) + (f"/{_mb(self.budget)}" if self.budget else "")
        if self.kind == "download":
            s = (f"{self.shards_verified}/{self.total_shards} shards downloaded, in flight: {_ids(self.in_flight)}, "
                 f"disk: {disk}, {self.download_mbps:.1f} MB/s")
        else:
            s = (f"{self.shards_verified}/{self.total_shards} shards downloaded, buffer: {self.ahead}/"
                 f"{self.buffer_size}, {self.position()}, disk: {disk}, {self.download_mbps:.1f} MB/s, "
                 f"data wait {self.data_wait(now)}")
        if self.skipped:
            s += f", skipped: {len(self.skipped)}"
        if self.error:
            s += f", ERROR: {self.error}"
        return s

    def render(self, now=None):
        """A few lines for a person (`shardstream status`)."""
        now = time.time() if now is None else now
        age = now - self.updated
        budget = _mb(self.budget) if self.budget else "none"
        free = _mb(self.free_disk_bytes) if self.free_disk_bytes is not None else "?"
        who = "shardstream download" if self.kind == "download" else "downloader"
        lines = [
            f"{who:<12} {self.state}  (pid {self.pid} on {self.host}, updated {age:.1f}s ago)",
            f"source       {self.source}",
            f"data dir     {self.data_dir}",
        ]
        if self.kind == "download":
            lines.append(f"shards       {self.shards_verified}/{self.total_shards} verified (train shards and the "
                         f"{self.val_words()})")
        else:
            if self.current_shard is None:
                where = "the loader has not asked for a shard yet"
            elif self.training_shard is None:
                where = f"loader at {self._full(self.current_shard)} (it reads ahead of training)"
            else:
                where = (f"training on {self._full(self.training_shard)}, the loader reads ahead at "
                         f"{self._full(self.current_shard)}")
            lines += [
                f"shards       {self.shards_verified}/{self.total_shards} verified, {self.val_words()}",
                f"position     {where}; {self.ahead}/{self.buffer_size} ready ahead",
                f"data wait    {self.data_wait(now)}: readers blocked on shards not downloaded yet",
            ]
        lines += [
            f"disk         {_mb(self.bytes_on_disk)} on disk (+{_mb(self.reserved_bytes)} reserved), "
            f"budget {budget}, free {free}",
            f"network      {self.download_mbps:.2f} MB/s recent, {_mb(self.downloaded_bytes)} this run; "
            f"downloading {_ids(self.in_flight)}",
            f"verified by  {self.verified_by()}",
            f"on disk      {_ids(self.cached)}",
            f"faults       {self.retries} retries, {self.failures} failures, skipped {_ids(self.skipped)}",
        ]
        shown = [s for s in (*self.in_flight, *self.cached) if str(s) in self.shard_paths]
        for k, s in enumerate(shown[:FILES_SHOWN]):     # a manifest's files: where each came from
            more = f" (+{len(shown) - FILES_SHOWN} more)" if k == FILES_SHOWN - 1 and len(shown) > FILES_SHOWN else ""
            lines.append(f"{'files' if k == 0 else '':<12} {s}: {self.shard_paths[str(s)]}{more}")
        if self.error:
            lines.append(f"ERROR        {self.error}")
        return "\n".join(lines)

    def _full(self, shard):
        return self.shard_paths.get(str(shard)) or shard_name(shard)


def event_fields(status):
    """The fields every downloader event carries (bytes_on_disk, budget, ahead, reader_shard), from a status:
    for an event a trainer adds to the log beside the downloader's."""
    return {"bytes_on_disk": status.bytes_on_disk, "budget": status.budget, "ahead": status.ahead,
            "reader_shard": status.current_shard}


def _short(shard):
    return shard_name(shard).removesuffix(".parquet") if isinstance(shard, int) and shard >= 0 else "-"


def human_bytes(n):
    """250300000 -> '250.3 MB' (decimal units, like the seed's log lines)."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


_mb = human_bytes


def _ids(ids, limit=12):
    ids = list(ids)
    if not ids:
        return "-"
    s = ", ".join(str(i) for i in ids[:limit])
    return s + (f" ... (+{len(ids) - limit})" if len(ids) > limit else "")


def status_path(data_dir):
    """DIR/.shardstream/status.json (layout.py)."""
    return layout.status_path(data_dir)


def events_path(data_dir):
    """DIR/.shardstream/events.jsonl (layout.py)."""
    return layout.events_path(data_dir)


def _temp_name():
    # unguessable, so nobody can plant a link under it in advance; O_EXCL refuses one anyway
    return f".{layout.STATUS_FILE}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def write_status(data_dir, status):
    """Write status.json atomically: a new temp file in the same dir (O_EXCL|O_NOFOLLOW), then os.replace,
    which replaces a link planted at status.json instead of writing through it."""
    ensure_book_dir(data_dir)
    path = status_path(data_dir)
    tmp = path.with_name(_temp_name())
    try:
        fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise UnsafePathError(f"{tmp} already exists{' as a symbolic link' if os.path.islink(tmp) else ''}: "
                              f"something else writes shardstream's temp names in this data dir; remove it "
                              f"or choose another data dir") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(status.to_dict(), f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _not_ours(path, why):
    return ConfigError(f"{path} is not a shardstream status file ({why}): it is not what a StreamingDownloader "
                       f"writes; remove it, or give the --data-dir of a downloader")


def _accepts(tp, value):
    """Whether a JSON value fits a DownloaderStatus field annotation."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_accepts(t, value) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is tuple:             # shard ids and such: a list of plain values
        return isinstance(value, list) and all(v is None or isinstance(v, (int, float, str)) for v in value)
    if typing.get_origin(tp) is dict:     # names by id: str -> str
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if tp is dict:              # counts by name (checked): str -> int
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                               for k, v in value.items())
    return True                 # an annotation this check does not know: leave it to the reader


def _check_fields(path, d):
    """Raise ConfigError (naming path) unless d holds every required DownloaderStatus field with its type."""
    if not isinstance(d, dict):
        raise _not_ours(path, f"it holds a JSON {type(d).__name__}, not an object")
    missing = [f.name for f in fields(DownloaderStatus)
               if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise _not_ours(path, f"no {', '.join(missing)}")
    wrong = [f"{f.name}={d[f.name]!r}"[:80] for f in fields(DownloaderStatus)
             if f.name in d and not _accepts(f.type, d[f.name])]
    if wrong:
        raise _not_ours(path, f"wrong type: {', '.join(wrong)}")


def read_status(data_dir):
    """The DownloaderStatus in data_dir's status.json, or None when there is none. ConfigError naming the
    file when it cannot be read or is not a status file (not JSON, not an object, fields of the wrong type)."""
    path = status_path(data_dir)
    if not os.path.lexists(path) and os.path.lexists(Path(data_dir) / layout.STATUS_FILE):
        path = Path(data_dir) / layout.STATUS_FILE             # an older shardstream's, at the top of the dir
    try:
        # O_NONBLOCK: a fifo planted there must not hang `shardstream status`
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _not_ours(path, "not a regular file")
        try:
            d = json.loads(f.read())
        except (ValueError, RecursionError) as e:       # not JSON / not UTF-8 / absurdly nested
            raise _not_ours(path, f"not JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path} cannot be read ({e.strerror or e})") from None
    _check_fields(path, d)
    return DownloaderStatus.from_dict(d)


class EventLog:
    """Appends one JSON object per line to events.jsonl. Thread-safe; each line is flushed at once.
    A symbolic link planted under that name is refused (UnsafePathError), never appended through."""

    def __init__(self, data_dir):
        ensure_book_dir(data_dir)
        self.path = events_path(data_dir)
        self._lock = threading.Lock()
        self._f = fopen_nofollow(self.path, "a", buffering=1)

    def write(self, event, **fields_):
        rec = {"t": round(time.time(), 4), "event": event, **fields_}
        line = json.dumps(rec, default=str) + "\n"
        with self._lock:
            if self._f is not None:
                self._f.write(line)

    def close(self):
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


def read_events(data_dir, tail_bytes=None):
    """Every event in data_dir's events.jsonl, as dicts (a torn last line is ignored); with tail_bytes, only
    the events in the file's last tail_bytes (the line cut in two there is dropped)."""
    out = []
    try:
        with fopen_nofollow(events_path(data_dir), "rb") as f:     # a planted fifo: refused, not waited on
            if tail_bytes is not None:
                size = os.fstat(f.fileno()).st_size
                if size > tail_bytes:
                    f.seek(size - tail_bytes)
                    f.readline()            # the rest of a line that began before the tail
            for line in f:
                try:
                    ev = json.loads(line)
                except ValueError:          # not JSON, not UTF-8
                    continue
                if isinstance(ev, dict):
                    out.append(ev)
    except FileNotFoundError:
        pass
    return out


def with_events(status, data_dir, tail_bytes=EVENTS_TAIL):
    """status plus what only the event log knows, where status does not say it already: a reader's wait in
    progress (wait_shard, wait_started: a "wait_start" with a reader and no "wait_end" yet) and the shard
    in training (the last "training_shard" event). Both start afresh at each downloader's "start"."""
    if status is None or (status.training_shard is not None and status.wait_started is not None):
        return status
    try:
        events = read_events(data_dir, tail_bytes)
    except (OSError, ConfigError):          # (UnsafePathError: a planted link) the snapshot as it is
        return status
    waits, training = {}, None
    for ev in events:
        name, shard, t = ev.get("event"), ev.get("shard"), ev.get("t")
        if name == "start":
            waits, training = {}, None
        elif name == "stopped":
            waits = {}
        elif name == "wait_start" and ev.get("reader") is not None and isinstance(t, (int, float)):
            waits.setdefault((shard, ev.get("reader")), t)
        elif name == "wait_end":
            waits.pop((shard, ev.get("reader")), None)
        elif name == "training_shard" and isinstance(shard, int):
            training = shard
    change = {}
    if status.training_shard is None and training is not None:
        change["training_shard"] = training
    if status.wait_started is None and waits and status.state in ("starting", "running"):
        (shard, _), t0 = min(waits.items(), key=lambda kv: kv[1])
        change.update(wait_shard=shard if isinstance(shard, int) else None, wait_started=float(t0))
    return replace(status, **change) if change else status


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def describe(data_dir, now=None):
    """(text, ok) for `shardstream status`: the rendered status, or why there is none / it is stale."""
    text, code = _describe(data_dir, now)
    return text, code == 0


def _describe(data_dir, now=None):
    """(text, exit code): 0 a live or cleanly stopped downloader, 1 none / stale / crashed, 2 a status.json
    that is not a status file."""
    now = time.time() if now is None else now
    try:
        st = with_events(read_status(data_dir), data_dir)
        if st is not None:
            text = st.render(now)
    except ConfigError as e:
        return str(e), 2
    except (TypeError, ValueError, OverflowError) as e:      # right types, values render() cannot show
        return str(_not_ours(status_path(data_dir), f"{type(e).__name__}: {e}")), 2
    if st is None:
        return (f"no status in {data_dir}: no StreamingDownloader or `shardstream download` has run with this "
                f"data dir (give --data-dir, or set SHARDSTREAM_DATA_DIR)"), 1
    age = now - st.updated
    if st.state in ("stopped", "crashed"):
        who = "`shardstream download`" if st.kind == "download" else "the downloader"
        return (text + f"\n({who} {st.state} {age:.0f}s ago; this is its last status)",
                1 if st.state == "crashed" else 0)
    if age > STALE_SECONDS:
        why = ""
        if st.host == socket.gethostname() and st.pid and not _process_alive(st.pid):
            why = f"; process {st.pid} is gone (killed or crashed without stopping)"
        return text + f"\nSTALE: no update for {age:.0f}s{why}", 1
    return text, 0


def _interval(text):
    """--interval: seconds > 0, finite."""
    return positive_number(text, "seconds, e.g. 1 or 0.5")


def cli(argv):
    from .settings import read
    from .shards import default_data_dir
    p = argparse.ArgumentParser(prog="shardstream status",
                                description="Show a StreamingDownloader's or a `shardstream download`'s status (from "
                                            "<data-dir>/status.json and its event log).")
    p.add_argument("--data-dir", default=None, help="the downloader's data dir (default: $SHARDSTREAM_DATA_DIR, "
                                                    "else nanochat's for $SHARDSTREAM_DATASET)")
    p.add_argument("--watch", action="store_true", help="refresh every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=_interval, default=1.0, help="seconds between refreshes with --watch")
    p.add_argument("--json", action="store_true", help="print the raw status.json")
    args = p.parse_args(argv)
    try:
        data_dir = Path(args.data_dir or read("SHARDSTREAM_DATA_DIR")
                        or default_data_dir(read("SHARDSTREAM_DATASET")))
    except ConfigError as e:
        print(f"shardstream status: {e}", file=sys.stderr)
        return 2
    if args.json:
        try:
            st = with_events(read_status(data_dir), data_dir)
        except ConfigError as e:
            print(f"shardstream status: {e}", file=sys.stderr)
            return 2
        print(json.dumps(st.to_dict(), indent=1) if st else "null")
        return 0 if st else 1
    if not args.watch:
        text, code = _describe(data_dir)
        print(f"shardstream status: {text}" if code == 2 else text, file=sys.stderr if code == 2 else sys.stdout)
        return code
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    try:
        while True:     # a bad or missing status.json is shown, not fatal: a downloader may start and rewrite it
            text, _ = _describe(data_dir)
            print(f"{clear}{time.strftime('%H:%M:%S')}  shardstream status --data-dir {data_dir}\n{text}", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
