"""`shardstream demo`: the offline end-to-end demo (the README's first command).

1. Sample shards in nanochat's layout (more bytes than the disk budget the run gets).
2. The local Hub-like server serving the shards with a bandwidth cap.
3. A BPE tokenizer trained on the first shard (nanochat's tok_train step), with that shard's token count,
   both recorded for the server's source, so the trainer reuses them and every shard, shard 0 included,
   comes through the StreamingDownloader (and its event log).
4. The reference trainer (train.py) in streaming mode, in this process: a tiny GPT trains while a
   StreamingDownloader keeps a few shards ahead of it and deletes the ones read, inside the budget.
5. A summary (steps, loss, shards streamed, peak disk vs budget vs dataset, time to the first step vs
   downloading everything first, the data wait: status.py's one definition, the figure the trainer's Done
   line, its [Streaming] lines and `shardstream status` show) and a PNG timeline drawn from the
   downloader's event log, with the trainer's steps and loss (TrainResult.step_times) on the same time axis.

Everything lands under --out (default ./demo_out). The sample is kept between runs when its parameters
are unchanged; the data dir, checkpoints, tokenizer and timeline are made afresh every run.
"""
import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

from .checksums import CHECKSUM_FILE, write_sha256sums
from .errors import ConfigError, ShardStreamError
from .layout import events_path
from .shards import list_shards, shard_name

logger = logging.getLogger(__name__)


def build_parser():
    p = argparse.ArgumentParser(prog="shardstream demo", description=__doc__.split("\n\n")[0] + " Offline; "
                                "about a minute on two CPU cores.")
    p.add_argument("--out", default="demo_out", help="output directory (default ./demo_out)")
    p.add_argument("--shards", type=int, default=12, help="sample shards, the last is val (default 12)")
    p.add_argument("--chars-per-shard", type=int, default=600_000, help="characters per shard (default 600,000)")
    p.add_argument("--row-groups", type=int, default=1, help="row groups of 1,024 docs per shard (default 1)")
    p.add_argument("--budget-shards", type=float, default=5.0,
                   help="disk budget, in shards (default 5: well under the dataset)")
    p.add_argument("--rate", type=float, default=0.15, help="the server's bandwidth cap, MB/s (default 0.15)")
    p.add_argument("--buffer", type=int, default=2, help="shards kept ready ahead of the reader (default 2)")
    p.add_argument("--depth", type=int, default=1, help="model depth (default 1)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--batch", type=int, default=16, help="rows per step (default 16)")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocab size (default 1024)")
    p.add_argument("--steps", type=int, default=-1,
                   help="training steps (default: enough to read every train shard once)")
    p.add_argument("--seed", type=int, default=0, help="sample seed")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a model this small gains nothing from more, and they "
                        "would fight the loader and the downloader for the cores)")
    return p


def _check(args):
    if args.shards < 3:
        raise ConfigError(f"--shards must be >= 3 (two train shards and the val shard), got {args.shards}")
    for name in ("chars_per_shard", "row_groups", "buffer", "depth", "seq_len", "batch", "vocab", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rate <= 0 or args.budget_shards <= 0:
        raise ConfigError("--rate and --budget-shards must be > 0")


def prepare_sample(directory, args):
    """The demo's sample shards, made unless the same ones are already there."""
    from .sample import make_sample
    directory = Path(directory)
    params = {"shards": args.shards, "chars_per_shard": args.chars_per_shard, "row_groups": args.row_groups,
              "seed": args.seed}
    marker = directory / "demo_sample.json"
    if marker.is_file() and json.loads(marker.read_text()) == params and len(list_shards(directory)) == args.shards:
        print(f"[demo] reusing the sample shards in {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
        t0 = time.time()
        make_sample(directory, args.shards, args.chars_per_shard, seed=args.seed, row_groups=args.row_groups)
        marker.write_text(json.dumps(params))
        print(f"[demo] made {args.shards} sample shards in {directory} ({time.time() - t0:.1f}s)")
    if not (directory / CHECKSUM_FILE).is_file():      # served beside them: every shard verified by sha256
        write_sha256sums(directory, [directory / shard_name(i) for i in range(args.shards)])
    sizes = [(directory / shard_name(i)).stat().st_size for i in range(args.shards)]
    return sizes


def steps_to_read_every_shard(shard_yield, tokens_per_step, shards):
    """Steps that take the loader into the last train shard without wrapping into a second epoch.

    The most steps for which train.shards_needed asks for one shard fewer than the dataset has: the
    loader's read-ahead (its buffer and prefetch queue) is only estimated, so a shard of slack keeps a
    short demo from re-downloading shard 0 at its very end.
    """
    from .train import loader_read_ahead_docs, shards_needed
    read_ahead = loader_read_ahead_docs()
    train = shards - 1
    steps = math.floor(train * shard_yield.trained_tokens / tokens_per_step)
    while steps > 0 and shards_needed(steps * tokens_per_step, shard_yield, None, read_ahead) > train - 1:
        steps = math.floor(steps * 0.98)
    return steps


def training_progress(result):
    """(time, steps done, train loss) after each step, for the timeline's training panel."""
    loss = dict(result.losses)          # step index (from 0) -> its loss
    return [(t, done, loss.get(done - 1)) for done, t in result.step_times]


def run_demo(args):
    from .server import ShardServer
    from .listing import make_source
    from .timeline import plot_timeline
    from .train import parse_args, prepare_tokenizer, train

    _check(args)
    out = Path(args.out)
    sample, data, ckpt, tok = out / "sample", out / "data", out / "checkpoints", out / "tokenizer"
    for d in (data, ckpt, tok):
        shutil.rmtree(d, ignore_errors=True)
    sizes = prepare_sample(sample, args)
    dataset_bytes = sum(sizes)
    budget = math.ceil(args.budget_shards * max(sizes))
    if budget >= dataset_bytes:
        raise ConfigError(f"a budget of {args.budget_shards} shards ({budget:,} bytes) holds the whole dataset "
                          f"({dataset_bytes:,} bytes): lower --budget-shards or raise --shards")

    with ShardServer(sample, rate=args.rate) as srv:
        # nanochat trains its tokenizer before base_train (tok_train); so does the demo, from the first shard.
        # Keyed to the source the trainer reads (train.py's data key: the source's identity), so the trainer
        # reuses the shard's token count too instead of fetching shard 0 outside the downloader.
        data_key = make_source(srv.url, dataset_shards=args.shards).identity()["source"]
        tokenizer, shard_yield = prepare_tokenizer(tok, args.vocab, lambda: sample / shard_name(0), data_key,
                                                   T=args.seq_len, threads=2)
        tokens_per_step = args.batch * args.seq_len
        steps = args.steps if args.steps > 0 else steps_to_read_every_shard(shard_yield, tokens_per_step,
                                                                            args.shards)
        if steps < 10:
            raise ConfigError(f"the sample is too small for a demo run ({steps} steps of {tokens_per_step:,} "
                              f"tokens read it all): raise --chars-per-shard or --shards, or lower --batch/--seq-len")
        print(f"[demo] dataset: {args.shards} shards, {dataset_bytes / 1e6:.2f} MB; disk budget "
              f"{budget / 1e6:.2f} MB ({args.budget_shards:g} shards); server capped at {args.rate:g} MB/s; "
              f"{steps} steps of {tokens_per_step:,} tokens")

        # torch's imports (its optimizers pull in torch._dynamo: ~2 s) happen before the trainer's clock
        # starts: downloading everything first would pay them too, so they are no part of "time to first step".
        import torch
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
        argv = [f"--depth={args.depth}", f"--max_seq_len={args.seq_len}", f"--device_batch_size={args.batch}",
                f"--num_iterations={steps}", f"--vocab_size={args.vocab}", "--streaming_mode=True",
                f"--streaming_buffer_size={args.buffer}", f"--streaming_total_shards={args.shards - 1}",
                f"--source={srv.url}", f"--dataset_shards={args.shards}",
                f"--data_dir={data}", f"--max_cache_bytes={budget}", f"--tokenizer_dir={tok}",
                f"--checkpoint_dir={ckpt}", "--eval_every=-1", "--eval_tokens=8192",
                f"--status_every={max(steps // 8, 1)}", f"--log_every={max(steps // 20, 1)}", "--tokenizer_threads=2",
                "--lr=1e-2", "--warmup_ratio=0.02"] + ([f"--device={args.device}"] if args.device else [])
        print("[demo] training: python -m scripts.base_train " + " ".join(argv))
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            result = train(parse_args(argv))
        finally:
            torch.set_num_threads(threads)
    if result.exit_code != 0:
        print(f"[demo] training stopped ({result.signal or 'exit code %d' % result.exit_code})")
        return result.exit_code

    timeline = plot_timeline(events_path(data), out / "timeline.png", progress=training_progress(result),
                             title=f"shardstream demo: {args.shards} shards ({dataset_bytes / 1e6:.2f} MB) streamed "
                                   f"through a {budget / 1e6:.2f} MB budget at {args.rate:g} MB/s")
    print(summary(args, result, timeline, dataset_bytes, budget, steps, tokens_per_step))
    return 0


def summary(args, result, timeline, dataset_bytes, budget, steps, tokens_per_step):
    st = result.downloader_status
    first_loss, last_loss = result.losses[0][1], result.losses[-1][1]
    val = f", val {result.val_losses[-1][1]:.3f}" if result.val_losses else ""
    all_first = dataset_bytes / (args.rate * 1e6)
    # what the event log shows fetched, so the shard count and the downloads agree on a short run too
    train_shards = result.train_shards
    fetched = set(timeline.downloaded_shards) - {timeline.val_shard}
    streamed = (f"all {train_shards} train shards" if len(fetched) >= train_shards else
                f"{len(fetched)} of {train_shards} train shards")
    if timeline.val_shard in timeline.downloaded_shards:
        streamed += " + the val shard"
    extra = st.downloaded_bytes - timeline.downloaded_bytes
    cut = f" ({extra / 1e6:.2f} MB of it in transfers that did not finish)" if extra > 10_000 else ""
    lines = [
        "",
        "=" * 30 + " shardstream demo: summary " + "=" * 30,
        f"training     {result.step} steps of {tokens_per_step:,} tokens (depth {args.depth}), "
        f"{result.wall_seconds:.1f}s in all",
        f"loss         {first_loss:.3f} -> {last_loss:.3f} (train){val}",
        f"streamed     {streamed}: {timeline.downloads} downloads, "
        f"{timeline.deletions} deletions, {st.downloaded_bytes / 1e6:.2f} MB over the wire{cut}",
        f"disk         peak {timeline.peak_bytes_on_disk / 1e6:.2f} MB on disk, budget {budget / 1e6:.2f} MB, "
        f"dataset {dataset_bytes / 1e6:.2f} MB ({timeline.peak_bytes_on_disk / dataset_bytes:.0%} of it at most)",
        f"first step   after {result.seconds_to_first_step:.1f}s; downloading everything first would take "
        f"{all_first:.1f}s ({dataset_bytes / 1e6:.2f} MB / {args.rate:g} MB/s) before step 0",
        f"data wait    {st.data_wait()}: the loader blocked on shards not downloaded yet (it reads ahead of "
        f"training, which may have lost less)",
        f"timeline     {timeline.path}",
        f"checkpoint   {result.checkpoint}",
    ]
    return "\n".join(lines)


def cli(argv):
    args = build_parser().parse_args(argv)
    logging.getLogger("rustbpe").setLevel(logging.WARNING)     # its per-merge progress lines
    try:
        return run_demo(args)
    except ShardStreamError as e:
        print(f"shardstream demo: error: {e}")
        return 2
