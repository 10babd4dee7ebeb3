"""The reader interface: everything the loader and the trainer ask of a downloader, declared once.

`ShardReader` is a `typing.Protocol`. `StreamingDownloader` (downloader.py, one process), `NodeLeader`
(node.py, local rank 0 under torchrun: the node's one downloader) and `NodeReader` (node.py, every other
local rank: requests over the job's store) satisfy it, and so can a hand-written reader of a local dir
(tests/test_reader_protocol.py). The loader (loader.py), the drop-in (streaming_env.py) and the trainer
(train.py) use these members and nothing else, so they never probe a downloader for optional attributes.

Leases are per reader: `wait_for_shard(i, reader=r)` blocks until shard i is verified on disk and leases it
to reader r (it is not deleted while leased; an evicted shard is fetched again on demand);
`release(i, reader=r)` ends that lease. A shard is consumed once its last lease is released with
consumed=True; consumed=False (a reader stopping mid-shard, or re-reading buffered documents for a resume)
keeps it for the read still to come. A NodeReader has one reader id (its local rank) and ignores `reader`.

Any parquet corpus (issue 15): shard ids index the source's manifest (train, then val), the files'
names on disk are `source.file_name(i)`, and the loader reads the column `text_column` only.

`isinstance(x, ShardReader)` works (runtime_checkable); on Python 3.11 it reads every property, which a
NodeReader answers only once started.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .cache import ReadPlan
    from .source import Source
    from .status import DownloaderStatus


@runtime_checkable
class ShardReader(Protocol):
    """What a loader reads shards through (see the module docstring for the lease rules)."""

    @property
    def source(self) -> Source:
        """Where the shards come from; the loader's resume fingerprint names `source.identity()["source"]`."""

    @property
    def data_dir(self) -> Path:
        """The local directory the returned paths live in."""

    @property
    def val_shard(self) -> int | None:
        """The first shard id of the val split (nanochat's: the dataset's last shard); None when the source
        has no val files (--val-files none)."""

    @property
    def val_shards(self) -> tuple[int, ...]:
        """Every shard id of the val split, in the order the val loader reads them (nanochat's: the last
        shard alone; a manifest's val files; () with --val-files none)."""

    @property
    def text_column(self) -> str:
        """The parquet column the loader reads documents from ("text" unless the run says otherwise)."""

    @property
    def total_shards(self) -> int:
        """Train shards in one epoch of the read order."""

    @property
    def plan(self) -> ReadPlan:
        """The read order: `plan.order` is the train split's shards, index pq_idx -> shard id (a node's own
        shards with partition="node")."""

    def row_group_stride(self, split: str) -> tuple[int, int] | None:
        """(rank, world) to stride the split's row groups by, or None for the DDP rank and world size."""

    def wait_for_shard(self, shard_id: int, timeout: float | None = None, *, reader: int | None = 0) -> Path:
        """Block until shard_id is verified on disk, lease it to `reader`, return its path. Raises
        ShardWaitTimeout after `timeout` s, the fetch error or ShardSkipped (failure policy),
        DownloaderStopped, DownloaderCrashed, RankLost (a silent node leader)."""

    def release(self, shard_id: int, *, reader: int | None = 0, consumed: bool = True) -> None:
        """End `reader`'s lease on shard_id; consumed=False when it was not read to its end."""

    def get_status(self) -> DownloaderStatus:
        """A snapshot of the downloader's state (status.py)."""

    def start(self) -> ShardReader:
        """Start (a downloader: fill the initial buffer; a node reader: attach to its leader). Idempotent."""

    def stop(self) -> None:
        """Stop; a second call does nothing."""

    def __enter__(self) -> ShardReader:
        ...

    def __exit__(self, *exc) -> bool | None:
        ...
