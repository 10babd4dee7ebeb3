"""Soak: many small shards, several epochs, ~10 % of all requests faulty (random kinds, seeded).

A RandomFaultServer (rel_common) gives each request a random fault with probability 0.1: resets, 500/
502/503, 429, stalls, truncations, flipped bytes, wrong Content-Lengths, on HEAD and GET. A
StreamingDownloader under a budget of a few shards streams the plan epoch after epoch (so every epoch
downloads again), and a loader-style reader reads every shard of every epoch. The end: zero corrupted
reads, no error reaching the reader, the shard bytes on disk within the budget at every moment (a sampler
thread watches), and the process's RSS flat (psutil: what the last epoch adds over the first).

Quick form (default): 20 shards x 2 epochs. Slow form (`-m slow`): 200 shards x 3 epochs.
"""
import threading
import time

import psutil
import pytest

from rel_common import RandomFaultServer, check_final_files, make_shards, read_shard, shard_bytes_on_disk, tally
from shardstream.cache import ReadPlan
from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader
from shardstream.fetch import FetchPolicy
from shardstream.shards import shard_name
from shardstream.source import Source
from shardstream.status import read_events

FETCH = FetchPolicy(connect_timeout=2, stall_timeout=0.5, max_attempts=None, backoff_initial=0.01,
                    backoff_max=0.1, chunk_bytes=4096)


def _soak(tmp_path, shards, epochs, seed, rss_slack_mb, min_kinds):
    remote = tmp_path / "remote"
    shas = make_shards(remote, shards + 1, chars=40_000, seed=seed)       # + the val shard
    size = max((remote / shard_name(i)).stat().st_size for i in range(shards + 1))
    budget = 8 * size
    data = tmp_path / "data"
    peak, stop = [0], threading.Event()

    def sampler():
        while not stop.is_set():
            peak[0] = max(peak[0], shard_bytes_on_disk(data))
            time.sleep(0.002)
    proc = psutil.Process()
    rss = []
    reads = nbytes = corrupted = 0
    with RandomFaultServer(remote, fault_rate=0.1, seed=seed, stall_seconds=1.0) as srv:
        plan = ReadPlan.sequential(shards, epochs=epochs)
        with StreamingDownloader(plan=plan, data_dir=data, source=Source(srv.hub_url, shards + 1), buffer_size=4,
                                 workers=2, max_cache_bytes=budget, fetch_policy=FETCH, progress=False,
                                 failure_policy=FailurePolicy("fail", deadline=120, retry_initial=0.02, retry_max=0.2),
                                 disk_policy=DiskPolicy(warn_free_bytes=0, min_free_bytes=0)) as dl:
            t = threading.Thread(target=sampler, daemon=True)
            t.start()
            try:
                for epoch in range(epochs):
                    for i in range(shards):
                        path = dl.wait_for_shard(i, timeout=120)
                        digest, rows = read_shard(path)
                        corrupted += digest != shas[i] or rows != 32
                        nbytes += path.stat().st_size
                        reads += 1
                        dl.release(i)
                    rss.append(proc.memory_info().rss)
            finally:
                stop.set()
                t.join()
            st = dl.get_status()
        injected = srv.injected()
        struck = sum(s.faults for s in srv.all_stats().values())
        gets = sum(s.get_requests for s in srv.all_stats().values())
    assert corrupted == 0
    assert reads == shards * epochs
    assert peak[0] <= budget, f"shard bytes on disk peaked at {peak[0]}, over the budget {budget}"
    assert st.error is None and st.failures == 0
    downloads = sum(1 for e in read_events(data) if e["event"] == "downloaded" and e["shard"] != shards)
    assert downloads >= shards + (epochs - 1) * (shards - 8), \
        f"{downloads} downloads: later epochs did not download again (the budget holds 8 shards)"
    assert struck == sum(injected.values()) and struck >= 0.05 * gets, f"only {struck} faults for {gets} GETs"
    assert len(injected) >= min_kinds, f"too few fault kinds struck: {dict(injected)}"
    growth = (rss[-1] - rss[0]) / 2**20
    assert growth < rss_slack_mb, f"RSS grew {growth:.1f} MB from the first epoch to the last"
    nbytes += check_final_files(data, shas)
    return dict(downloads=downloads, reads=reads, bytes=nbytes, faults=struck, kinds=dict(injected), growth_mb=growth)


def test_soak_quick(tmp_path):
    r = _soak(tmp_path, shards=20, epochs=2, seed=101, rss_slack_mb=40, min_kinds=3)
    tally("soak/20x2", faults=r["faults"], bytes_verified=r["bytes"], shards_read=r["reads"])


@pytest.mark.slow
def test_soak_200_shards_3_epochs(tmp_path):
    r = _soak(tmp_path, shards=200, epochs=3, seed=200, rss_slack_mb=20, min_kinds=8)
    tally("soak/200x3", faults=r["faults"], bytes_verified=r["bytes"], shards_read=r["reads"])
