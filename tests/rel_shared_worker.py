"""One of the processes test_shared_cache.py runs side by side over ONE data dir: a StreamingDownloader and a
loader-style reader.

    python tests/rel_shared_worker.py SOURCE_URL DATASET_SHARDS DATA_DIR OUT_FILE TOTAL HOLD RETAIN BUDGET

The reader reads train shards 0..TOTAL-1 in order. It takes each shard (wait_for_shard), sleeps HOLD
seconds holding it (a slow trainer), then opens and reads it (every row group, the bytes hashed), writes
"<shard> <sha256> <rows>" to OUT_FILE and releases it. RETAIN and BUDGET (bytes, 0 = none) go to the
downloader. Any error is printed with its traceback and exits 1.
"""
import os
import sys
import time
import traceback

from rel_common import read_shard
from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader
from shardstream.fetch import FetchPolicy
from shardstream.source import Source


def main(url, dataset_shards, data_dir, out, total, hold, retain, budget):
    fetch = FetchPolicy(connect_timeout=2, stall_timeout=2, backoff_initial=0.01, backoff_max=0.1,
                        chunk_bytes=16384)
    with StreamingDownloader(total, data_dir=data_dir, source=Source(url, dataset_shards), buffer_size=2,
                             workers=2, retain=retain, max_cache_bytes=budget or None, fetch_policy=fetch,
                             failure_policy=FailurePolicy("fail", deadline=60, retry_initial=0.05, retry_max=0.5),
                             disk_policy=DiskPolicy(warn_free_bytes=0, min_free_bytes=0), progress=False) as dl, \
            open(out, "w") as f:
        for i in range(total):
            path = dl.wait_for_shard(i, timeout=120)
            time.sleep(hold)
            digest, rows = read_shard(path)
            f.write(f"{i} {digest} {rows}\n")
            f.flush()
            dl.release(i)
    return 0


if __name__ == "__main__":
    a = sys.argv[1:]
    try:
        sys.exit(main(a[0], int(a[1]), a[2], a[3], int(a[4]), float(a[5]), int(a[6]), int(a[7])))
    except Exception:           # noqa: BLE001 - the test reads this
        traceback.print_exc()
        sys.exit(1)
    finally:
        sys.stdout.flush()
        os.sys.stderr.flush()
