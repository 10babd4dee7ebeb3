"""What the downloader reports: its status and its events, as pure functions of a snapshot and counters.

The executor (downloader.py) keeps `Counts` (the run's running counts) beside its scheduler state. Under
its lock it asks:

- `progress(snap, counts, ...)` -> a frozen `Progress`: everything the status says, copied out of the
  live mappings (so it may leave the lock);
- `event_record(snap, event, shard, ...)` -> the dict one events.jsonl line holds (the time is the
  event's, not the write's: records wait in a queue for the status thread).

Outside the lock, `status(progress, origin, free)` -> `DownloaderStatus` (status.py), with the free disk
space the caller measured there (statvfs is never done under the lock). The status thread writes both
files; nothing here touches a file or a clock.
"""
from collections import Counter, deque
from dataclasses import dataclass, field

from . import schedule
from .status import DownloaderStatus

RATE_WINDOW = 5.0               # seconds of transfer history behind "download MB/s (recent)"


@dataclass
class Counts:
    """The run's running counts (the executor bumps them under its lock)."""
    retries: int = 0                # failed tries retried: inside a fetch call, and fetch calls retried later
    failures: int = 0               # shards that failed permanently or past the deadline
    waits: int = 0                  # reader waits (start()'s initial buffer is not one)
    wait_seconds: float = 0.0
    downloaded_bytes: int = 0
    checked: Counter = field(default_factory=Counter)   # what vouched for each download: "sha256", ...
    rate: deque = field(default_factory=deque)          # (monotonic time, bytes) of recent transfers

    def add_bytes(self, n, now):
        """n bytes landed at monotonic time now (the history keeps RATE_WINDOW seconds)."""
        self.downloaded_bytes += n
        self.rate.append((now, n))
        while self.rate and self.rate[0][0] < now - RATE_WINDOW:
            self.rate.popleft()


@dataclass(frozen=True)
class Origin:
    """Who reports: fixed for a downloader's life."""
    total_shards: int
    val_shard: int | None
    data_dir: str
    source: str                     # redacted
    pid: int
    host: str
    val_shards: tuple | None = None  # every val shard (None: just val_shard)
    label: object = field(default=None, compare=False)   # shard -> "path (cache name)" when the source names
                                    # files by path (a manifest), else None: nanochat's names say it all


def shard_paths(p, origin):
    """{str(shard): label} for the shards a status names (in flight, on disk, skipped, the loader's), when
    the origin labels them; {} for nanochat's layout."""
    if origin.label is None:
        return {}
    named = {*p.in_flight, *p.cached, *p.skipped, *(() if p.current_shard is None else (p.current_shard,))}
    return {str(s): origin.label(s) for s in sorted(named)}


@dataclass(frozen=True)
class Progress:
    """One moment of a downloader, copied out of its state (safe to use outside its lock)."""
    state: str
    verified: int
    ahead: int
    window: int
    current_shard: int | None
    bytes_on_disk: int
    reserved_bytes: int
    budget: int | None
    download_mbps: float
    downloaded_bytes: int
    in_flight: tuple
    cached: tuple
    retries: int
    failures: int
    skipped: tuple
    waits: int
    wait_seconds: float
    checked: dict
    error: str | None


def recent_mbps(rate, now, window=RATE_WINDOW):
    """MB/s over the (time, bytes) history of the last `window` seconds (spans under 0.5 s count as 0.5)."""
    recent = [(t, n) for t, n in rate if t >= now - window]
    if not recent:
        return 0.0
    return sum(n for _, n in recent) / max(now - recent[0][0], 0.5) / 1e6


def ready_ahead(snap):
    """Verified shards in the window ahead of the slowest reader."""
    return sum(1 for s in schedule.ahead(snap) if s in snap.files)


def progress(snap, counts, *, state, disk_bytes, reserved_bytes, now, error=None):
    """The Progress of a downloader whose scheduler sees `snap` (counts: its Counts; disk_bytes and
    reserved_bytes: the cache's; now: monotonic; error: the exception that stopped downloading)."""
    return Progress(
        state=state, verified=snap.verified, ahead=ready_ahead(snap), window=snap.window,
        current_shard=schedule.reader_shard(snap), bytes_on_disk=disk_bytes, reserved_bytes=reserved_bytes,
        budget=snap.budget, download_mbps=round(recent_mbps(counts.rate, now), 3),
        downloaded_bytes=counts.downloaded_bytes, in_flight=tuple(sorted(snap.inflight)),
        cached=tuple(sorted(snap.files)), retries=counts.retries, failures=counts.failures,
        skipped=tuple(sorted(snap.skipped)), waits=counts.waits, wait_seconds=round(counts.wait_seconds, 4),
        checked=dict(counts.checked), error=None if error is None else f"{type(error).__name__}: {error}")


def status(p, origin, free, updated):
    """The DownloaderStatus of Progress p (free: free disk bytes, None when unknown; updated: unix time)."""
    return DownloaderStatus(
        state=p.state, shards_verified=p.verified, total_shards=origin.total_shards, ahead=p.ahead,
        buffer_size=p.window, current_shard=p.current_shard, bytes_on_disk=p.bytes_on_disk,
        reserved_bytes=p.reserved_bytes, budget=p.budget, free_disk_bytes=free, download_mbps=p.download_mbps,
        downloaded_bytes=p.downloaded_bytes, in_flight=p.in_flight, cached=p.cached, retries=p.retries,
        failures=p.failures, skipped=p.skipped, waits=p.waits, wait_seconds=p.wait_seconds, checked=p.checked,
        error=p.error, val_shard=origin.val_shard, data_dir=origin.data_dir, source=origin.source,
        pid=origin.pid, host=origin.host, updated=updated, val_shards=origin.val_shards,
        shard_paths=shard_paths(p, origin))


def event_record(snap, event, shard=None, *, disk_bytes, t, **extra):
    """One events.jsonl record (t: the event's unix time): the event, its shard, and the fields every
    downloader event carries (bytes_on_disk, budget, ahead, reader_shard, window), then `extra`."""
    return {"t": round(t, 4), "event": event, "shard": shard, "bytes_on_disk": disk_bytes, "budget": snap.budget,
            "ahead": ready_ahead(snap), "reader_shard": schedule.reader_shard(snap), "window": snap.window, **extra}
