"""Adaptive prefetch: the sizing rule on hand-made rates, the measurements, and a real streaming run whose
server slows down mid-run (the window grows; the reader does not wait once the new rate is learned)."""
import time

import pytest

from shardstream.downloader import DiskPolicy, StreamingDownloader
from shardstream.errors import ConfigError
from shardstream.fetch import FetchPolicy
from shardstream.prefetch import (PrefetchController, PrefetchPolicy, RateMeter, Rates, parallel_transfers, quantile,
                                  window_size)
from shardstream.sample import make_sample
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.source import Source
from shardstream.status import read_events

MB = 1e6


def rates(download_s, read_s, nbytes=MB, agg=None):
    """Rates of shards of nbytes downloading in download_s and read in read_s seconds."""
    return Rates(download_spb=download_s / nbytes, download_bps=nbytes / download_s, aggregate_bps=agg,
                 consume_spb=read_s / nbytes, downloads=8, reads=8)


# --- the rule

def test_before_anything_is_measured_the_window_is_the_start_size():
    pol = PrefetchPolicy()
    assert window_size(pol, Rates(), start_ahead=5).size == 5
    assert window_size(pol, Rates(), start_ahead=5).base is None
    assert window_size(PrefetchPolicy(start_ahead=3), Rates(), start_ahead=5).size == 3
    assert window_size(PrefetchPolicy(min_ahead=4), Rates(), start_ahead=1).size == 4


@pytest.mark.parametrize("download_s, read_s, margin, want", [
    (0.8, 1.0, 0.5, 2),         # W/R = 1.25: ceil(0.8 * 1.5) = 2
    (0.25, 1.0, 0.5, 1),        # W/R = 4: one ahead is enough...
    (3.0, 1.0, 0.5, 5),         # downloads slower than reads: ceil(4.5)
    (2.0, 1.0, 0.0, 2),         # exact multiples do not round up
    (1.0, 0.1, 1.0, 20),
])
def test_base_is_download_tail_over_read_time_with_margin(download_s, read_s, margin, want):
    pol = PrefetchPolicy(min_ahead=1, max_ahead=100, margin=margin)
    w = window_size(pol, rates(download_s, read_s))
    assert w.base == want and w.size == want


def test_shard_size_cancels_out():
    pol = PrefetchPolicy(min_ahead=1)
    assert window_size(pol, rates(3.0, 1.0, nbytes=100 * MB)).size == window_size(pol, rates(3.0, 1.0)).size == 5


def test_min_max_and_budget_bound_the_window():
    pol = PrefetchPolicy(min_ahead=2, max_ahead=6, margin=0.5)
    assert window_size(pol, rates(0.1, 1.0)).size == 2                  # rule says 1, min says 2
    assert window_size(pol, rates(10.0, 1.0)).size == 6                 # rule says 15, max says 6
    w = window_size(pol, rates(10.0, 1.0), room=3)
    assert w.size == 3 and "budget" in w.reason                          # the budget is tight: shrink
    assert window_size(pol, rates(10.0, 1.0), room=0).size == 1         # never below one
    assert window_size(pol, rates(10.0, 1.0), room=50).size == 6


def test_waits_add_to_the_rule():
    pol = PrefetchPolicy(min_ahead=1, margin=0.5)
    w = window_size(pol, rates(0.8, 1.0), bump=3)
    assert w.base == 2 and w.size == 5 and "after waits" in w.reason


def test_quantile_is_nearest_rank():
    assert quantile([], 0.9) is None
    assert quantile([5, 1, 3], 0.5) == 3
    assert quantile(list(range(1, 11)), 0.9) == 9
    assert quantile(list(range(1, 11)), 1.0) == 10


# --- the measurements

def test_meter_plans_for_the_slow_tail_of_recent_downloads():
    m = RateMeter(history=8)
    for s in [1.0] * 7 + [4.0]:                   # one slow download among eight
        m.download_done(MB, s, now=0.0)
    assert m.rates(tail=1.0).download_spb == pytest.approx(4.0 / MB)
    assert m.rates(tail=0.5).download_spb == pytest.approx(1.0 / MB)
    assert m.rates().download_bps == pytest.approx(MB)
    for _ in range(8):                            # the slow one ages out of the history
        m.download_done(MB, 1.0, now=0.0)
    assert m.rates(tail=1.0).download_spb == pytest.approx(1.0 / MB)


def test_meter_aggregate_counts_busy_time_only():
    m = RateMeter()
    m.transfer_started(0.0)
    m.transfer_started(0.5)                       # two overlap
    m.add_bytes(2 * MB)
    m.download_done(MB, 1.0, now=1.0)
    m.transfer_ended(1.0)
    m.transfer_ended(2.0)                         # busy 0..2
    m.download_done(MB, 1.5, now=2.0)
    m.add_bytes(MB)
    m.transfer_started(10.0)                      # idle 2..10 does not count
    m.add_bytes(MB)
    m.transfer_ended(11.0)
    m.download_done(MB, 1.0, now=11.0)
    assert m.busy_seconds(11.0) == pytest.approx(3.0)
    assert m.rates().aggregate_bps == pytest.approx(2 * MB / 2.0)      # (4 MB - 2 MB) over busy 1 -> 3


def test_reads_give_the_consumption_rate():
    m = RateMeter()
    for s in (0.9, 1.0, 1.1):
        m.read_done(2 * MB, s)
    m.read_done(0, 5.0)                           # nothing to learn from an empty read
    assert m.rates().consume_spb == pytest.approx(1.0 / (2 * MB))
    assert m.rates().consume_bps == pytest.approx(2 * MB)


def test_controller_grows_after_a_wait_and_gives_it_back_when_calm():
    ctl = PrefetchController(PrefetchPolicy(min_ahead=1, calm_reads=3, margin=0.5), start_ahead=5)
    for _ in range(4):
        ctl.meter.download_done(MB, 0.8, now=0.0)
        ctl.meter.read_done(MB, 1.0)
    assert ctl.window().size == 2
    ctl.on_wait()
    ctl.on_read(waited=True)
    assert ctl.window().size == 3
    ctl.on_wait()
    assert ctl.window().size == 4
    for _ in range(3):
        ctl.on_read(waited=False)
    assert ctl.window().size == 3                 # one given back after 3 calm reads
    for _ in range(3):
        ctl.on_read(waited=False)
    assert ctl.window().size == 2
    for _ in range(9):
        ctl.on_read(waited=False)
    assert ctl.window().size == 2                 # never below the rule


def test_the_wait_bump_is_capped():
    ctl = PrefetchController(PrefetchPolicy(max_ahead=4))
    for _ in range(100):
        ctl.on_wait()
    assert ctl.bump == 4


def test_parallel_transfers_only_when_behind():
    fast_link = rates(0.5, 1.0, agg=2 * MB)
    slow_link = rates(0.5, 1.0, agg=0.5 * MB)
    assert parallel_transfers(fast_link, workers=4) == 1          # one connection keeps up: the next shard
    assert parallel_transfers(slow_link, workers=4) == 4          # gets the whole link; behind: all of them
    assert parallel_transfers(Rates(), workers=3) == 1


@pytest.mark.parametrize("kw, needle", [
    (dict(min_ahead=0), "min_ahead"),
    (dict(min_ahead=5, max_ahead=4), "below min_ahead"),
    (dict(tail=0), "tail"),
    (dict(tail=1.5), "tail"),
    (dict(margin=-1), "margin"),
    (dict(start_ahead=0), "start_ahead"),
    (dict(history=True), "history"),
])
def test_bad_policy_values_are_refused(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        PrefetchPolicy(**kw)


def test_the_downloader_refuses_an_unknown_prefetch(tmp_path):
    with pytest.raises(ConfigError, match="prefetch must be"):
        StreamingDownloader(2, data_dir=tmp_path, source=Source("http://127.0.0.1:9", 3), prefetch="fast")


# --- a real streaming run whose server slows down

N = 22
READ_S = 0.4                    # the reader spends this long on a shard


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    make_sample(d, N + 1, 400_000, seed=3, docs_per_row_group=64, row_groups=2)
    return d


def test_the_window_grows_when_the_rate_drops_and_the_reader_stops_waiting(shards_dir, tmp_path):
    size = max((shards_dir / shard_name(i)).stat().st_size for i in range(N + 1))
    r_bps = size / READ_S
    pol = PrefetchPolicy(min_ahead=1, max_ahead=8, margin=1.0, history=4, calm_reads=100)
    fetch = FetchPolicy(fsync=False, connect_timeout=5, stall_timeout=10, backoff_initial=0.02, backoff_max=0.1)
    before = 8
    got_waits, t_drop = [], None
    with ShardServer(shards_dir) as srv:                    # uncapped first: a download is quick
        with StreamingDownloader(N, data_dir=tmp_path / "data", source=Source(srv.url, N + 1), prefetch=pol,
                                 fetch_policy=fetch, disk_policy=DiskPolicy(0, 0), progress=False) as dl:
            for i in range(N):
                if i == before:
                    t_drop = time.time()
                    srv.set_rate(1.4 * r_bps / 1e6)         # W/R drops to 1.4: a download takes ~0.7 of a read
                t0 = time.monotonic()
                dl.wait_for_shard(i, timeout=30)
                got_waits.append(time.monotonic() - t0)
                time.sleep(READ_S)
                dl.release(i)
            final = dl.window_size
    ev = read_events(tmp_path / "data")
    windows = [e for e in ev if e["event"] == "window" and e["base"] is not None]
    base_before = [e["base"] for e in windows if e["t"] < t_drop]
    base_after = [e["base"] for e in windows if e["t"] > t_drop]
    assert base_before and base_before[-1] == 1, windows           # fast link: one ahead is enough
    assert base_after and base_after[-1] >= 2, windows             # learned: download ~0.7 read x (1 + margin)
    assert final >= 2
    learned = before + 6                                           # a few downloads at the new rate
    late_waits = [e["shard"] for e in ev if e["event"] == "wait_start" and e["shard"] >= learned]
    assert not late_waits, (late_waits, got_waits)
    assert all(w < 0.05 for w in got_waits[learned:]), got_waits


@pytest.mark.parametrize("levels, workers, want", [
    ((), 4, 1),                                     # nothing measured: one connection
    (((1, 18e6),), 4, 2),                           # one measured: try two
    (((1, 18e6), (2, 24e6)), 4, 3),                 # two paid (+33 %): try three
    (((1, 18e6), (2, 24e6), (3, 24.5e6)), 4, 2),    # three did not pay: two
    (((1, 24e6), (2, 24.5e6)), 4, 1),               # one fills the link: one
    (((1, 18e6),), 1, 1),                           # never more than the workers
])
def test_parallel_transfers_fill_the_link_as_measured(levels, workers, want):
    fast = Rates(aggregate_bps=20e6, consume_spb=1 / 10e6, level_bps=levels)     # not behind
    assert parallel_transfers(fast, workers) == want


def test_the_meter_measures_the_link_at_each_level():
    m = RateMeter()
    m.transfer_started(0.0)
    m.add_bytes(20_000_000)
    m.transfer_started(2.0)                        # 2 s at one transfer: 10 MB/s
    m.add_bytes(30_000_000)
    m.transfer_ended(4.0)                          # 2 s at two: 15 MB/s
    m.transfer_ended(4.5)
    levels = dict(m.rates().level_bps)
    assert levels == {1: pytest.approx(20e6 / 2.5), 2: pytest.approx(15e6)}


@pytest.mark.parametrize("ready, want", [(None, 2), (0, 1), (1, 1), (2, 2), (5, 2)])
def test_one_more_transfer_is_tried_only_with_enough_shards_ready(ready, want):
    """Issue 17: k+1 splits the link; it is tried only while the readers have k+1 shards ready."""
    one = Rates(aggregate_bps=25e6, consume_spb=1 / 20e6, level_bps=((1, 25e6),))
    assert parallel_transfers(one, workers=2, ready=ready) == want


def test_the_controller_computes_rates_once_per_measurement():
    ctl = PrefetchController(PrefetchPolicy())
    calls = []
    real = ctl.meter.rates
    ctl.meter.rates = lambda tail: calls.append(tail) or real(tail)
    a, b = ctl.rates(), ctl.rates()
    assert a is b and len(calls) == 1
    ctl.window(), ctl.parallel(2)
    assert len(calls) == 1                          # nothing measured since
    ctl.meter.download_done(MB, 1.0, now=1.0)
    assert ctl.rates().download_bps == pytest.approx(MB) and len(calls) == 2


def test_link_clock_tells_the_meter_and_times_the_body():
    from shardstream.prefetch import LinkClock
    m = RateMeter()
    c = LinkClock(m)
    c.begin(3, now=0.0)
    assert c.transferring == {3} and m.active == 1
    assert not c.hold(3, True, now=0.5)             # already on the link: nothing changes
    assert c.hold(3, False, now=2.0)                # bytes in: it verifies off the link
    assert m.active == 0 and c.body_seconds == {3: 2.0}
    assert c.end(3, MB, now=3.0)                    # measured over its body (2 s), not 3 s
    assert m.rates().download_bps == pytest.approx(MB / 2) and not c.begun and not c.body_seconds
    c.begin(4, now=4.0)
    assert not c.end(4, 0, now=5.0) and not c.transferring       # brought nothing: not measured
    bare = LinkClock()
    bare.begin(1, now=0.0)
    assert not bare.end(1, MB, now=1.0)             # no meter (a fixed window): bookkeeping only
