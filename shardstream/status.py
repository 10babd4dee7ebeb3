"""What the downloader is doing, for programs and for people.

- `DownloaderStatus`: a frozen snapshot (`StreamingDownloader.get_status()`), with `line()` for the
  trainer's one-line log and `render()` for a person.
- `write_status` / `read_status`: the snapshot as `<data_dir>/status.json`, replaced atomically;
  read_status raises ConfigError naming the file when it is not a shardstream status file.
- `EventLog`: `<data_dir>/events.jsonl`, one JSON object per shard event (t, event, shard, bytes_on_disk,
  budget, ahead, reader_shard, ...) for the timeline plot.
- `cli(argv)`: `shardstream status [--data-dir DIR] [--watch]`, the better `watch ls` (default data dir:
  SHARDSTREAM_DATA_DIR, else nanochat's for SHARDSTREAM_DATASET, as the downloader chooses it).

The data dir is shared ground: both files are written through safefs (a symbolic link planted under
either name, or under the temp file's, is never written through).
"""
import argparse
import json
import math
import os
import secrets
import socket
import stat
import sys
import threading
import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .errors import ConfigError, UnsafePathError
from .safefs import fopen_nofollow, open_nofollow
from .shards import shard_name

STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"
STALE_SECONDS = 10.0          # a running downloader rewrites status.json every ~0.5 s


@dataclass(frozen=True)
class DownloaderStatus:
    """One snapshot of a StreamingDownloader."""
    state: str                      # created, starting, running, stopped, crashed
    shards_verified: int            # train shards of the plan verified so far (downloaded or reused)
    total_shards: int               # train shards in the plan
    ahead: int                      # verified shards in the window ahead of the reader
    buffer_size: int                # the window's size
    current_shard: int | None       # the shard the reader last asked for
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
    waits: int = 0                  # times the reader had to wait
    wait_seconds: float = 0.0       # total seconds the reader spent waiting
    error: str | None = None        # the error that stopped downloading (disk floor, crash), if any
    val_shard: int | None = None
    data_dir: str = ""
    source: str = ""
    pid: int = 0
    host: str = ""
    updated: float = 0.0            # unix time of this snapshot

    def to_dict(self):
        d = asdict(self)
        for k in ("in_flight", "cached", "skipped"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("in_flight", "cached", "skipped"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def line(self):
        """The seed's status line: `7/10 shards downloaded, buffer: 5/5, current: shard_00001`."""
        cur = shard_name(self.current_shard).removesuffix(".parquet") if self.current_shard is not None else "-"
        disk = _mb(self.bytes_on_disk) + (f"/{_mb(self.budget)}" if self.budget else "")
        s = (f"{self.shards_verified}/{self.total_shards} shards downloaded, buffer: {self.ahead}/{self.buffer_size}, "
             f"current: {cur}, disk: {disk}, {self.download_mbps:.1f} MB/s, waited {self.wait_seconds:.1f}s")
        if self.skipped:
            s += f", skipped: {len(self.skipped)}"
        if self.error:
            s += f", ERROR: {self.error}"
        return s

    def render(self, now=None):
        """A few lines for a person (`shardstream status`)."""
        now = time.time() if now is None else now
        age = now - self.updated
        cur = shard_name(self.current_shard) if self.current_shard is not None else "(reader has not started)"
        budget = _mb(self.budget) if self.budget else "none"
        free = _mb(self.free_disk_bytes) if self.free_disk_bytes is not None else "?"
        lines = [
            f"downloader   {self.state}  (pid {self.pid} on {self.host}, updated {age:.1f}s ago)",
            f"source       {self.source}",
            f"data dir     {self.data_dir}",
            f"shards       {self.shards_verified}/{self.total_shards} verified, val shard {self.val_shard}",
            f"reader       at {cur}; {self.ahead}/{self.buffer_size} ready ahead; "
            f"waited {self.waits}x, {self.wait_seconds:.1f}s in all",
            f"disk         {_mb(self.bytes_on_disk)} on disk (+{_mb(self.reserved_bytes)} reserved), "
            f"budget {budget}, free {free}",
            f"network      {self.download_mbps:.2f} MB/s recent, {_mb(self.downloaded_bytes)} this run; "
            f"downloading {_ids(self.in_flight)}",
            f"on disk      {_ids(self.cached)}",
            f"faults       {self.retries} retries, {self.failures} failures, skipped {_ids(self.skipped)}",
        ]
        if self.error:
            lines.append(f"ERROR        {self.error}")
        return "\n".join(lines)


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
    return Path(data_dir) / STATUS_FILE


def _temp_name():
    # unguessable, so nobody can plant a link under it in advance; O_EXCL refuses one anyway
    return f".{STATUS_FILE}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def write_status(data_dir, status):
    """Write status.json atomically: a new temp file in the same dir (O_EXCL|O_NOFOLLOW), then os.replace,
    which replaces a link planted at status.json instead of writing through it."""
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
        self.path = Path(data_dir) / EVENTS_FILE
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


def read_events(data_dir):
    """Every event in data_dir's events.jsonl, as dicts (a torn last line is ignored)."""
    out = []
    try:
        with fopen_nofollow(Path(data_dir) / EVENTS_FILE) as f:     # a planted fifo: refused, not waited on
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return out


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
        st = read_status(data_dir)
        if st is not None:
            text = st.render(now)
    except ConfigError as e:
        return str(e), 2
    except (TypeError, ValueError, OverflowError) as e:      # right types, values render() cannot show
        return str(_not_ours(status_path(data_dir), f"{type(e).__name__}: {e}")), 2
    if st is None:
        return (f"no status in {data_dir}: no StreamingDownloader has run with this data dir "
                f"(give --data-dir, or set SHARDSTREAM_DATA_DIR)"), 1
    age = now - st.updated
    if st.state in ("stopped", "crashed"):
        return (text + f"\n(the downloader {st.state} {age:.0f}s ago; this is its last status)",
                1 if st.state == "crashed" else 0)
    if age > STALE_SECONDS:
        why = ""
        if st.host == socket.gethostname() and st.pid and not _process_alive(st.pid):
            why = f"; process {st.pid} is gone (killed or crashed without stopping)"
        return text + f"\nSTALE: no update for {age:.0f}s{why}", 1
    return text, 0


def _interval(text):
    """--interval: seconds > 0, finite."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0 (e.g. 1 or 0.5)")
    return value


def cli(argv):
    from .shards import DEFAULT_DATASET, default_data_dir
    p = argparse.ArgumentParser(prog="shardstream status",
                                description="Show a StreamingDownloader's status (from <data-dir>/status.json).")
    p.add_argument("--data-dir", default=None, help="the downloader's data dir (default: $SHARDSTREAM_DATA_DIR, "
                                                    "else nanochat's for $SHARDSTREAM_DATASET)")
    p.add_argument("--watch", action="store_true", help="refresh every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=_interval, default=1.0, help="seconds between refreshes with --watch")
    p.add_argument("--json", action="store_true", help="print the raw status.json")
    args = p.parse_args(argv)
    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        try:
            data_dir = default_data_dir(os.environ.get("SHARDSTREAM_DATASET") or DEFAULT_DATASET)
        except ConfigError as e:
            print(f"shardstream status: SHARDSTREAM_DATASET: {e}", file=sys.stderr)
            return 2
    if args.json:
        try:
            st = read_status(data_dir)
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
