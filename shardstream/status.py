"""What the downloader is doing, for programs and for people.

- `DownloaderStatus`: a frozen snapshot (`StreamingDownloader.get_status()`), with `line()` for the
  trainer's one-line log and `render()` for a person.
- `write_status` / `read_status`: the snapshot as `<data_dir>/status.json`, replaced atomically.
- `EventLog`: `<data_dir>/events.jsonl`, one JSON object per shard event (t, event, shard, bytes_on_disk,
  budget, ahead, reader_shard, ...) for the timeline plot.
- `cli(argv)`: `shardstream status [--data-dir DIR] [--watch]`, the better `watch ls` (default data dir:
  SHARDSTREAM_DATA_DIR, else nanochat's for SHARDSTREAM_DATASET, as the downloader chooses it).
"""
import argparse
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

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


def write_status(data_dir, status):
    """Write status.json atomically (a temp file in the same dir, then os.replace)."""
    path = status_path(data_dir)
    tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(status.to_dict(), f, indent=1)
    os.replace(tmp, path)


def read_status(data_dir):
    """The DownloaderStatus in data_dir's status.json, or None when there is none."""
    try:
        with open(status_path(data_dir)) as f:
            return DownloaderStatus.from_dict(json.load(f))
    except FileNotFoundError:
        return None


class EventLog:
    """Appends one JSON object per line to events.jsonl. Thread-safe; each line is flushed at once."""

    def __init__(self, data_dir):
        self.path = Path(data_dir) / EVENTS_FILE
        self._lock = threading.Lock()
        self._f = open(self.path, "a", buffering=1)

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
        with open(Path(data_dir) / EVENTS_FILE) as f:
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
    now = time.time() if now is None else now
    try:
        st = read_status(data_dir)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        return f"{status_path(data_dir)} is not a status file this version understands ({e})", False
    if st is None:
        return (f"no status in {data_dir}: no StreamingDownloader has run with this data dir "
                f"(give --data-dir, or set SHARDSTREAM_DATA_DIR)"), False
    text = st.render(now)
    age = now - st.updated
    if st.state in ("stopped", "crashed"):
        return text + f"\n(the downloader {st.state} {age:.0f}s ago; this is its last status)", st.state != "crashed"
    if age > STALE_SECONDS:
        why = ""
        if st.host == socket.gethostname() and st.pid and not _process_alive(st.pid):
            why = f"; process {st.pid} is gone (killed or crashed without stopping)"
        return text + f"\nSTALE: no update for {age:.0f}s{why}", False
    return text, True


def cli(argv):
    from .errors import ConfigError
    from .shards import DEFAULT_DATASET, default_data_dir
    p = argparse.ArgumentParser(prog="shardstream status",
                                description="Show a StreamingDownloader's status (from <data-dir>/status.json).")
    p.add_argument("--data-dir", default=None, help="the downloader's data dir (default: $SHARDSTREAM_DATA_DIR, "
                                                    "else nanochat's for $SHARDSTREAM_DATASET)")
    p.add_argument("--watch", action="store_true", help="refresh every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
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
        st = read_status(data_dir)
        print(json.dumps(st.to_dict(), indent=1) if st else "null")
        return 0 if st else 1
    if not args.watch:
        text, ok = describe(data_dir)
        print(text)
        return 0 if ok else 1
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            text, _ = describe(data_dir)
            print(f"{clear}{time.strftime('%H:%M:%S')}  shardstream status --data-dir {data_dir}\n{text}", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
