"""Resume: time to the first batch after a resume (from the loader's state_dict) vs a fresh start.

    python bench/resume.py            # 8 train shards of ~0.3 MB, server capped so a shard takes ~0.3 s
    python bench/resume.py --smoke    # (CI)
    shardstream bench resume

Offline: sample shards served by a local ShardServer capped at W MB/s, a tokenizer trained here (rustbpe),
the loader (shardstream.loader, device="cpu") over an adaptive StreamingDownloader under a budget.
1. fresh:   an empty data dir; time from creating the downloader to the loader's first batch.
2. the run goes on to batch K (into the 3rd shard), keeps the state_dict that came with batch K, stops.
3. resume, same data dir: a new downloader on the same dir (the shards on disk are verified and reused),
   a loader with resume_state_dict; time to its first batch, which must equal batch K bitwise.
   The loader's exact resume re-reads the documents its packing buffer held at the last anchor, which
   may come from earlier shards: with retain=0 those were deleted when consumed and come again over the
   network; so 1-3 run twice, with retain=0 (the default) and retain=2.
4. resume, empty data dir (another machine): the same, with nothing on disk.
Prints each time and its ratio to the fresh start, and one shard's download time at W for scale.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # the checkout's shardstream

from bench.streaming import NO_FLOOR, POLICY  # noqa: E402
from shardstream.downloader import StreamingDownloader  # noqa: E402
from shardstream.loader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn  # noqa: E402
from shardstream.sample import make_sample  # noqa: E402
from shardstream.server import ShardServer  # noqa: E402
from shardstream.shards import shard_name  # noqa: E402
from shardstream.source import Source  # noqa: E402
from shardstream.status import read_events  # noqa: E402
from shardstream.tokenizer import train_tokenizer_from_shards  # noqa: E402

B, T = 4, 256


def first_batch(srv, n, data, tok, budget, state=None, retain=0):
    """(seconds from a new downloader to the first batch, that batch, a loader + downloader to go on)."""
    t0 = time.monotonic()
    dl = StreamingDownloader(n, data_dir=data, source=Source(srv.url, n + 1), max_cache_bytes=budget,
                             prefetch="auto", fetch_policy=POLICY, disk_policy=NO_FLOOR, progress=False,
                             verify_existing="sha256", retain=retain).start()
    gen = loader_fn(tok, B, T, "train", tokenizer_threads=2, tokenizer_batch_size=64, device="cpu",
                    buffer_size=200, resume_state_dict=state, streaming_downloader=dl)
    x, y, st = next(gen)
    return time.monotonic() - t0, (x.clone(), y.clone(), st), gen, dl


def downloads_since_start(data):
    """Shards this run's downloader downloaded so far (events.jsonl since its last "start" event)."""
    evs = read_events(data)
    starts = [i for i, e in enumerate(evs) if e["event"] == "start"]
    return [e["shard"] for e in evs[starts[-1] if starts else 0:] if e["event"] == "downloaded"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", "--quick", action="store_true", dest="smoke", help="a few-second smoke run (CI)")
    p.add_argument("--shards", type=int, default=8, help="train shards (default 8)")
    p.add_argument("--chars", type=int, default=1_000_000, help="characters per shard (~0.3 MB)")
    p.add_argument("--shard-seconds", type=float, default=0.3, help="one shard's download at the capped rate")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    n = 5 if args.smoke else args.shards
    work = Path(tempfile.mkdtemp(prefix="shardstream-bench-resume-"))
    try:
        remote = work / "remote"
        make_sample(remote, n + 1, args.chars if not args.smoke else 400_000, seed=13)
        sizes = {i: (remote / shard_name(i)).stat().st_size for i in range(n + 1)}
        shard = max(sizes.values())
        w = shard / args.shard_seconds
        tok = train_tokenizer_from_shards([remote / shard_name(0)], vocab_size=512, max_chars=300_000)
        budget = 6 * shard
        print(f"bench/resume: {n} train shards of ~{shard / 1e6:.2f} MB, W = {w / 1e6:.2f} MB/s (one shard "
              f"{args.shard_seconds:g} s), B={B} T={T}, budget {budget / 1e6:.1f} MB; {os.cpu_count()} cpus, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        rows, batches = [], []
        with ShardServer(remote, rate=w / 1e6) as srv:
            for retain in (0, 2):
                data = work / f"data-retain{retain}"
                t_fresh, _, gen, dl = first_batch(srv, n, data, tok, budget, retain=retain)
                target = 2 if n > 2 else n - 1          # go on into this shard
                k = 1
                while True:
                    x, y, st = next(gen)
                    k += 1
                    if st["pq_idx"] >= target:
                        batch_k = (x.clone(), y.clone(), st)
                        break
                gen.close()
                dl.stop()
                t_same, b_same, gen, dl = first_batch(srv, n, data, tok, budget, batch_k[2], retain=retain)
                got = downloads_since_start(data)
                gen.close()
                dl.stop()
                rows += [(f"fresh start, retain={retain}", t_fresh, t_fresh, None),
                         (f"resume at batch {k}, same dir, retain={retain}", t_same, t_fresh, got)]
                batches.append((b_same, batch_k))
            t_empty, b_empty, gen, dl = first_batch(srv, n, work / "elsewhere", tok, budget, batch_k[2])
            got = downloads_since_start(work / "elsewhere")
            gen.close()
            dl.stop()
            rows.append((f"resume at batch {k}, empty data dir", t_empty, rows[0][1], got))
            batches.append((b_empty, batch_k))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    exact = all(torch.equal(b[0], want[0]) and torch.equal(b[1], want[1]) for b, want in batches)
    print(f"\n{'first batch after':<42} {'seconds':>8} {'/ fresh':>8} {'/ 1 shard':>9}  downloads before it")
    for name, t, fresh, got in rows:
        print(f"{name:<42} {t:>8.2f} {t / fresh:>8.2f} {t / args.shard_seconds:>9.2f}  "
              f"{'' if got is None else f'{len(got)} {sorted(got)}'}")
    print(f"RESULT resume: first batch after resume {rows[1][1]:.2f}s (retain=0), {rows[3][1]:.2f}s (retain=2) "
          f"vs fresh {rows[0][1]:.2f}s; downloads before it {len(rows[1][3])} / {len(rows[3][3])}; resumed "
          f"batches equal the originals: {'yes' if exact else 'NO'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(rows=rows, batch=k, exact=exact, shard_seconds=args.shard_seconds),
                                              indent=1))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
