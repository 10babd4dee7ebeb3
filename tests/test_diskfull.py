"""A full disk, for real: a small tmpfs mounted for the test (skipped, with the reason, where mounting is
impossible: it needs root or CAP_SYS_ADMIN).

- The budget and the free-space floor keep a run that streams more than the filesystem holds inside it:
  every shard read identical to the source, the filesystem never full.
- Under the floor, downloads pause and the reader gets a clear DiskSpaceError; once space is freed the
  same reader goes on.
- A real ENOSPC in the middle of a write (the disk filled by someone else while a shard streams in)
  becomes a clear DiskSpaceError for the reader, the partial file is removed, nothing under a final name
  is corrupted, and the run goes on once space is back.
test_fetch.py covers ENOSPC for one bare fetch_shard; these go through the StreamingDownloader.
"""
import errno
import os
import shutil
import subprocess
import threading
import time

import pytest

from rel_common import check_final_files, make_shards, partial_files, read_shard, shard_bytes_on_disk, tally
from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader
from shardstream.errors import DiskSpaceError
from shardstream.fetch import FetchPolicy
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.source import Source
from shardstream.status import read_events

N = 16                      # 15 train shards + val 15, ~90 KB each: ~1.4 MB, more than the 1 MiB tmpfs
VAL = N - 1
FS_BYTES = 1 << 20
FETCH = FetchPolicy(connect_timeout=2, stall_timeout=2, backoff_initial=0.01, backoff_max=0.1, chunk_bytes=4096)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    d = tmp_path_factory.mktemp("diskfull-remote")
    return d, make_shards(d, N, chars=300_000, seed=9)


@pytest.fixture
def tmpfs(tmp_path):
    d = tmp_path / "fs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}): needs root or "
                    f"CAP_SYS_ADMIN")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(path, leave=0):
    """Write a filler file until the filesystem has `leave` bytes free (or is full). Returns its size."""
    n = 0
    with open(path, "wb") as f:
        while True:
            free = shutil.disk_usage(os.path.dirname(path)).free
            step = min(4096, free - leave)
            if step <= 0:
                break
            try:
                f.write(b"\0" * step)
                f.flush()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
            n += step
    return n


def make(srv, data, **kw):
    kw.setdefault("buffer_size", 3)
    kw.setdefault("workers", 2)
    return StreamingDownloader(VAL, data_dir=data, source=Source(srv.url, N), fetch_policy=FETCH, progress=False,
                               failure_policy=FailurePolicy("fail", deadline=60, retry_initial=0.02, retry_max=0.2),
                               **kw)


def read_through(dl, shas, on_disk_error=None):
    """Read every train shard, checking each; a DiskSpaceError goes to on_disk_error (which frees space)
    and the same shard is asked for again. Returns (bytes verified, disk errors seen)."""
    nbytes, errors = 0, []
    for i in range(VAL):
        while True:
            try:
                path = dl.wait_for_shard(i, timeout=60)
                break
            except DiskSpaceError as e:
                if on_disk_error is None:
                    raise
                errors.append(e)
                on_disk_error(e)
        digest, rows = read_shard(path)
        assert digest == shas[i] and rows == 32
        nbytes += path.stat().st_size
        dl.release(i)
    return nbytes, errors


def test_budget_and_floor_keep_a_run_bigger_than_the_disk_inside_it(remote, tmpfs):
    d, shas = remote
    size = max((d / shard_name(i)).stat().st_size for i in range(N))
    assert size * N > FS_BYTES                       # without a budget this run could not fit
    budget = 5 * size
    peak = [0, 0]                                    # shard bytes, filesystem bytes used
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], shard_bytes_on_disk(tmpfs))
            peak[1] = max(peak[1], shutil.disk_usage(tmpfs).used)
            time.sleep(0.005)
    t = threading.Thread(target=sample, daemon=True)
    with ShardServer(d, rate=2.0) as srv:
        t.start()
        try:
            with make(srv, tmpfs, max_cache_bytes=budget,
                      disk_policy=DiskPolicy(warn_free_bytes=0, min_free_bytes=100_000)) as dl:
                nbytes, _ = read_through(dl, shas)
                st = dl.get_status()
        finally:
            stop.set()
            t.join()
    assert st.error is None
    assert peak[0] <= budget, f"shard bytes on disk peaked at {peak[0]}, over the budget {budget}"
    assert peak[1] < FS_BYTES - 100_000, "the filesystem came within the floor of full"
    assert not [e for e in read_events(tmpfs) if e["event"] in ("disk_low", "disk_full")]
    nbytes += check_final_files(tmpfs, shas)
    tally("diskfull/budget-and-floor", bytes_verified=nbytes, shards_read=VAL)


def test_under_the_floor_downloads_pause_with_a_clear_error_then_go_on(remote, tmpfs):
    d, shas = remote
    floor = 200_000
    filler = tmpfs / "someone-elses-file"
    fill(filler, leave=floor + 150_000)             # room for one shard above the floor, not two
    freed = []

    def free_space(e):
        msg = str(e)
        assert "GB free" in msg and "floor" in msg and str(tmpfs) in msg
        if not freed:
            filler.unlink()
            freed.append(msg)
    with ShardServer(d) as srv:
        with make(srv, tmpfs, disk_policy=DiskPolicy(warn_free_bytes=0, min_free_bytes=floor,
                                                     recheck_seconds=0.1)) as dl:
            nbytes, errors = read_through(dl, shas, on_disk_error=free_space)
    assert errors and freed, "the floor never stopped a download"
    assert partial_files(tmpfs) == []
    assert [e for e in read_events(tmpfs) if e["event"] == "disk_low"]
    nbytes += check_final_files(tmpfs, shas)
    tally("diskfull/floor", faults=len([e for e in read_events(tmpfs) if e["event"] == "disk_low"]), bytes_verified=nbytes,
          shards_read=VAL)


def test_enospc_mid_write_is_a_clear_error_removes_the_partial_and_the_run_goes_on(remote, tmpfs):
    d, shas = remote
    filler = tmpfs / "someone-elses-file"
    struck = []

    def filler_thread(srv, stop):
        # once shard 2 is streaming in, fill the disk to the last byte: its next write fails with ENOSPC
        while not stop.is_set():
            parts = [p for p in tmpfs.glob(f"{shard_name(2)}.*.partial") if p.stat().st_size > 0]
            if parts:
                fill(filler)
                struck.append(parts[0].name)
                return
            time.sleep(0.002)
    seen_partials_after = []

    def free_space(e):
        msg = str(e)
        assert "full" in msg and str(tmpfs) in msg, msg
        if filler.exists():
            seen_partials_after.append(partial_files(tmpfs))
            check_final_files(tmpfs, shas)           # nothing under a final name corrupted
            filler.unlink()

    with ShardServer(d, rate=0.3) as srv:            # ~0.3 s per shard: time to fill the disk mid-write
        stop = threading.Event()
        with make(srv, tmpfs, workers=1,
                  disk_policy=DiskPolicy(warn_free_bytes=0, min_free_bytes=0, recheck_seconds=0.1)) as dl:
            t = threading.Thread(target=filler_thread, args=(srv, stop), daemon=True)
            t.start()
            try:
                nbytes, errors = read_through(dl, shas, on_disk_error=free_space)
            finally:
                stop.set()
                t.join()
            st = dl.get_status()
    assert struck, "the disk was never filled mid-write"
    assert errors, "the reader never heard of the full disk"
    assert seen_partials_after == [[]], f"partial files left after ENOSPC: {seen_partials_after}"
    assert st.state == "running" and st.error is None   # no crash, and the error cleared once space was back
    ev = [e for e in read_events(tmpfs) if e["event"] == "disk_full"]
    assert ev and ev[0]["shard"] == 2
    assert partial_files(tmpfs) == []
    nbytes += check_final_files(tmpfs, shas)
    tally("diskfull/enospc-mid-write", faults=len(ev), bytes_verified=nbytes, shards_read=VAL)
