"""One rank of the multi-process tests (tests/test_distributed.py), run by torchrun with gloo on CPU.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py CONFIG.json

CONFIG (JSON): url, data_dir (a "{node}" in it becomes this node's rank), out (dir for rank<R>.json),
total_shards, dataset_shards, buffer_size, budget, partition, scope, B, T, batches (a count, "until_repeat":
every rank read a document twice, or "until_epoch_2": the next chunk is epoch 2's; that one runs alone),
slow_rank/slow_seconds (that rank sleeps between getting a shard and opening it), save_at (rank 0 writes
the state yielded with that batch to out/state.json), resume (a state file to resume from), die_rank/
die_at (that rank SIGKILLs itself at that batch), timeout.

Each rank writes out/rank<R>.json: the sha1 of every document its tokenizer encoded (in order), a digest
of every batch, the states' cursors, and the downloader status.
"""
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from shardstream.distributed import make_node_downloader, node_info
from shardstream.loader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn

BOS = 256


class ByteTokenizer:
    """nanochat's tokenizer interface over raw bytes (BOS = 256); records every document it encodes."""

    def __init__(self):
        self.seen = []

    def get_bos_token_id(self):
        return BOS

    def get_vocab_size(self):
        return 257

    def identity(self):
        return "bytes-v1"

    def encode(self, texts, prepend=None, num_threads=1):
        out = []
        for t in texts:
            self.seen.append(hashlib.sha1(t.encode()).hexdigest()[:16])
            ids = list(t.encode("utf-8")[:2000])
            out.append(([prepend] if prepend is not None else []) + ids)
        return out


class SlowReader:
    """A ShardReader wrapping the rank's downloader: sleeps between getting a shard and handing it over,
    then checks it is still there. Every other member is passed through as is."""

    def __init__(self, inner, seconds):
        self.inner, self.seconds = inner, seconds

    source = property(lambda self: self.inner.source)
    data_dir = property(lambda self: self.inner.data_dir)
    val_shard = property(lambda self: self.inner.val_shard)
    val_shards = property(lambda self: self.inner.val_shards)
    text_column = property(lambda self: self.inner.text_column)
    total_shards = property(lambda self: self.inner.total_shards)
    plan = property(lambda self: self.inner.plan)

    def row_group_stride(self, split):
        return self.inner.row_group_stride(split)

    def wait_for_shard(self, shard_id, timeout=None, *, reader=0):
        path = self.inner.wait_for_shard(shard_id, timeout, reader=reader)
        time.sleep(self.seconds)
        if not os.path.exists(path):
            raise AssertionError(f"{path} was deleted while this rank held it")
        return path

    def release(self, shard_id, *, reader=0, consumed=True):
        self.inner.release(shard_id, reader=reader, consumed=consumed)

    def get_status(self):
        return self.inner.get_status()

    def start(self):
        self.inner.start()
        return self

    def stop(self):
        self.inner.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def main():
    cfg = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ.get('RANK')}] %(name)s %(message)s")
    dist.init_process_group("gloo")
    info = node_info()
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    data_dir = cfg["data_dir"].replace("{node}", str(info.node_rank))
    dl = make_node_downloader(source=cfg["url"], data_dir=data_dir, total_shards=cfg["total_shards"],
                              dataset_shards=cfg["dataset_shards"], buffer_size=cfg.get("buffer_size", 2),
                              max_cache_bytes=cfg.get("budget"), partition=cfg.get("partition", "global"),
                              scope=cfg.get("scope", "node"), timeout=cfg.get("timeout", 30), progress=False,
                              min_free_bytes=0, warn_free_bytes=0)
    tok = ByteTokenizer()
    resume = json.loads(Path(cfg["resume"]).read_text()) if cfg.get("resume") else None
    digests, cursors = [], []
    status = None
    with dl:
        reader = dl
        if cfg.get("slow_rank") == info.rank:
            reader = SlowReader(dl, cfg["slow_seconds"])
        loader = loader_fn(tok, cfg["B"], cfg["T"], "train", tokenizer_threads=1, tokenizer_batch_size=16,
                           device="cpu", resume_state_dict=resume, buffer_size=cfg.get("buffer_docs", 32),
                           streaming_downloader=reader, dist_timeout=cfg.get("timeout", 30))
        k = 0
        while True:
            x, y, state = next(loader)
            digests.append(hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16])
            cursors.append(state.get("cursor"))
            if k == cfg.get("save_at") and info.rank == 0:
                (out / "state.json").write_text(json.dumps(state))
            if k == cfg.get("die_at") and info.rank == cfg.get("die_rank"):
                os.kill(os.getpid(), signal.SIGKILL)
            k += 1
            # lockstep like DDP training: one collective per batch
            if cfg["batches"] == "until_epoch_2":
                if state["cursor"][0] >= 2:
                    break
            elif cfg["batches"] == "until_repeat":
                done = torch.tensor([int(len(set(tok.seen)) < len(tok.seen))])
                dist.all_reduce(done, op=dist.ReduceOp.MIN)
                if done.item():
                    break
            else:
                dist.all_reduce(torch.zeros(1))
                if k >= cfg["batches"]:
                    break
        status = dl.get_status().to_dict()
        dist.barrier()          # nobody stops the leader while a follower still reads
    (out / f"rank{info.rank}.json").write_text(json.dumps({
        "rank": info.rank, "node": info.node_rank, "local_rank": info.local_rank, "docs": tok.seen,
        "digests": digests, "cursors": cursors, "status": status, "data_dir": data_dir}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
