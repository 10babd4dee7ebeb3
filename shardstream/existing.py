"""What a data dir already holds when a downloader starts: shards kept from an earlier run, checked.

`scan_existing(cache, source, wanted, ...)` lists the final-named shards and the partial files, asks the
source about the shards the run wants (size, sha256; one retry: a dead source must not stall start()),
verifies each file against that (sha256 too when `hash_existing` says so), removes the corrupt ones, and
returns a frozen `Found`. It runs before the workers start and holds no lock: the downloader takes its
lock only to adopt the result (downloader.start). `hash_existing` is the pure rule.

Only this run's names are taken (cache.scan over the source's layout.Naming). With a manifest a name is the
index and a digest of the path, so a file left by a run over another file set (a changed manifest:
another --files, a file added before it, another revision's listing) either carries this run's name for
the same path at the same index, and is then checked like any shard (size and sha256 against the
listing: a changed file is removed and fetched again), or carries a name this run does not use: it is
never adopted under another index, and never deleted (it is not ours to delete: another run may share
the dir). `Found.foreign` lists those, for the warning.
"""
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from .errors import CorruptShardError, FetchError, PermanentFetchError
from .fetch import remote_info
from .layout import shard_label
from .verify import TEXT_COLUMN, verify_shard

logger = logging.getLogger(__name__)
P = "[StreamingDownloader]"
SHA_AUTO_LIMIT = 2 << 30        # verify_existing="auto": hash shards found on disk when they total <= 2 GiB


def hash_existing(verify_existing, total_bytes):
    """Whether shards found on disk are checked against their sha256 (not only size and footer)."""
    return verify_existing == "sha256" or (verify_existing == "auto" and total_bytes <= SHA_AUTO_LIMIT)


@dataclass(frozen=True)
class Found:
    files: dict = field(default_factory=dict)      # shard -> bytes: verified final files
    partials: dict = field(default_factory=dict)   # shard -> bytes of its partial files
    infos: dict = field(default_factory=dict)      # shard -> RemoteInfo the source gave
    corrupt: dict = field(default_factory=dict)    # shard -> why its file was removed
    foreign: dict = field(default_factory=dict)    # name -> bytes: shard-like files of another file set


def scan_existing(cache, source, wanted, verify_existing, fetch_policy, stop, workers=2, text_column=TEXT_COLUMN):
    """Found in cache's data dir (see the module docstring). wanted: shards the run reads (the others are
    checked by footer only); stop: a threading.Event that cancels the source's answers; text_column: the
    column each footer must hold."""
    finals, partials = cache.scan()
    do_sha = hash_existing(verify_existing, sum(finals.values()))
    quick = replace(fetch_policy, max_attempts=2)      # one retry; a dead source must not stall start()
    unreachable = threading.Event()

    def check(shard):
        info = None
        if shard in wanted and not unreachable.is_set():
            try:
                info = remote_info(source, shard, quick, stop=stop)
            except FetchError as e:
                if not isinstance(e, PermanentFetchError):
                    unreachable.set()
                logger.warning(f"{P} cannot ask the source about {shard_label(source, shard)} ({e}); "
                               f"checking parquet footers only")
        try:
            verify_shard(cache.path(shard), size=info.size if info else None,
                         sha256=info.sha256 if (info and do_sha) else None, text_column=text_column)
        except CorruptShardError as e:
            return shard, info, e
        return shard, info, None

    results = []
    if finals:
        with ThreadPoolExecutor(max_workers=max(2, workers), thread_name_prefix="shardstream-scan") as ex:
            results = list(ex.map(check, sorted(finals)))
    files, infos, corrupt = {}, {}, {}
    for shard, info, err in results:
        if info is not None:
            infos[shard] = info
        if err is None:
            files[shard] = finals[shard]
            continue
        logger.warning(f"{P} Removing corrupt {shard_label(source, shard)}: {err}")
        try:
            os.remove(cache.path(shard))
        except FileNotFoundError:
            pass
        corrupt[shard] = str(err)
    return Found(files, dict(partials), infos, corrupt, cache.foreign())
