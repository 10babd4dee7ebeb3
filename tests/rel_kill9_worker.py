"""The process test_kill9.py kills: a StreamingDownloader and a loader-style reader over a real server.

    python tests/rel_kill9_worker.py SOURCE_URL DATASET_SHARDS DATA_DIR PROGRESS_FILE TOTAL BUDGET_BYTES

The reader reads train shards in order; after checking a shard (every row group read, the bytes hashed)
it appends "<shard> <sha256> <rows>" to PROGRESS_FILE (one write, fsync) and only then releases it. On
start it resumes after the last shard recorded there: the downloader's plan is the shards still to
read. Exits 0 when every shard 0..TOTAL-1 is recorded.
"""
import os
import sys

from rel_common import read_shard
from shardstream.cache import ReadPlan
from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader
from shardstream.fetch import FetchPolicy
from shardstream.source import Source


def done_so_far(progress):
    try:
        with open(progress) as f:
            return [int(line.split()[0]) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def main(url, dataset_shards, data_dir, progress, total, budget):
    done = done_so_far(progress)
    start = done[-1] + 1 if done else 0
    if start >= total:
        return 0
    plan = ReadPlan(tuple(range(start, total)))
    fetch = FetchPolicy(connect_timeout=2, stall_timeout=2, backoff_initial=0.01, backoff_max=0.1,
                        chunk_bytes=16384)
    with StreamingDownloader(plan=plan, data_dir=data_dir, source=Source(url, dataset_shards), buffer_size=3,
                             workers=2, initial_buffer=0, max_cache_bytes=budget, fetch_policy=fetch,
                             failure_policy=FailurePolicy("fail", deadline=60, retry_initial=0.05, retry_max=0.5),
                             disk_policy=DiskPolicy(warn_free_bytes=0, min_free_bytes=0), progress=False) as dl:
        fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for i in plan.order:
                path = dl.wait_for_shard(i, timeout=120)
                digest, rows = read_shard(path)
                os.write(fd, f"{i} {digest} {rows}\n".encode())
                os.fsync(fd)
                dl.release(i)
        finally:
            os.close(fd)
    return 0


if __name__ == "__main__":
    a = sys.argv[1:]
    sys.exit(main(a[0], int(a[1]), a[2], a[3], int(a[4]), int(a[5])))
