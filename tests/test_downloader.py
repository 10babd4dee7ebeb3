"""StreamingDownloader against a real local server and real parquet files.

Shards here are small (~33 KB) so that 20 of them stream in well under a second; backoffs are tiny.
Rate caps (srv.set_rate) make transfers slow where a test needs something in flight.
"""
import logging
import os
import threading
import time

import pytest

from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader, WindowPolicy
from shardstream.errors import (ConfigError, DiskSpaceError, DownloaderCrashed, DownloaderStopped,
                                PermanentFetchError, ShardSkipped, ShardWaitTimeout, TransientFetchError)
from shardstream.fetch import FetchPolicy
from shardstream.sample import make_sample
from shardstream.server import Fault, ShardServer
from shardstream.shards import shard_name
from shardstream.source import Source
from shardstream.status import read_events, read_status
from rel_common import shard_bytes_on_disk

N_SHARDS = 24                   # 23 train shards + val shard 23
VAL = N_SHARDS - 1
FAST_FETCH = FetchPolicy(connect_timeout=2, stall_timeout=3, max_attempts=3, backoff_initial=0.01,
                         backoff_max=0.05, chunk_bytes=4096)
FAST_FAIL = dict(retry_initial=0.02, retry_max=0.2)
NO_FLOOR = DiskPolicy(warn_free_bytes=0, min_free_bytes=0)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    make_sample(d, N_SHARDS, 100_000, seed=1, docs_per_row_group=16, row_groups=2)
    return d


@pytest.fixture
def srv(shards_dir):
    with ShardServer(shards_dir) as s:
        yield s


def sizes(shards_dir):
    return {i: (shards_dir / shard_name(i)).stat().st_size for i in range(N_SHARDS)}


def make(srv, tmp_path, total=20, **kw):
    kw.setdefault("fetch_policy", FAST_FETCH)
    kw.setdefault("disk_policy", NO_FLOOR)
    kw.setdefault("progress", False)
    if isinstance(kw.get("failure_policy"), str) or "failure_policy" not in kw:
        kw["failure_policy"] = FailurePolicy(kw.pop("failure_policy", "fail"), deadline=30, **FAST_FAIL)
    return StreamingDownloader(total, data_dir=tmp_path / "data", source=Source(srv.url, N_SHARDS), **kw)


def our_threads():
    return [t for t in threading.enumerate() if t.name.startswith("shardstream-")]


def until(cond, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")



# --- initialization and bad input

def test_init_touches_nothing_and_logs(srv, tmp_path, caplog):
    caplog.set_level(logging.INFO, "shardstream")
    dl = make(srv, tmp_path, total=-1)
    assert dl.total_shards == VAL and dl.val_shard == VAL and dl.buffer_size == 5
    assert dl.data_dir == tmp_path / "data" and dl.data_dir.is_dir()
    assert dl.source.base_url == srv.url
    assert dl.get_status().state == "created"
    assert srv.all_stats() == {}                       # construction does not touch the network
    assert "Initialized StreamingDownloader: 23 shards, buffer_size=5" in caplog.text
    with pytest.raises(DownloaderStopped, match="start"):
        dl.wait_for_shard(0)


def test_url_string_source_and_the_default_datasets_count(srv, tmp_path):
    dl = StreamingDownloader(3, source=srv.url, dataset_shards=N_SHARDS, data_dir=tmp_path)
    assert dl.val_shard == VAL and dl.source.dataset_shards == N_SHARDS
    with pytest.raises(ConfigError, match="cannot be listed"):              # a plain URL: the count is asked for
        StreamingDownloader(None, source=srv.url, data_dir=tmp_path)


def test_the_known_datasets_own_hub_url_needs_no_count(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    dl = StreamingDownloader(None, source=srv.hub_url, data_dir=tmp_path)   # climbmix: 6,543 shards
    assert dl.val_shard == 6542 and dl.total_shards == 6542


@pytest.mark.parametrize("kw, needle", [
    (dict(buffer_size=0), "buffer_size"),
    (dict(retain=-1), "retain"),
    (dict(workers=0), "workers"),
    (dict(total=24), "only 23 train shards"),
    (dict(total=0), "total_shards"),
    (dict(total=2.5), "total_shards"),
    (dict(buffer_size=2, initial_buffer=3), "initial_buffer"),
    (dict(max_cache_bytes=0), "max_cache_bytes"),
    (dict(failure_policy="explode"), "failure policy mode"),
    (dict(window=WindowPolicy(), buffer_size=3), "not both"),
    (dict(disk_policy=NO_FLOOR, min_free_bytes=5), "not both"),
    (dict(verify_existing="maybe"), "verify_existing"),
])
def test_invalid_values_raise_at_once(srv, tmp_path, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        make(srv, tmp_path, **kw)


def test_a_row_group_cap_in_the_environment_is_not_the_librarys(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSTREAM_MAX_ROW_GROUP_BYTES", "512MB")     # the edges read it (settings.py)
    make(srv, tmp_path)
    assert not srv.requests                 # constructed, nothing asked of the server


def test_unwritable_data_dir_raises_at_once(srv, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="not a writable directory"):
        StreamingDownloader(3, data_dir=blocker / "data", source=Source(srv.url, N_SHARDS))


def test_the_local_sources_own_folder_is_refused_as_data_dir(shards_dir, tmp_path):
    import shutil
    from shardstream.listing import make_source
    folder = tmp_path / "corpus"
    shutil.copytree(shards_dir, folder)
    before = sorted(p.name for p in folder.iterdir())
    (tmp_path / "link").symlink_to(folder)
    src = make_source(str(folder))
    for data_dir in (folder, tmp_path / "link"):          # the same folder by another name too
        with pytest.raises(ConfigError, match="is the source's own folder"):
            StreamingDownloader(-1, buffer_size=1, max_cache_bytes=1, data_dir=data_dir, source=src,
                                progress=False)
    assert sorted(p.name for p in folder.iterdir()) == before          # nothing deleted, nothing written


def test_budget_below_val_plus_two_shards_is_refused_before_any_download(srv, shards_dir, tmp_path):
    s = sizes(shards_dir)
    dl = make(srv, tmp_path, max_cache_bytes=s[VAL] + 2 * s[0] - 1)
    with pytest.raises(ConfigError, match="plus two train shards"):
        dl.start()
    assert srv.stats(shard_name(0)).get_requests == 0
    assert not our_threads()


# --- downloading and waiting

def test_start_downloads_the_initial_buffer_then_val(srv, tmp_path, caplog):
    caplog.set_level(logging.INFO, "shardstream")
    with make(srv, tmp_path, total=5, initial_buffer=2) as dl:
        assert {0, 1} <= set(dl.get_status().cached)       # start() blocked until both were verified
        path = dl.wait_for_shard(0)
        assert path == dl.data_dir / "shard_00000.parquet" and path.is_file()
        until(lambda: VAL in dl.get_status().cached, what="val shard")
        dl.release(0)
    for line in ("Found 0 shards already downloaded", "Downloading shard_00000.parquet...",
                 "Downloaded shard_00000.parquet (", "[1/5]", "Initial buffer ready, training can start",
                 "Stopping download thread...", "Download thread stopped"):
        assert line in caplog.text, line


def test_wait_times_out_when_the_shard_is_slow(srv, tmp_path):
    srv.set_rate(0.005)                                  # 5 KB/s: a 33 KB shard takes ~7 s
    with make(srv, tmp_path, initial_buffer=0) as dl:
        t0 = time.monotonic()
        with pytest.raises(ShardWaitTimeout, match="shard_00000.parquet was not ready within 0.3 s"):
            dl.wait_for_shard(0, timeout=0.3)
        assert time.monotonic() - t0 < 3
        st = dl.get_status()
        assert st.waits == 1 and st.wait_seconds >= 0.3


def test_buffer_keeps_exactly_buffer_size_ahead(srv, tmp_path):
    with make(srv, tmp_path, buffer_size=3, initial_buffer=3) as dl:
        until(lambda: set(dl.get_status().cached) == {0, 1, 2, VAL}, what="window 0-2 + val")
        time.sleep(0.3)                                  # nothing more comes while the reader stands still
        assert set(dl.get_status().cached) == {0, 1, 2, VAL}
        assert srv.stats(shard_name(3)).requests == 0
        assert dl.get_status().ahead == 3
        dl.wait_for_shard(0)                             # the window moves to 1-3
        until(lambda: 3 in dl.get_status().cached, what="shard 3")
        st = dl.get_status()
        assert st.current_shard == 0 and st.ahead == 3
        time.sleep(0.2)
        assert srv.stats(shard_name(4)).requests == 0


@pytest.mark.parametrize("how", [dict(initial_buffer=0), dict(initial_buffer=1, start_at=7),
                                 dict(initial_buffer=2, start_at=7)])
def test_a_resumed_run_never_fetches_the_shards_before_its_start(srv, tmp_path, how):
    with make(srv, tmp_path, buffer_size=3, **how) as dl:
        time.sleep(0.5)                          # the trainer builds its model before its first batch
        assert all(s >= 7 for s in dl.get_status().cached + dl.get_status().in_flight if s != VAL)
        for i in range(7, 10):
            dl.wait_for_shard(i, timeout=10)
            dl.release(i)
        until(lambda: {10, 11, 12} <= set(dl.get_status().cached), what="the window after shard 9")
    for i in range(7):
        assert srv.stats(shard_name(i)).get_requests == 0, i         # not shard 0, nor any before 7
    assert srv.stats(shard_name(7)).get_requests == 1


def test_start_at_must_be_a_planned_shard(srv, tmp_path):
    for bad in (VAL, 20, -1, "3", True):
        with pytest.raises(ConfigError, match="start_at"):
            make(srv, tmp_path, start_at=bad)


def starts(data):
    return [e["shard"] for e in read_events(data) if e["event"] == "download_start"]


def test_the_val_shard_comes_after_the_next_two_window_shards(srv, tmp_path):
    srv.set_rate(0.2)                                    # ~0.2 s a shard: the order of starts shows
    with make(srv, tmp_path, buffer_size=5, workers=2) as dl:
        until(lambda: VAL in dl.get_status().cached, what="the val shard")
    order = starts(tmp_path / "data")
    assert order[0] == 0 and set(order[1:3]) == {1, 2} and order.index(VAL) == 3     # not beside shard 1


def test_a_waited_for_shard_starts_at_once_even_with_every_worker_busy(srv, tmp_path):
    srv.set_rate(0.02)                                   # 20 KB/s: a ~33 KB shard takes > 1 s
    with make(srv, tmp_path, buffer_size=3, workers=1, start_at=0, initial_buffer=0) as dl:
        until(lambda: dl.get_status().in_flight == (0,), what="shard 0 in flight")
        dl.wait_for_shard(VAL, timeout=20)               # the first evaluation asks for the val shard
        dl.release(VAL)
    ev = [(e["event"], e["shard"]) for e in read_events(tmp_path / "data")
          if e["event"] in ("download_start", "downloaded")]
    done0 = ev.index(("downloaded", 0)) if ("downloaded", 0) in ev else len(ev)  # 0 may end unfinished at stop
    assert ev.index(("download_start", VAL)) < done0     # it did not queue behind 0


def test_an_unplanned_or_evicted_shard_is_fetched_on_demand(srv, tmp_path):
    with make(srv, tmp_path, total=5, buffer_size=2) as dl:
        p = dl.wait_for_shard(21, timeout=10)            # outside the plan of 5 shards
        assert p.name == "shard_00021.parquet" and p.is_file()
        dl.release(21)
        assert not p.exists()                            # consumed, retain=0
        dl.wait_for_shard(0)
        dl.release(0)
        assert dl.wait_for_shard(0, timeout=10).is_file()   # evicted, then wanted again (a resume)


def test_status_json_and_event_log(srv, tmp_path):
    with make(srv, tmp_path, total=6, buffer_size=2, initial_buffer=2) as dl:
        for i in range(3):
            dl.wait_for_shard(i)
            dl.release(i)
        until(lambda: VAL in dl.get_status().cached, what="val shard")
        st = dl.get_status()
        assert st.state == "running" and st.total_shards == 6 and st.buffer_size == 2
        assert st.current_shard == 2 and st.shards_verified >= 3 and st.failures == 0
        assert st.bytes_on_disk > 0 and st.downloaded_bytes > 0 and st.val_shard == VAL
        until(lambda: read_status(dl.data_dir).current_shard == 2, what="status.json")
    final = read_status(tmp_path / "data")
    assert final.state == "stopped"
    ev = read_events(tmp_path / "data")
    kinds = [e["event"] for e in ev]
    assert kinds[:2] == ["start", "scan"] and kinds[-1] == "stopped"
    assert {"downloaded", "consumed", "evicted", "wait_start", "wait_end"} <= set(kinds)
    for e in ev:
        assert {"t", "event", "shard", "bytes_on_disk", "budget", "ahead", "reader_shard"} <= set(e)
    assert [e["shard"] for e in ev if e["event"] == "consumed"] == [0, 1, 2]


# --- disk: budget, retain, leases

def test_reader_walks_20_shards_and_disk_stays_in_budget(srv, shards_dir, tmp_path):
    s = sizes(shards_dir)
    big = max(s.values())
    budget = s[VAL] + 4 * big                            # smaller than the window of 5: the budget binds
    retain = 1
    srv.set_rate(3)                                      # ~10 ms per shard, so partial files exist
    released, violations, samples = [], [], [0]
    done = threading.Event()
    data = tmp_path / "data"

    def sampler():
        while not done.is_set():
            n = shard_bytes_on_disk(data)
            if n > budget:
                violations.append(f"{n} bytes on disk > budget {budget}")
            gone_by_now = list(released)[:-retain]
            for i in gone_by_now:
                if (data / shard_name(i)).exists():
                    violations.append(f"consumed {shard_name(i)} still on disk")
            samples[0] += 1
            time.sleep(0.02)

    with make(srv, tmp_path, buffer_size=5, retain=retain, max_cache_bytes=budget) as dl:
        t = threading.Thread(target=sampler)
        t.start()
        try:
            for i in range(20):
                p = dl.wait_for_shard(i, timeout=20)
                assert p.stat().st_size == s[i]
                time.sleep(0.03)                         # "training" on it
                dl.release(i)
                released.append(i)
        finally:
            done.set()
            t.join()
        st = dl.get_status()
    assert not violations, violations[:5]
    assert samples[0] > 20
    assert st.shards_verified == 20 and st.failures == 0
    assert sorted(st.cached) == [19, VAL]                # shard 18 is beyond retain=1 once 19 was released
    peak = max(e["bytes_on_disk"] for e in read_events(data))
    assert peak <= budget


def test_lease_files_go_with_their_shards(srv, tmp_path):
    data = tmp_path / "data"
    with make(srv, tmp_path, total=12, buffer_size=2) as dl:
        for i in range(10):
            dl.wait_for_shard(i, timeout=10)
            dl.release(i)
        until(lambda: not set(range(10)) & set(dl.get_status().cached), what="shards 0-9 deleted")
    leases = sorted(p.name for p in data.glob("*.lease"))
    assert not [n for n in leases if int(n[6:11]) < 10]       # none left for the deleted shards


def test_retries_inside_a_fetch_are_counted(srv, tmp_path):
    srv.add_fault(Fault("status", status=503, file=shard_name(0), times=2, method="GET"))
    with make(srv, tmp_path, total=3, buffer_size=1) as dl:        # FAST_FETCH: 3 tries a call
        dl.wait_for_shard(0, timeout=10)
        st = dl.get_status()
    assert srv.stats(shard_name(0)).get_requests == 3
    assert st.retries == 2 and st.failures == 0               # both failed GETs were retried, in one call


def test_a_leased_shard_is_never_deleted(srv, shards_dir, tmp_path):
    s = sizes(shards_dir)
    budget = s[VAL] + s[0] + s[1] + s[2] // 2            # room for two train shards, not three
    with make(srv, tmp_path, buffer_size=3, max_cache_bytes=budget) as dl:
        p0 = dl.wait_for_shard(0)
        until(lambda: VAL in dl.get_status().cached, what="val shard")   # start() fetched shard 0 alone
        p1 = dl.wait_for_shard(1, timeout=10)            # the reader holds 0 and 1
        with pytest.raises(ShardWaitTimeout, match="waiting for room"):
            dl.wait_for_shard(2, timeout=1.0)            # 2 needs room that only leased shards hold
        assert p0.is_file() and p1.is_file()
        dl.release(0)
        assert not p0.exists()
        assert dl.wait_for_shard(2, timeout=10).is_file()


def test_leases_are_per_reader(srv, tmp_path):
    with make(srv, tmp_path, total=4, buffer_size=2) as dl:
        p = dl.wait_for_shard(0, reader="rank0")
        dl.wait_for_shard(0, reader="rank1")
        dl.release(0, reader="rank0")
        assert p.is_file()                               # rank1 still reads it
        with pytest.raises(ConfigError, match="holds no lease"):
            dl.release(0, reader="rank0")
        dl.release(0, reader="rank1")
        assert not p.exists()


def test_free_space_floor_stops_downloads_with_a_clear_error(srv, tmp_path):
    import shutil
    free = shutil.disk_usage(tmp_path).free
    dl = make(srv, tmp_path, disk_policy=DiskPolicy(min_free_bytes=free + 10**15))
    with pytest.raises(DiskSpaceError, match="under the floor"):
        dl.start()
    assert srv.stats(shard_name(0)).get_requests == 0
    assert not our_threads()


def test_low_free_space_warns_but_downloads(srv, tmp_path, caplog):
    import shutil
    free = shutil.disk_usage(tmp_path).free
    with make(srv, tmp_path, total=3, disk_policy=DiskPolicy(warn_free_bytes=free + 10**15, min_free_bytes=0)) as dl:
        assert dl.wait_for_shard(0).is_file()
    assert "Low disk space" in caplog.text


# --- faults and failure policies

def test_outage_shorter_than_the_buffer_costs_no_waits(srv, tmp_path):
    with make(srv, tmp_path, total=8, buffer_size=5, initial_buffer=5) as dl:
        srv.outage(5.0)
        for i in range(8):
            dl.wait_for_shard(i, timeout=30)
            if i < 5:
                time.sleep(1.2)                          # the buffer of 5 lasts ~6 s > the 5 s outage
            dl.release(i)
        st = dl.get_status()
    assert st.waits == 0 and st.wait_seconds == 0
    assert st.retries >= 1                               # the outage was felt, and ridden out


def test_policy_fail_raises_naming_shard_url_and_cause(srv, tmp_path):
    srv.add_fault(Fault("404", file=shard_name(2), times=None))
    with make(srv, tmp_path, total=5) as dl:
        for i in (0, 1):
            dl.wait_for_shard(i, timeout=10)
            dl.release(i)
        with pytest.raises(PermanentFetchError) as ei:
            dl.wait_for_shard(2, timeout=10)
        msg = str(ei.value)
        assert "shard_00002.parquet" in msg and srv.url in msg and "attempts" in msg and "404" in msg
        assert ei.value.shard_id == 2
        assert dl.get_status().failures >= 1


def test_policy_fail_after_the_deadline_for_transient_errors(srv, tmp_path):
    srv.add_fault(Fault("status", status=503, file=shard_name(1), times=None))
    with make(srv, tmp_path, total=5, failure_policy=FailurePolicy("fail", deadline=0.5, **FAST_FAIL)) as dl:
        t0 = time.monotonic()
        with pytest.raises(TransientFetchError, match="shard_00001.parquet.*deadline.*503"):
            dl.wait_for_shard(1, timeout=20)
        assert 0.5 <= time.monotonic() - t0 < 10
        assert dl.get_status().retries >= 1


def test_policy_skip_records_the_shard_and_moves_on(srv, tmp_path, caplog):
    srv.add_fault(Fault("404", file=shard_name(2), times=None))
    with make(srv, tmp_path, total=5, failure_policy="skip") as dl:
        with pytest.raises(ShardSkipped) as ei:
            dl.wait_for_shard(2, timeout=10)
        assert ei.value.shard_id == 2
        assert dl.wait_for_shard(3, timeout=10).is_file()
        assert dl.get_status().skipped == (2,)
    assert "SKIPPING shard_00002.parquet" in caplog.text
    assert [e["shard"] for e in read_events(tmp_path / "data") if e["event"] == "skipped"] == [2]


def test_policy_wait_keeps_waiting_and_warns(srv, tmp_path, caplog):
    srv.add_fault(Fault("404", file=shard_name(1), times=None))
    pol = FailurePolicy("wait", deadline=0.1, warn_every=0.2, retry_initial=0.05, retry_max=0.1)
    with make(srv, tmp_path, total=5, failure_policy=pol) as dl:
        with pytest.raises(ShardWaitTimeout):
            dl.wait_for_shard(1, timeout=1.0)
        assert "still waiting for shard_00001.parquet" in caplog.text
        srv.clear_faults()                               # the file comes back: the retries find it
        assert dl.wait_for_shard(1, timeout=10).is_file()


def test_a_crashed_worker_is_never_silent(srv, tmp_path, monkeypatch):
    # Nothing real makes a worker crash (fetch turns every network/disk failure into FetchError), so a
    # stand-in fetch raising an unexpected error is the only way to reach this branch.
    import shardstream.downloader as mod

    def broken(*a, **k):
        raise RuntimeError("bug in the fetch layer")
    monkeypatch.setattr(mod, "run_fetch", broken)
    dl = make(srv, tmp_path, initial_buffer=0).start()
    try:
        with pytest.raises(DownloaderCrashed, match="bug in the fetch layer"):
            dl.wait_for_shard(0, timeout=10)
        assert dl.get_status().state == "crashed"
    finally:
        dl.stop()
    assert not our_threads()


# --- stop and restart

@pytest.mark.parametrize("progress", [False, True])
def test_no_thread_outlives_stop_with_or_without_a_progress_bar(srv, tmp_path, progress, capsys):
    from tqdm import tqdm
    if tqdm.monitor is not None:             # an earlier bar in this process started tqdm's monitor: end it
        tqdm.monitor.exit()
        tqdm.monitor = None
    before = set(threading.enumerate())
    with make(srv, tmp_path, initial_buffer=2, progress=progress) as dl:
        dl.wait_for_shard(0, timeout=10)
        dl.release(0)
    left = [t.name for t in set(threading.enumerate()) - before
            if t.is_alive() and not t.name.endswith("(process_request_thread)")]    # the test server's own
    assert left == []                        # no tqdm_monitor either
    assert ("initial buffer" in capsys.readouterr().err) == progress      # the bar shows only when asked



def test_stop_mid_transfer_is_quick_joins_everything_and_leaves_a_resumable_partial(srv, shards_dir, tmp_path):
    srv.set_rate(0.01)                                   # 10 KB/s: a 33 KB shard takes ~3 s
    data = tmp_path / "data"
    dl = make(srv, tmp_path, initial_buffer=0, start_at=0, workers=1).start()     # prefetches before a read
    dl_threads = our_threads()
    assert len(dl_threads) == 3                          # one worker, one for waited-for shards, one status writer
    until(lambda: any(n.endswith(".partial") and (data / n).stat().st_size > 0 for n in os.listdir(data)),
          what="a partial file with bytes")
    t0 = time.monotonic()
    dl.stop()
    assert time.monotonic() - t0 < 5
    assert not any(t.is_alive() for t in dl_threads) and not our_threads()
    dl.stop()                                            # harmless
    partials = [n for n in os.listdir(data) if n.endswith(".partial")]
    assert len(partials) == 1 and not (data / shard_name(0)).exists()
    have = (data / partials[0]).stat().st_size
    srv.set_rate(None)
    with make(srv, tmp_path, initial_buffer=1) as dl2:
        assert dl2.wait_for_shard(0).stat().st_size == sizes(shards_dir)[0]
    starts = [a for a, b in srv.stats(shard_name(0)).ranges]
    assert starts[-1] >= have > 0                       # the second run resumed, it did not start over


def test_restart_reuses_verified_shards_and_replaces_corrupt_ones(srv, tmp_path, caplog):
    with make(srv, tmp_path, buffer_size=3, initial_buffer=3) as dl:
        until(lambda: set(dl.get_status().cached) == {0, 1, 2, VAL}, what="first run's window")
    sent = {i: srv.stats(shard_name(i)).bytes_sent for i in (0, 1, 2, VAL)}
    gets = {i: srv.stats(shard_name(i)).get_requests for i in (0, 1, 2, VAL)}
    p1 = tmp_path / "data" / shard_name(1)
    p1.write_bytes(p1.read_bytes()[:-100] + b"\0" * 100)      # same size, broken footer
    caplog.clear()
    caplog.set_level(logging.INFO, "shardstream")
    with make(srv, tmp_path, buffer_size=3, initial_buffer=3) as dl:
        for i in range(3):
            dl.wait_for_shard(i, timeout=10)
            dl.release(i)
    assert "Found 3 shards already downloaded" in caplog.text and "Removing corrupt shard_00001" in caplog.text
    for i in (0, 2, VAL):
        assert srv.stats(shard_name(i)).get_requests == gets[i], i       # reused, not fetched again
        assert srv.stats(shard_name(i)).bytes_sent == sent[i]
    assert srv.stats(shard_name(1)).get_requests == gets[1] + 1


def test_stop_wakes_a_waiting_reader(srv, tmp_path):
    srv.set_rate(0.005)
    dl = make(srv, tmp_path, initial_buffer=0).start()
    errors = []

    def reader():
        try:
            dl.wait_for_shard(0)
        except Exception as e:
            errors.append(e)
    t = threading.Thread(target=reader)
    t.start()
    until(lambda: dl.get_status().waits == 1, what="the reader to wait")
    dl.stop()
    t.join(5)
    assert not t.is_alive() and isinstance(errors[0], DownloaderStopped)


def test_a_data_dir_over_the_budget_is_trimmed_at_start_keeping_the_window(srv, shards_dir, tmp_path, caplog):
    with make(srv, tmp_path, total=12, retain=20) as dl:
        for i in range(6):
            dl.wait_for_shard(i)
            dl.release(i)
        until(lambda: set(range(11)) <= set(dl.get_status().cached), what="shards 0-10 on disk")
    s = sizes(shards_dir)
    budget = s[VAL] + 6 * max(s.values())
    with make(srv, tmp_path, total=12, buffer_size=3, initial_buffer=0, max_cache_bytes=budget) as dl:
        assert shard_bytes_on_disk(tmp_path / "data") <= budget
        cached = set(dl.get_status().cached)
        assert {0, 1, 2, VAL} <= cached and 10 not in cached     # furthest-read shards went first
    assert "over the budget" in caplog.text


def test_start_after_stop_is_refused(srv, tmp_path):
    dl = make(srv, tmp_path, total=2)
    dl.start()
    dl.stop()
    with pytest.raises(DownloaderStopped):
        dl.start()
    with pytest.raises(DownloaderStopped):
        dl.wait_for_shard(0)
