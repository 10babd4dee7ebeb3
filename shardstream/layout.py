"""Where each of shardstream's files lives in a data dir: the shards under nanochat's names, and all the
bookkeeping in one hidden folder, so a data dir after a clean stop holds shards and nothing else.

    DIR/shard_00007.parquet                                  verified, under its final name (nanochat's)
    DIR/shard_00007.parquet.<unique>.partial                 bytes in flight (counted in the budget)
    DIR/.shardstream/shard_00007.parquet.<unique>.partial.json   what that partial belongs to
    DIR/.shardstream/shard_00007.parquet.lock                held while a process fetches the shard
    DIR/.shardstream/shard_00007.parquet.lease               shared-locked while a process's reader holds it
    DIR/.shardstream/status.json, events.jsonl               the downloader's status and event log

Lock and lease files go once nobody needs them (cache.py: a file is removed only while its exclusive
lock is held, and whoever locks one checks it is still the file at the path, so a lock on a removed
file is never trusted). Files an older shardstream left at the top of the dir (`*.lock`, `*.lease`,
`*.partial.json`) are swept by `legacy_files` once nobody holds them.
"""
from pathlib import Path

from .shards import shard_name

BOOK_DIR = ".shardstream"
STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"
LEGACY_SUFFIXES = (".lock", ".lease", ".partial.json")


def book_dir(data_dir):
    """DIR/.shardstream (not created here: writers call safefs.ensure_book_dir, which refuses a link)."""
    return Path(data_dir) / BOOK_DIR


def lock_path(data_dir, shard):
    return book_dir(data_dir) / f"{shard_name(shard)}.lock"


def lease_path(data_dir, shard):
    return book_dir(data_dir) / f"{shard_name(shard)}.lease"


def sidecar_path(partial):
    """The sidecar of a partial file DIR/shard_X.parquet.<unique>.partial."""
    partial = Path(partial)
    return book_dir(partial.parent) / f"{partial.name}.json"


def partial_of_sidecar(sidecar):
    """The partial file a sidecar in DIR/.shardstream belongs to."""
    sidecar = Path(sidecar)
    return sidecar.parent.parent / sidecar.name[:-len(".json")]


def status_path(data_dir):
    return book_dir(data_dir) / STATUS_FILE


def events_path(data_dir):
    return book_dir(data_dir) / EVENTS_FILE


def legacy_files(data_dir):
    """Bookkeeping files an older shardstream kept at the top of the data dir (paths)."""
    try:
        names = [e.name for e in Path(data_dir).iterdir()]
    except FileNotFoundError:
        return []
    return [Path(data_dir) / n for n in sorted(names) if n.startswith("shard_") and n.endswith(LEGACY_SUFFIXES)]
