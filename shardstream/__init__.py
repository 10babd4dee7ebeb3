"""shardstream: feed an LLM pretraining run from a sharded parquet corpus larger than the disk.

source -> fetch -> cache -> downloader -> loader -> trainer. See README.md.
"""
from .errors import (ConfigError, CorruptShardError, DiskSpaceError, FetchError, PermanentFetchError,
                     ShardStreamError, ShardWaitTimeout, SourceUnreachable, StateMismatchError,
                     TransientFetchError, UnsafePathError)
from .shards import extract_shard_id, shard_name
from .source import Source

__version__ = "0.1.0"


_LAZY = {       # heavy pieces load on first use, so `import shardstream` stays light
    "StreamingDownloader": "downloader", "WindowPolicy": "downloader", "FailurePolicy": "downloader",
    "DiskPolicy": "downloader", "PrefetchPolicy": "prefetch", "DownloaderStatus": "status",
    "ShardReader": "reader", "FetchPolicy": "fetch", "make_source": "listing",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'shardstream' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
