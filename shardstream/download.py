"""`shardstream download`: fetch train shards 0..N-1 and the val shard, W at a time, with a progress bar.

The manual fallback, like nanochat's `python -m nanochat.dataset -n N -w W`:

    shardstream download -n 8 -w 4                        # climbmix from the Hub into nanochat's data dir
    shardstream download -n 4 --dataset-shards 10 --source http://127.0.0.1:8000 --data-dir /tmp/d
    shardstream download -n 4 --source s3://bucket/corpus --data-dir /tmp/d    # count from the listing

Every shard goes through fetch_shard (resume, retries, verify, atomic rename), so the exit status is 0 only
when every asked-for shard is verified on disk; otherwise it is 1 and each failed shard gets one line
with its cause. Bad arguments, an unwritable data dir and bad SHARDSTREAM_MAX_ROW_GROUP_* caps are exit 2,
found before any network I/O. Ctrl-C or SIGTERM stops every transfer within ~1 s, keeps the partial files
(the same command resumes them) and exits 128 + the signal number.
As a library: download_shards(source, shard_ids, data_dir, workers, policy).
"""
import argparse
import concurrent.futures as cf
import logging
import signal
import sys
import threading
import time

import requests

from .errors import ConfigError, FetchCancelled, ShardStreamError
from .fetch import FetchPolicy, ensure_data_dir, fetch_shard, remote_info
from .shards import DATASETS, DEFAULT_DATASET, default_data_dir, shard_name
from .source import make_source
from .verify import row_group_limits

logger = logging.getLogger(__name__)


def download_shards(source, shard_ids, data_dir, workers=4, policy=FetchPolicy(), *, stop=None,
                    on_bytes=None, on_size=None):
    """Fetch shard_ids into data_dir with `workers` parallel transfers (one requests.Session each).

    Returns one entry per shard id, in order: a FetchResult, or the ShardStreamError that shard failed
    with (a failure does not stop the others). on_size(n) is called with each shard's size as it becomes
    known and on_bytes(n) as bytes land (a progress bar's total and update). Setting `stop` (or Ctrl-C)
    cancels every transfer within ~1 s, leaving partial files to resume.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    if policy.verify_parquet:
        row_group_limits()          # every shard is checked against these caps: a bad variable fails now, not per shard
    data_dir = ensure_data_dir(data_dir)
    stop = stop or threading.Event()
    local = threading.local()
    sessions = []
    sessions_lock = threading.Lock()

    def session():
        if not hasattr(local, "session"):
            local.session = requests.Session()
            with sessions_lock:
                sessions.append(local.session)
        return local.session

    def one(i):
        if stop.is_set():                       # queued behind the workers when the stop came
            return FetchCancelled(f"shard {i:05d}: stopped before it started", shard_id=i)
        try:
            info = None
            if not (data_dir / shard_name(i)).is_file():
                info = remote_info(source, i, policy, session(), stop)
                if on_size is not None and info.size:
                    on_size(info.size)
            r = fetch_shard(source, i, data_dir, policy, session=session(), stop=stop, on_bytes=on_bytes,
                            info=info)
            if r.resumed_from and on_bytes is not None:
                on_bytes(r.resumed_from)        # on disk from an earlier run: count it as done
            return r
        except ShardStreamError as e:
            return e

    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardstream-download")
    try:
        futures = [pool.submit(one, i) for i in shard_ids]
        pending = set(futures)
        while pending:                          # short waits keep the main thread responsive to Ctrl-C
            _, pending = cf.wait(pending, timeout=0.5)
        return [f.result() for f in futures]
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for s in sessions:
            s.close()


def cli(argv):
    p = argparse.ArgumentParser(
        prog="shardstream download",
        description="Fetch train shards 0..N-1 and the val shard (the last one) into the data dir, verified.")
    p.add_argument("-n", "--num-files", type=int, default=-1,
                   help="number of train shards to fetch, 0..N-1 (default -1: all of them)")
    p.add_argument("-w", "--num-workers", type=int, default=4, help="parallel transfers (default 4)")
    p.add_argument("--source", default=None,
                   help="where the shards are: hf://datasets/ORG/NAME[@REV], s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
                        "a local dir, or an http(s) base URL (default: $SHARDSTREAM_SOURCE, else the dataset on "
                        "the HuggingFace Hub)")
    p.add_argument("--data-dir", default=None,
                   help="where shards go (default: $SHARDSTREAM_DATA_DIR, else nanochat's data dir)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, choices=sorted(DATASETS),
                   help=f"known dataset (default {DEFAULT_DATASET})")
    p.add_argument("--dataset-shards", type=int, default=None,
                   help="total shards at the source, the last being val (default: the listed count for "
                        "hf/s3/gs/local sources, the dataset's for an http(s) URL)")
    p.add_argument("--allow-insecure", action="store_true", help="permit plain http to a non-loopback host")
    args = p.parse_args(argv)

    try:
        if args.num_workers < 1:
            raise ConfigError(f"-w must be >= 1, got {args.num_workers}")
        # Everything local before make_source, which lists hf/s3/gs sources over the network.
        row_group_limits()
        data_dir = ensure_data_dir(args.data_dir or default_data_dir(args.dataset))
        source = make_source(args.source, args.dataset, args.dataset_shards, allow_insecure=args.allow_insecure)
        n = args.num_files
        if n == -1:
            n = source.num_train_shards
        if not 0 <= n <= source.num_train_shards:
            raise ConfigError(f"-n {args.num_files}: the dataset has {source.num_train_shards} train shards "
                              f"(0..{source.num_train_shards - 1}) plus the val shard; give 0..{source.num_train_shards} "
                              f"or -1 for all (set --dataset-shards for a custom --source)")
    except ConfigError as e:
        print(f"shardstream download: {e}", file=sys.stderr)
        return 2

    ids = list(range(n)) + [source.val_shard]
    print(f"fetching {n} train shard{'s' * (n != 1)} + val shard {source.val_shard} from "
          f"{source.identity()['source']} into {data_dir} with {args.num_workers} workers", file=sys.stderr)
    t0 = time.monotonic()
    stop = threading.Event()
    signals = []                # the signals that came, first one first

    def on_signal(signum, frame):
        if signals:             # a second one: stop waiting for the transfers to wind down
            raise KeyboardInterrupt
        signals.append(signum)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():   # only there can Python take signals
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        results = _download_with_bar(source, ids, data_dir, args.num_workers, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    seconds = time.monotonic() - t0

    failed = [(i, r) for i, r in zip(ids, results) if isinstance(r, Exception)]
    done = [r for r in results if not isinstance(r, Exception)]
    if signals:
        name = signal.Signals(signals[0]).name
        kept = len(list(data_dir.glob("shard_*.partial")))
        print(f"shardstream download: stopped by {name}: {len(done)}/{len(ids)} shards verified in {data_dir}, "
              f"{kept} partial file(s) kept: run the same command again to resume them", file=sys.stderr)
        return 128 + signals[0]
    fetched = [r for r in done if not r.already_present]
    mb = sum(r.bytes_downloaded for r in fetched) / 1e6
    print(f"{len(done)}/{len(ids)} shards verified in {data_dir} ({len(fetched)} fetched, "
          f"{len(done) - len(fetched)} already there; {mb:.1f} MB in {seconds:.1f}s, "
          f"{mb / max(seconds, 1e-9):.1f} MB/s)")
    for i, err in failed:
        text = str(err)
        print(text if text.startswith(f"shard {i:05d}") else f"shard {i:05d}: {text}", file=sys.stderr)
    return 1 if failed else 0


def _download_with_bar(source, ids, data_dir, workers, stop=None):
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    lock = threading.Lock()
    with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="download", file=sys.stderr,
              dynamic_ncols=True) as bar, logging_redirect_tqdm():
        def on_size(n):
            with lock:
                bar.total += n
                bar.refresh()

        def on_bytes(n):
            with lock:
                bar.update(n)
        return download_shards(source, ids, data_dir, workers, stop=stop, on_bytes=on_bytes, on_size=on_size)
