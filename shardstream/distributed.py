"""Many GPUs, many nodes: the public names of shardstream's torchrun support, in one place.

    from shardstream.distributed import make_node_downloader, setup_ddp

The code lives in three modules, one concern each (docs/DISTRIBUTED.md explains the whole):
- torchrun.py: torchrun plumbing. `NodeInfo`/`node_info()` (who this process is), `setup_ddp()`, the
  job's store (`open_store`, `Store`), `Heartbeat`/`Watch`, SHARDSTREAM_DIST_TIMEOUT.
- node.py: one downloader per node. `NodeLeader` (local rank 0: the node's StreamingDownloader and one
  handler per other local rank), `NodeReader` (every other local rank), `make_node_downloader()` (what
  every rank calls), `node_shards()` (partition="node"), `Group`.
- loadersync.py: `LoaderSync`, the loader's DDP state: rank 0's state carries every rank's, so a resume
  from it is exact on every rank, or elastic at another world size.
The reader interface all downloaders share is `reader.ShardReader`.
"""
from .loadersync import ANCHORS_KEEP, STATE_KEEP, LoaderSync
from .node import PARTITIONS, SCOPES, Follower, Group, NodeLeader, NodeReader, make_node_downloader, node_shards
from .reader import ShardReader
from .torchrun import (BEAT_EVERY, DEFAULT_TIMEOUT, POLL_MAX, POLL_MIN, Heartbeat, NodeInfo, Store, Watch,
                       dist_timeout, node_info, open_store, setup_ddp)

__all__ = ["ANCHORS_KEEP", "BEAT_EVERY", "DEFAULT_TIMEOUT", "PARTITIONS", "POLL_MAX", "POLL_MIN", "SCOPES",
           "STATE_KEEP", "Follower", "Group", "Heartbeat", "LoaderSync", "NodeInfo", "NodeLeader", "NodeReader",
           "ShardReader", "Store", "Watch", "dist_timeout", "make_node_downloader", "node_info", "node_shards",
           "open_store", "setup_ddp"]
