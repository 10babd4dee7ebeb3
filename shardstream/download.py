"""`shardstream download`: fetch train shards 0..N-1 and the val shard(s), W at a time, with a progress bar.

The manual fallback, like nanochat's `python -m nanochat.dataset -n N -w W`:

    shardstream download -n 8 -w 4                        # climbmix from the Hub into nanochat's data dir
    shardstream download -n 4 --dataset-shards 10 --source http://127.0.0.1:8000 --data-dir /tmp/d
    shardstream download -n 4 --source s3://bucket/corpus --data-dir /tmp/d    # count from the listing
    shardstream download -n 4 --require-checksum --verify decode              # the strictest checks
    shardstream download -n -1 --source hf://datasets/HuggingFaceFW/fineweb --files 'sample/10BT/*.parquet'

Any parquet corpus (--files GLOB, --val-files GLOB|none, --manifest FILE: listing.make_source): the
manifest's files land under their cache names (manifest.cache_name: index + a digest of the path, never
a path), nanochat's layout keeps shard_XXXXX.parquet (fetch_shard names every file Source.file_name).

Every shard goes through fetch_shard (resume, retries, verify, atomic rename), so the exit status is 0 only
when every asked-for shard is verified on disk; otherwise it is 1 and each failed shard gets one line
with its cause. Bad arguments, an unwritable data dir and bad SHARDSTREAM_MAX_ROW_GROUP_* caps are exit 2,
found before any network I/O. Ctrl-C or SIGTERM stops every transfer within ~1 s, keeps the partial files
(the same command resumes them) and exits 128 + the signal number.

The bar's total is known before the first transfer: the listing's sizes for a listed source, else one
HEAD per shard (W at a time), so its % and ETA do not jump; partial files from an earlier run count as
done. Sizes are decimal (1 MB = 10**6 bytes) in the bar and the summary, as everywhere in shardstream.
While it runs, `<data dir>/status.json` says what it does (kind "download"), so `shardstream status
--watch` follows it as it follows a StreamingDownloader.
As a library: download_shards(source, shard_ids, data_dir, workers, policy).
"""
import argparse
import concurrent.futures as cf
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque

import requests

from pathlib import Path

from . import layout
from .errors import ConfigError, FetchCancelled, ShardStreamError
from .fetch import VERIFY_LEVELS, FetchPolicy, ensure_data_dir, remote_info
from .fetchproc import FetchHelper, run_fetch
from .shards import DATASETS, DEFAULT_DATASET, default_data_dir
from .listing import add_manifest_arguments, make_source, manifest_choice, pin_source
from .settings import read_all
from .source import source_kind
from .status import CHECK_WORDS, STALE_SECONDS, DownloaderStatus, read_status, write_status
from .verify import configure_row_group_limits

logger = logging.getLogger(__name__)
STATUS_EVERY = 0.5          # seconds between status.json writes while downloading
RATE_WINDOW = 5.0           # seconds of transfers the "recent" rate is measured over
PROBE_WORKERS = 8           # HEADs in flight at least while sizing the bar (a HEAD is cheap)


class _Sessions:
    """One requests.Session per thread, all closed at the end."""

    def __init__(self):
        self.local = threading.local()
        self.lock = threading.Lock()
        self.all = []

    def get(self):
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
            with self.lock:
                self.all.append(self.local.session)
        return self.local.session

    def close(self):
        for s in self.all:
            s.close()


def _run_pool(fn, items, workers, stop):
    """[fn(i) for i in items], `workers` at a time; the main thread waits in short steps so Ctrl-C lands."""
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardstream-download")
    try:
        futures = [pool.submit(fn, i) for i in items]
        pending = set(futures)
        while pending:
            _, pending = cf.wait(pending, timeout=0.5)
        return [f.result() for f in futures]
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def probe_shards(source, shard_ids, data_dir, workers=4, policy=FetchPolicy(), *, stop=None, sessions=None):
    """{shard: RemoteInfo, or the ShardStreamError its probe failed with} for the shards not on disk yet,
    before any transfer: the listing's entry for a listed source, else one HEAD (or stat) per shard,
    `workers` at a time."""
    stop = stop or threading.Event()
    missing = [i for i in shard_ids if not (data_dir / source.file_name(i)).is_file()]
    listed = {i: source.listed(i) for i in missing}
    if all(info is not None and info.size is not None for info in listed.values()):
        return listed
    own = sessions is None
    sessions = sessions or _Sessions()

    def probe(i):
        if stop.is_set():
            return FetchCancelled(f"shard {i:05d}: stopped before it started", shard_id=i)
        try:
            return remote_info(source, i, policy, sessions.get(), stop)
        except ShardStreamError as e:
            return e
    try:
        return dict(zip(missing, _run_pool(probe, missing, workers, stop)))
    finally:
        if own:
            sessions.close()


def download_shards(source, shard_ids, data_dir, workers=4, policy=FetchPolicy(), *, stop=None,
                    on_bytes=None, on_size=None, infos=None, progress=None):
    """Fetch shard_ids into data_dir with `workers` parallel transfers (one requests.Session each).

    Returns one entry per shard id, in order: a FetchResult, or the ShardStreamError that shard failed
    with (a failure does not stop the others). infos: probe_shards' answer, so no shard is probed twice
    (a shard whose probe failed gets that error); without it each shard is probed as its turn comes.
    on_size(n) is called with each shard's size as it becomes known and on_bytes(n) as bytes land (a
    progress bar's total and update); progress, a DownloadProgress, hears of each shard's start, bytes and
    end. Setting `stop` (or Ctrl-C) cancels every transfer within ~1 s, leaving partial files to resume.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    data_dir = ensure_data_dir(data_dir)
    shard_ids = list(shard_ids)
    stop = stop or threading.Event()
    sessions = _Sessions()

    def one(i):
        if stop.is_set():                       # queued behind the workers when the stop came
            return FetchCancelled(f"shard {i:05d}: stopped before it started", shard_id=i)
        try:
            info = size = None
            if not (data_dir / source.file_name(i)).is_file():
                info = infos.get(i) if infos is not None else remote_info(source, i, policy, sessions.get(), stop)
                if isinstance(info, ShardStreamError):
                    raise info
                size = info.size if info is not None else None
                if on_size is not None and info is not None and info.size:
                    on_size(info.size)
                if info is not None and info is source.listed(i):
                    info = None                 # the listing's entry: fetch_shard asks the source itself
            if progress is not None:
                progress.started(i)

            def got(n):
                if on_bytes is not None:
                    on_bytes(n)
                if progress is not None:
                    progress.add(i, n)
            r = run_fetch(helper, source, i, data_dir, policy, session=sessions.get(), stop=stop, on_bytes=got,
                          info=info, size=size)
            if r.resumed_from and on_bytes is not None:
                on_bytes(r.resumed_from)        # on disk from an earlier run: count it as done
        except ShardStreamError as e:
            r = e
        if progress is not None:
            progress.finished(i, r)
        return r

    # "auto" sends a shard there only once the helper is up: with no more shards than workers, all start first
    helper = FetchHelper() if policy.process is True or len(shard_ids) > workers else None
    try:
        return _run_pool(one, shard_ids, workers, stop)
    finally:
        if helper is not None:
            helper.close()
        sessions.close()


class DownloadProgress:
    """What `shardstream download` shows while it runs: a tqdm bar over the bytes to fetch, its total known
    before the first transfer, and status.json in the data dir (kind "download") for `shardstream status`.

    sizes: {shard: bytes} of the shards to fetch (None where unknown); present: {shard: bytes} of the
    shards verified on disk already. Bytes of a partial file count as done from the start; when a shard
    ends, its share of the bar is set to exactly its size (0 and out of the total when it failed), so a
    transfer started over or a discarded partial never leaves the bar off."""

    def __init__(self, source, ids, data_dir, sizes, present, workers, bar=True):
        self.source, self.ids, self.data_dir, self.workers = source, list(ids), data_dir, workers
        self.lock = threading.Lock()
        self.sizes = dict(sizes)
        self.present = dict(present)
        self.counted = _partial_bytes(source, data_dir, self.sizes)     # shard -> bytes shown on the bar
        self.in_flight = set()
        self.done = dict(present)               # shard -> bytes of each shard verified on disk
        self.failed = set()
        self.checked = Counter()
        self.retries = 0
        self.downloaded = 0
        self.rate = deque()
        self.state = "running"
        self.stop_writing = threading.Event()
        self.bar = None
        if bar:
            from tqdm import tqdm
            total = sum(s for s in self.sizes.values() if s)
            self.bar = tqdm(total=total, initial=sum(self.counted.values()), unit="B", unit_scale=True,
                            unit_divisor=1000, desc="download", file=sys.stderr, dynamic_ncols=True)
        self.writes_status = self._may_write_status()
        self.writer = None
        if self.writes_status:
            self._write()
            self.writer = threading.Thread(target=self._write_loop, name="shardstream-download-status", daemon=True)
            self.writer.start()

    # --- what download_shards reports

    def started(self, i):
        with self.lock:
            self.in_flight.add(i)

    def add(self, i, n):
        with self.lock:
            self.counted[i] = self.counted.get(i, 0) + n
            self.downloaded += n
            now = time.monotonic()
            self.rate.append((now, n))
            while self.rate and self.rate[0][0] < now - RATE_WINDOW:
                self.rate.popleft()
            if self.bar is not None:
                self.bar.update(n)

    def finished(self, i, result):
        with self.lock:
            self.in_flight.discard(i)
            if isinstance(result, FetchCancelled):
                return                          # stopped: its partial file stays, and so do its bytes
            shown = self.counted.pop(i, 0)
            if isinstance(result, Exception):
                self.failed.add(i)
                size, share = self.sizes.get(i) or 0, 0
            else:
                self.done[i] = result.size
                size, share = self.sizes.get(i), result.size
                if result.checked is not None:
                    self.checked[result.checked] += 1
                self.retries += max(0, result.attempts - 1)
                if result.already_present and i not in self.sizes:
                    share = shown            # not on the bar: it was there before the sizes were taken
            if self.bar is not None:
                if i in self.sizes:
                    if isinstance(result, Exception):
                        self.bar.total -= size
                    elif size is None:          # the source gave no size up front: add it now
                        self.bar.total += share
                self.bar.update(share - shown)

    # --- status.json

    def _may_write_status(self):
        """Not over a live StreamingDownloader's status.json in the same data dir: its status matters more."""
        try:
            st = read_status(self.data_dir)
        except ConfigError:
            return True
        live = (st is not None and st.kind != "download" and st.state in ("starting", "running")
                and time.time() - st.updated < STALE_SECONDS and st.pid != os.getpid())
        if live:
            print(f"shardstream download: a StreamingDownloader (pid {st.pid}) is running on {self.data_dir}; "
                  f"its status.json is left alone", file=sys.stderr)
        return not live

    def status(self):
        with self.lock:
            now = time.monotonic()
            recent = [(t, n) for t, n in self.rate if t >= now - RATE_WINDOW]
            mbps = sum(n for _, n in recent) / max(now - recent[0][0], 0.5) / 1e6 if recent else 0.0
            try:
                free = shutil.disk_usage(self.data_dir).free
            except OSError:
                free = None
            return DownloaderStatus(
                state=self.state, shards_verified=len(self.done), total_shards=len(self.ids), ahead=0,
                buffer_size=self.workers, current_shard=None,
                bytes_on_disk=sum(self.done.values()) + sum(self.counted.values()), reserved_bytes=0, budget=None,
                free_disk_bytes=free, download_mbps=round(mbps, 3), downloaded_bytes=self.downloaded,
                in_flight=tuple(sorted(self.in_flight)), cached=tuple(sorted(self.done)), retries=self.retries,
                failures=len(self.failed), val_shard=self.source.val_shard, data_dir=str(self.data_dir),
                source=self.source.name, pid=os.getpid(), host=socket.gethostname(), updated=time.time(),
                kind="download", checked=dict(self.checked))

    def _write(self):
        try:
            write_status(self.data_dir, self.status())
        except (OSError, ConfigError) as e:     # (UnsafePathError: a planted file) never stops the download
            logger.debug("could not write status.json: %s", e)

    def _write_loop(self):
        while not self.stop_writing.wait(STATUS_EVERY):
            self._write()

    def close(self):
        """The last status.json (state "stopped") and the bar closed."""
        self.stop_writing.set()
        if self.writer is not None:
            self.writer.join()
        with self.lock:
            self.state = "stopped"
        if self.writes_status:
            self._write()
        if self.bar is not None:
            self.bar.close()


def _partial_bytes(source, data_dir, shards):
    """{shard: bytes of its largest partial file} for the given shards (a resume continues from one)."""
    out = {}
    naming = layout.Naming.of(source)
    try:
        entries = list(os.scandir(data_dir))
    except OSError:
        return out
    for e in entries:
        i = naming.partial_shard(e.name)
        if i is not None and i in shards:
            try:
                size = e.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            out[i] = max(out.get(i, 0), size)
    return out


def build_parser():
    p = argparse.ArgumentParser(
        prog="shardstream download",
        description="Fetch train shards 0..N-1 and the val shard(s) into the data dir, verified.")
    p.add_argument("-n", "--num-files", type=int, default=-1,
                   help="number of train shards to fetch, 0..N-1 (default -1: all of them, every train file of "
                        "the manifest)")
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
                        "hf/s3/gs/local sources; required for an http(s) URL other than a known dataset's Hub URL)")
    add_manifest_arguments(p)
    p.add_argument("--text-column", default=None, metavar="NAME",
                   help="the parquet column holding the documents, checked in every file (default: "
                        "$SHARDSTREAM_TEXT_COLUMN, else text)")
    p.add_argument("--require-checksum", action="store_true",
                   help="refuse a shard the source gives no sha256/md5 for (default: size + parquet footer then)")
    p.add_argument("--verify", default="footer", choices=VERIFY_LEVELS,
                   help="footer: size, checksum when there is one, parquet footer (default); decode: also read "
                        "and decompress every page before the shard is kept")
    p.add_argument("--allow-insecure", action="store_true", help="permit plain http to a non-loopback host")
    return p


def cli(argv):
    args = build_parser().parse_args(argv)
    try:
        if args.num_workers < 1:
            raise ConfigError(f"-w must be >= 1, got {args.num_workers}")
        # Everything local first: the URL and an http(s) source (no I/O) before the data dir is made, the data
        # dir before an hf/s3/gs source is listed over the network.
        env = read_all(["SHARDSTREAM_SOURCE", "SHARDSTREAM_DATA_DIR", "SHARDSTREAM_MAX_ROW_GROUP_BYTES",
                        "SHARDSTREAM_MAX_ROW_GROUP_ROWS", "SHARDSTREAM_FILES", "SHARDSTREAM_VAL_FILES",
                        "SHARDSTREAM_MANIFEST", "SHARDSTREAM_TEXT_COLUMN"])
        configure_row_group_limits(env["SHARDSTREAM_MAX_ROW_GROUP_BYTES"], env["SHARDSTREAM_MAX_ROW_GROUP_ROWS"])
        column = args.text_column if args.text_column is not None else env["SHARDSTREAM_TEXT_COLUMN"]
        if not column or not column.strip():
            raise ConfigError("--text-column must name a column, got an empty name")
        policy = FetchPolicy(require_checksum=args.require_checksum, verify=args.verify, text_column=column)
        files, val_files, manifest = manifest_choice(args, env=env)
        url = args.source or env["SHARDSTREAM_SOURCE"]
        chosen = files is not None or val_files is not None
        listed = (url is not None and source_kind(url) != "http") or (url is None and chosen and manifest is None)
        kw = dict(allow_insecure=args.allow_insecure, files=files, val_files=val_files, manifest=manifest)
        source = None if listed else make_source(url, args.dataset, args.dataset_shards, **kw)
        data_dir = ensure_data_dir(args.data_dir or env["SHARDSTREAM_DATA_DIR"] or default_data_dir(args.dataset))
        if source is None:
            source = make_source(url, args.dataset, args.dataset_shards, **kw)
        source = pin_source(source)     # the default source (the Hub at main) -> its commit
        n = args.num_files
        if n == -1:
            n = source.num_train_shards
        if not 0 <= n <= source.num_train_shards:
            what = "the manifest has" if source.manifest is not None else "the dataset has"
            raise ConfigError(f"-n {args.num_files}: {what} {source.num_train_shards} train shards "
                              f"(0..{source.num_train_shards - 1}) plus {_vals(source)}; give 0..{source.num_train_shards} "
                              f"or -1 for all (set --dataset-shards for a custom --source)")
    except ConfigError as e:
        print(f"shardstream download: {e}", file=sys.stderr)
        return 2

    ids = list(range(n)) + list(source.val_shards)
    print(f"fetching {n} train shard{'s' * (n != 1)} + {_vals(source)} from "
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
        results = _download_with_bar(source, ids, data_dir, args.num_workers, stop, policy)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    seconds = time.monotonic() - t0

    failed = [(i, r) for i, r in zip(ids, results) if isinstance(r, Exception)]
    done = [r for r in results if not isinstance(r, Exception)]
    if signals:
        name = signal.Signals(signals[0]).name
        naming = layout.Naming.of(source)
        kept = sum(naming.partial_shard(p.name) is not None for p in Path(data_dir).glob("*.partial"))
        print(f"shardstream download: stopped by {name}: {len(done)}/{len(ids)} shards verified in {data_dir}, "
              f"{kept} partial file(s) kept: run the same command again to resume them", file=sys.stderr)
        return 128 + signals[0]
    fetched = [r for r in done if not r.already_present]
    mb = sum(r.bytes_downloaded for r in fetched) / 1e6
    by = Counter(r.checked for r in fetched if r.checked)
    vouched = f"; verified by {', '.join(f'{CHECK_WORDS.get(k, k)}: {v}' for k, v in by.most_common())}" if by else ""
    print(f"{len(done)}/{len(ids)} shards verified in {data_dir} ({len(fetched)} fetched, "
          f"{len(done) - len(fetched)} already there; {mb:.1f} MB in {seconds:.1f}s, "
          f"{mb / max(seconds, 1e-9):.1f} MB/s{vouched})")
    for i, err in failed:
        text = str(err)
        print(text if text.startswith(f"shard {i:05d}") else f"shard {i:05d}: {text}", file=sys.stderr)
    return 1 if failed else 0


def _vals(source):
    """'val shard 5', 'val shards 7, 8', or 'no val shard' (--val-files none)."""
    v = source.val_shards
    if not v:
        return "no val shard"
    return f"val shard{'s' * (len(v) > 1)} {', '.join(str(i) for i in v)}"


def _download_with_bar(source, ids, data_dir, workers, stop=None, policy=FetchPolicy()):
    """Sizes first (the bar's total), then the transfers, with the bar and status.json."""
    from tqdm.contrib.logging import logging_redirect_tqdm
    stop = stop or threading.Event()
    if not source.listing and len(ids) > 50:
        print(f"asking the source for the sizes of {len(ids)} shards first (the bar's total)", file=sys.stderr)
    infos = probe_shards(source, ids, data_dir, max(workers, PROBE_WORKERS), policy, stop=stop)
    sizes = {i: (None if isinstance(info, Exception) or info is None else info.size) for i, info in infos.items()}
    present = {}
    for i in ids:
        if i not in infos:
            try:
                present[i] = (data_dir / source.file_name(i)).stat().st_size
            except OSError:             # gone since: fetched again, off the bar's total
                pass
    progress = DownloadProgress(source, ids, data_dir, sizes, present, workers)
    try:
        with logging_redirect_tqdm():
            return download_shards(source, ids, data_dir, workers, policy, stop=stop, infos=infos, progress=progress)
    finally:
        progress.close()
