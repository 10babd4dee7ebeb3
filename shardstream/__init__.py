"""shardstream: feed an LLM pretraining run from a sharded parquet corpus larger than the disk.

source -> fetch -> cache -> downloader -> loader -> trainer. See README.md.
"""
from .errors import (ConfigError, CorruptShardError, DiskSpaceError, FetchError, PermanentFetchError,
                     ShardStreamError, ShardWaitTimeout, StateMismatchError, TransientFetchError)
from .shards import extract_shard_id, shard_name
from .source import Source, make_source

__version__ = "0.1.0"


def __getattr__(name):
    # Heavy pieces load on first use so `import shardstream` stays light.
    if name == "StreamingDownloader":
        from .downloader import StreamingDownloader
        return StreamingDownloader
    raise AttributeError(f"module 'shardstream' has no attribute {name!r}")
