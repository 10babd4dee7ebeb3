"""Multi-epoch: bytes downloaded in 3 epochs of a dataset 1.5x the disk budget, plan-aware vs delete-on-consume.

    python bench/epochs.py            # 18 train shards of ~0.3 MB, budget = 12 shards (val included)
    python bench/epochs.py --smoke    # 9 shards (CI)
    shardstream bench epochs

Offline: sample shards served by a local ShardServer capped at W = 4R; a simulated trainer reads every
train shard in order, 3 times (wait_for_shard / sleep bytes/R / release). Both runs use the same adaptive
StreamingDownloader under the same budget; they differ only in what the downloader knows:
- plan-aware: plan=ReadPlan.sequential(N, epochs=3). Consumed shards that a later epoch reads stay while
  the budget allows; under pressure the one read furthest in the future goes (Belady's rule).
- delete-on-consume: plan=ReadPlan.sequential(N, epochs=1) (what a downloader that does not know the
  future does: a consumed shard is never read again as far as it knows, so it goes at once).
Prints bytes the server sent, shard downloads, data-wait % after the first batch, wall time and peak
bytes on disk, and the ratio plan-aware / delete-on-consume. The floor for any policy is one download per
shard (1.00x the train bytes) plus what a cache of the budget's size cannot hold between epochs.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # the checkout's shardstream

from bench.streaming import NO_FLOOR, POLICY, DiskSampler  # noqa: E402
from shardstream.cache import ReadPlan  # noqa: E402
from shardstream.downloader import StreamingDownloader  # noqa: E402
from shardstream.sample import make_sample  # noqa: E402
from shardstream.server import ShardServer  # noqa: E402
from shardstream.shards import shard_name  # noqa: E402
from shardstream.source import Source  # noqa: E402

EPOCHS = 3


def run(srv, n, sizes, plan, budget, rate_bps, data):
    waited, first = 0.0, None
    with DiskSampler(data) as disk:
        t_start = time.monotonic()
        with StreamingDownloader(source=Source(srv.url, n + 1), data_dir=data, plan=plan, max_cache_bytes=budget,
                                 prefetch="auto", fetch_policy=POLICY, disk_policy=NO_FLOOR, progress=False,
                                 verify_existing="size") as dl:
            for _ in range(EPOCHS):
                for i in range(n):
                    t0 = time.monotonic()
                    dl.wait_for_shard(i)
                    t1 = time.monotonic()
                    if first is None:
                        first = t1
                    else:
                        waited += t1 - t0
                    time.sleep(sizes[i] / rate_bps)
                    dl.release(i)
            st = dl.get_status()
        t_end = time.monotonic()
    sent = sum(srv.stats(shard_name(i)).bytes_sent for i in range(n))
    gets = sum(srv.stats(shard_name(i)).get_requests for i in range(n))
    return dict(sent=sent, downloads=gets, wait_pct=100 * waited / (t_end - first), wall=t_end - t_start,
                peak=disk.peak, budget=budget, failures=st.failures)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", "--quick", action="store_true", dest="smoke", help="a few-second smoke run (CI)")
    p.add_argument("--shards", type=int, default=None, help="train shards (default 18, --smoke 9)")
    p.add_argument("--chars", type=int, default=1_000_000, help="characters per shard (~0.3 MB)")
    p.add_argument("--read-seconds", type=float, default=0.05, help="seconds the trainer spends on a shard")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    n = args.shards or (9 if args.smoke else 18)
    work = Path(tempfile.mkdtemp(prefix="shardstream-bench-epochs-"))
    try:
        remote = work / "remote"
        make_sample(remote, n + 1, args.chars, seed=11)
        sizes = {i: (remote / shard_name(i)).stat().st_size for i in range(n + 1)}
        train = sum(sizes[i] for i in range(n))
        budget = int(train / 1.5)
        rate_bps = train / n / args.read_seconds
        print(f"bench/epochs: {EPOCHS} epochs of {n} train shards ({train / 1e6:.1f} MB), budget {budget / 1e6:.1f} MB "
              f"(train = 1.5x budget), R = {rate_bps / 1e6:.1f} MB/s, W = 4R; {os.cpu_count()} cpus, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        rows = {}
        with ShardServer(remote, rate=4 * rate_bps / 1e6) as srv:
            for name, epochs in (("plan-aware (Belady)", EPOCHS), ("delete-on-consume", 1)):
                srv.reset_stats()
                rows[name] = run(srv, n, sizes, ReadPlan.sequential(n, epochs=epochs), budget, rate_bps,
                                 work / f"data-{epochs}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'policy':<22} {'MB sent':>8} {'x train':>7} {'downloads':>9} {'wait %':>7} {'wall s':>7} "
          f"{'peak MB':>8} {'budget MB':>9}")
    for name, r in rows.items():
        print(f"{name:<22} {r['sent'] / 1e6:>8.1f} {r['sent'] / train:>7.2f} {r['downloads']:>9} {r['wait_pct']:>7.2f} "
              f"{r['wall']:>7.2f} {r['peak'] / 1e6:>8.1f} {r['budget'] / 1e6:>9.1f}")
    a, b = rows["plan-aware (Belady)"], rows["delete-on-consume"]
    print(f"RESULT epochs: plan-aware downloads {a['sent'] / b['sent']:.2f}x the bytes of delete-on-consume "
          f"({a['sent'] / train:.2f}x vs {b['sent'] / train:.2f}x the train bytes over {EPOCHS} epochs)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(train=train, epochs=EPOCHS, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
