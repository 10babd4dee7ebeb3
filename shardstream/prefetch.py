"""Adaptive prefetch: how many shards to keep ahead of the reader, sized from measured rates.

A fixed window of 5 is too small when the link is slow or the model fast, and too big for the disk when
the link is fast. The read order is known and both rates can be measured, so the window sizes itself:

    shard p+n enters the window when the reader moves to shard p, and is needed n reads later, so
        n >= (time to download one shard) / (time to read one shard)
    planned for the slow tail of recent downloads (the `tail` quantile, times 1 + `margin`):

        base = ceil(tail_quantile(download seconds/byte) * (1 + margin) / median(read seconds/byte))

    then: + `grow_on_wait` shards after every reader wait (given back one at a time after `calm_reads`
    reads without a wait), clamped to [min_ahead, max_ahead], and to what the disk budget can hold (the
    `room` the downloader passes in: shards that fit beside the pinned and leased ones).

Shard sizes cancel out (both rates are per byte), so the window is in shards. Until a download and a
read have been measured, the window is `start_ahead`.

Parallel transfers: one connection at a time gets the next shard fastest when it fills the link (a
second one would halve the urgent shard's speed). But one connection often does not fill it (a CDN
caps each connection; TCP ramps up again after every idle gap), so the meter keeps the link's rate at
each number of transfers in flight (`level_bps`), and the rule runs as many as it takes: all `workers`
when behind (the busy link slower than the reader), else the fewest that measured within LEVEL_GAIN of
the best, trying one more (k+1) once the current level has been measured (`parallel_transfers`), but
only while the readers have k+1 verified shards ready (`ready`, counted by schedule.transfer_limit): a
trial splits the link, and a reader needing the next shard meanwhile waited (W/R = 1.25: 0.6 %). The downloader adds one transfer for a shard a reader waits for that is not in
flight (an on-demand or val shard must not queue behind a prefetch).

`PrefetchController` holds the measurements (`RateMeter`) and the wait bump; the rule itself is the pure
function `window_size(policy, rates, bump, room)`. Neither is thread-safe: the downloader calls them with
its lock held.
"""
import math
from collections import deque
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class PrefetchPolicy:
    """How the window sizes itself (see the module docstring for the rule)."""
    min_ahead: int = 2              # never fewer shards ahead (when the budget allows)
    max_ahead: int = 64             # never more
    start_ahead: int | None = None  # before anything is measured (None: the downloader's buffer_size)
    tail: float = 0.9               # quantile of recent download times planned for (1.0 = the slowest)
    margin: float = 0.5             # extra fraction on top of that
    history: int = 8                # recent downloads / reads the estimates use
    grow_on_wait: int = 1           # shards added after every reader wait
    calm_reads: int = 16            # reads without a wait before one added shard is given back

    def __post_init__(self):
        for name, lo in (("min_ahead", 1), ("max_ahead", 1), ("history", 1), ("grow_on_wait", 0),
                         ("calm_reads", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"PrefetchPolicy.{name} must be an int >= {lo}, got {v!r}")
        if self.max_ahead < self.min_ahead:
            raise ConfigError(f"PrefetchPolicy.max_ahead={self.max_ahead} is below min_ahead={self.min_ahead}")
        if self.start_ahead is not None and (isinstance(self.start_ahead, bool) or not isinstance(self.start_ahead, int)
                                             or self.start_ahead < 1):
            raise ConfigError(f"PrefetchPolicy.start_ahead must be an int >= 1 or None, got {self.start_ahead!r}")
        if isinstance(self.tail, bool) or not isinstance(self.tail, (int, float)) or not 0 < self.tail <= 1:
            raise ConfigError(f"PrefetchPolicy.tail must be a quantile in (0, 1], got {self.tail!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or self.margin < 0:
            raise ConfigError(f"PrefetchPolicy.margin must be a number >= 0, got {self.margin!r}")


@dataclass(frozen=True)
class Rates:
    """What has been measured recently (None: not yet)."""
    download_spb: float | None = None       # one shard's download, seconds per byte: the `tail` quantile
    download_bps: float | None = None       # one shard's download, bytes/s: the median
    aggregate_bps: float | None = None      # all transfers together, while any runs
    consume_spb: float | None = None        # the reader, seconds per byte: the median
    downloads: int = 0                      # samples behind the estimates
    reads: int = 0
    level_bps: tuple = ()                   # ((transfers in flight, link bytes/s at that many), ...) measured

    @property
    def consume_bps(self):
        return None if not self.consume_spb else 1.0 / self.consume_spb


@dataclass(frozen=True)
class Window:
    """One decision: the window's size, and why."""
    size: int
    base: int | None            # what the rates alone ask for (None: not measured yet)
    bump: int                   # added after waits
    room: int | None            # what the budget holds (None: no budget)
    reason: str


def quantile(values, q):
    """The q-quantile of values (nearest rank, q in (0, 1]); None for no values."""
    vals = sorted(values)
    if not vals:
        return None
    return vals[min(len(vals) - 1, max(0, math.ceil(q * len(vals)) - 1))]


def window_size(policy, rates, bump=0, room=None, start_ahead=5):
    """The rule: shards to keep ahead of the reader (a Window). `room`: shards the budget holds beyond
    the pinned and leased ones (None: no budget); `start_ahead`: the size before any measurement when
    the policy does not set one."""
    start = policy.start_ahead or start_ahead
    if rates.download_spb and rates.consume_spb:
        base = max(1, math.ceil(rates.download_spb * (1 + policy.margin) / rates.consume_spb - 1e-9))
        size, why = base + bump, (f"download {1 / rates.download_spb / 1e6:.2f} MB/s (slow tail), reader "
                                  f"{rates.consume_bps / 1e6:.2f} MB/s")
    else:
        base = None
        size, why = start + bump, "not measured yet"
    if bump:
        why += f", +{bump} after waits"
    size = min(max(size, policy.min_ahead), policy.max_ahead)
    if room is not None and size > max(1, room):
        size = max(1, room)
        why += f", cut to {size} by the budget"
    return Window(size, base, bump, room, why)


LEVEL_SECONDS = 2.0         # a level counts as measured after this long with that many transfers in flight
LEVEL_GAIN = 1.05           # another transfer in flight pays when the link moved this much more with it


def parallel_transfers(rates, workers, ready=None):
    """How many transfers may run at once: all `workers` when behind (the busy link is slower than the
    reader); else the fewest (k) whose measured link rate is within LEVEL_GAIN of the best measured, and
    k+1 while that level has not been measured (one connection may not fill the link) and the readers
    have at least k+1 verified shards `ready` ahead (None: do not ask): the trial splits the link, so its
    shards land after about k+1 shard-downloads, which a reader with fewer shards ready would wait for."""
    if rates.aggregate_bps and rates.consume_bps and rates.aggregate_bps < rates.consume_bps:
        return workers
    levels = dict(rates.level_bps)
    if not levels:
        return 1
    best = max(levels.values())
    k = min(k for k, bps in levels.items() if bps * LEVEL_GAIN >= best)
    if (ready is None or ready >= k + 1) and k + 1 <= workers and k + 1 not in levels and max(levels) <= k:
        return k + 1                        # not tried yet: measure it
    return min(k, workers)


class RateMeter:
    """Recent per-shard downloads, the link while busy, and the reader's pace."""

    def __init__(self, history=8):
        self.history = history
        self.downloads = deque(maxlen=history)      # seconds per byte of each completed download
        self.reads = deque(maxlen=history)          # seconds per byte of each shard read
        self.marks = deque(maxlen=history + 1)      # (busy seconds, bytes) at each completed download
        self.active = 0
        self.busy = 0.0
        self.busy_since = None
        self.bytes = 0
        self.level_bytes = {}       # transfers in flight -> bytes received while that many were
        self.level_seconds = {}     # transfers in flight -> seconds that many were
        self._level_since = None
        self.version = 0            # bumped by every measurement: rates() is recomputed only when it moved

    def _account(self, now):
        if self.active > 0 and self._level_since is not None:
            self.level_seconds[self.active] = self.level_seconds.get(self.active, 0.0) + now - self._level_since
        self._level_since = now

    def transfer_started(self, now):
        self.version += 1
        self._account(now)
        if self.active == 0:
            self.busy_since = now
        self.active += 1

    def transfer_ended(self, now):
        self.version += 1
        self._account(now)
        self.active = max(0, self.active - 1)
        if self.active == 0 and self.busy_since is not None:
            self.busy += now - self.busy_since
            self.busy_since = None

    def add_bytes(self, n):
        self.version += 1
        self.bytes += n
        if self.active > 0:
            self.level_bytes[self.active] = self.level_bytes.get(self.active, 0) + n

    def busy_seconds(self, now):
        return self.busy + (now - self.busy_since if self.busy_since is not None else 0.0)

    def download_done(self, nbytes, seconds, now):
        self.version += 1
        if nbytes > 0 and seconds > 0:
            self.downloads.append(seconds / nbytes)
        self.marks.append((self.busy_seconds(now), self.bytes))

    def read_done(self, nbytes, seconds):
        self.version += 1
        if nbytes > 0 and seconds > 0:
            self.reads.append(seconds / nbytes)

    def rates(self, tail=0.9):
        agg = None
        if len(self.marks) >= 2:
            (b0, n0), (b1, n1) = self.marks[0], self.marks[-1]
            if b1 - b0 > 0:
                agg = (n1 - n0) / (b1 - b0)
        spb = quantile(self.downloads, tail)
        med = quantile(self.downloads, 0.5)
        levels = tuple(sorted((k, self.level_bytes.get(k, 0) / secs) for k, secs in self.level_seconds.items()
                              if secs >= LEVEL_SECONDS))
        return Rates(download_spb=spb, download_bps=1.0 / med if med else None, aggregate_bps=agg,
                     consume_spb=quantile(self.reads, 0.5), downloads=len(self.downloads), reads=len(self.reads),
                     level_bps=levels)


class LinkClock:
    """Which transfers hold the link now, and how long each one's bytes took: what a RateMeter hears
    (transfer_started / transfer_ended as a transfer starts or stops receiving, download_done when it
    ends). meter None (a fixed window): only the bookkeeping. Not thread-safe (the downloader's lock)."""

    def __init__(self, meter=None):
        self.meter = meter
        self.begun = {}             # shard -> time its transfer began
        self.transferring = set()   # shards whose bytes arrive now (they hold the link)
        self.body_seconds = {}      # shard -> seconds its bytes took (verify and commit not counted)

    def begin(self, shard, now):
        self.begun[shard] = now
        self.hold(shard, True, now)

    def hold(self, shard, busy, now):
        """shard's transfer starts (busy) or stops holding the link: its bytes arrive, or it verifies,
        commits or backs off. False when nothing changed."""
        if busy == (shard in self.transferring):
            return False
        if busy:
            self.transferring.add(shard)
        else:
            self.transferring.discard(shard)
            if shard in self.begun:
                self.body_seconds[shard] = now - self.begun[shard]
        if self.meter is not None:
            (self.meter.transfer_started if busy else self.meter.transfer_ended)(now)
        return True

    def end(self, shard, nbytes, now):
        """shard's transfer is over (nbytes: what it brought; 0 for none). True when it was measured."""
        self.hold(shard, False, now)
        began = self.begun.pop(shard, None)
        seconds = self.body_seconds.pop(shard, None)
        if self.meter is None or not nbytes or began is None:
            return False
        self.meter.download_done(nbytes, seconds if seconds is not None else now - began, now)
        return True


class PrefetchController:
    """The adaptive window of one downloader: measurements, the wait bump, and the current decision."""

    def __init__(self, policy, start_ahead=5):
        self.policy = policy
        self.start_ahead = start_ahead
        self.meter = RateMeter(policy.history)
        self.bump = 0
        self.calm = 0
        self._rates = None          # (meter version, Rates): one computation per measurement, not per snapshot

    def on_wait(self):
        """A reader had to wait for a planned shard: grow."""
        self.bump = min(self.bump + self.policy.grow_on_wait, self.policy.max_ahead)
        self.calm = 0

    def on_read(self, waited):
        """A reader got a planned shard; after calm_reads reads without a wait, give one shard back."""
        if waited:
            return
        self.calm += 1
        if self.calm >= self.policy.calm_reads and self.bump > 0:
            self.bump -= 1
            self.calm = 0

    def rates(self):
        """The meter's Rates, recomputed only after a new measurement (the downloader asks at every
        snapshot; sorting the history each time would be wasted)."""
        if self._rates is None or self._rates[0] != self.meter.version:
            self._rates = (self.meter.version, self.meter.rates(self.policy.tail))
        return self._rates[1]

    def window(self, room=None):
        return window_size(self.policy, self.rates(), self.bump, room, self.start_ahead)

    def parallel(self, workers, ready=None):
        return parallel_transfers(self.rates(), workers, ready)
