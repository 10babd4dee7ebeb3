"""A training loop that drives the loader exactly the way nanochat's scripts/base_train.py does, without
nanochat and without a model (tests/test_dropin.py runs it as a real process).

    SHARDSTREAM_STREAMING=1 SHARDSTREAM_SOURCE=... python tests/nanochat_like.py --num-iterations 60 \
        --save-every 20 --eval-every 20 --checkpoint-dir CKPT --out run.json [--resume-from-step 20]

What it copies from base_train (shared/DESIGN.md §1), line for line where it matters:
- the one changed import: nanochat's loader names come from shardstream.loader; nothing else tells the
  loader to stream (the SHARDSTREAM_* environment does);
- the train loader is built once (with the checkpoint's dataloader_state_dict on --resume-from-step),
  the first batch is taken before step 0, and every step fetches the next batch after "training" on the
  current one;
- every --eval-every steps (and at the last step) a fresh val loader is built, --eval-steps batches are
  read, and the loader is dropped;
- a checkpoint at step s (s % save_every == 0, not the step just resumed from, and the last step) saves
  the state that came with the batch it holds but has not trained on, as JSON metadata (meta_<s>.json);
- under torchrun every rank runs it (gloo here) and only rank 0 writes the checkpoint.

A "step" records the sha1 of the (inputs, targets) it would train on. --out gets {"steps": {step: digest},
"val": {step: [digests]}, "rank": r} (under torchrun each rank writes --out.rank<r>). --crash-at-step k ends the process at once (os._exit, no cleanup:
a preempted job) before training step k. --close-at-end closes the loaders after the loop and records
the threads still alive.
"""
import argparse
import gc
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from shardstream.loader import (tokenizing_distributed_data_loader_bos_bestfit,
                                tokenizing_distributed_data_loader_with_state_bos_bestfit)

BOS = 256


class ByteTokenizer:
    """nanochat's tokenizer interface over UTF-8 bytes (BOS = 256)."""

    def get_bos_token_id(self):
        return BOS

    def get_vocab_size(self):
        return 257

    def identity(self):
        return "bytes-v1"

    def encode(self, texts, prepend=None, num_threads=1):
        head = [] if prepend is None else [prepend]
        return [head + list(t.encode("utf-8")) for t in texts]


def digest(x, y):
    return hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]


def evaluate(val_loader, steps):
    """nanochat's evaluate_bpb reads `steps` batches of the loader it is given."""
    batch_iter = iter(val_loader)
    return [digest(*next(batch_iter)) for _ in range(steps)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-iterations", type=int, required=True)
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-steps", type=int, default=2)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--resume-from-step", type=int, default=-1)
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--crash-at-step", type=int, default=-1)
    p.add_argument("--close-at-end", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")   # like nanochat's

    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if ddp else 0
    device = "cpu"
    tokenizer = ByteTokenizer()
    ckpt = Path(args.checkpoint_dir)
    resuming = args.resume_from_step != -1
    meta = json.loads((ckpt / f"meta_{args.resume_from_step:06d}.json").read_text()) if resuming else None

    B, T = args.device_batch_size, args.max_seq_len
    dataloader_resume_state_dict = None if not resuming else meta["dataloader_state_dict"]
    train_loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split="train", device=device, resume_state_dict=dataloader_resume_state_dict)
    build_val_loader = lambda: tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, split="val",
                                                                              device=device)
    x, y, dataloader_state_dict = next(train_loader)    # kick off load of the very first batch of data

    out = Path(args.out if not ddp else f"{args.out}.rank{rank}")
    record = {"rank": rank, "steps": {}, "val": {}}
    step = 0 if not resuming else args.resume_from_step
    val_loader = None
    while True:
        last_step = step == args.num_iterations
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            val_loader = build_val_loader()
            record["val"][step] = evaluate(val_loader, args.eval_steps)
        if last_step or (step > 0 and step != args.resume_from_step and args.save_every > 0
                         and step % args.save_every == 0):
            if rank == 0:
                ckpt.mkdir(parents=True, exist_ok=True)
                (ckpt / f"meta_{step:06d}.json").write_text(json.dumps(
                    {"step": step, "dataloader_state_dict": dataloader_state_dict}))
        if last_step:
            break
        if step == args.crash_at_step:
            out.write_text(json.dumps(record))
            os._exit(3)                                 # preempted: nothing is cleaned up
        record["steps"][step] = digest(x, y)            # "train" on the batch held
        if ddp:
            dist.all_reduce(torch.zeros(1))             # DDP's gradient all-reduce keeps ranks in step
        x, y, dataloader_state_dict = next(train_loader)   # prefetch the next batch while the GPU trains
        step += 1

    if args.close_at_end:
        train_loader.close()
        del train_loader, val_loader
        gc.collect()
        record["threads"] = [t.name for t in threading.enumerate()]
    out.write_text(json.dumps(record))
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
