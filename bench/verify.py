"""What each verification level costs per shard: the footer check and the decode check, against the sha256 every download already pays.

    python bench/verify.py            # nanochat-like shards of ~28 MB and ~100 MB, 3 runs each
    python bench/verify.py --quick    # one ~3 MB shard, for a smoke test
    shardstream bench verify --quick

A fetch verifies a shard before it gets its final name. "footer" (the default) checks its size, its
checksum when the source gives one (sha256 while streaming) and the parquet footer; "decode"
(FetchPolicy(verify="decode"), `--verify decode`) also reads and decompresses every page of every column,
with parquet page checksums where the writer stored them, so a flipped byte inside a data page is caught
even where the source gives no checksum. Prints, per shard size, the median seconds of sha256, footer and
decode, decode's cost as a multiple of sha256 and as a share of the shard's download at a 25 MB/s link.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))     # the checkout's shardstream

from shardstream.sample import make_sample  # noqa: E402
from shardstream.shards import shard_name  # noqa: E402
from shardstream.verify import check_parquet, decode_parquet, sha256_file  # noqa: E402

LINK_MB_PER_S = 25.0


def median_seconds(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small shard, one run")
    args = p.parse_args(argv)
    sizes = [4_000_000] if args.quick else [100_000_000, 360_000_000]    # text characters per shard
    runs = 1 if args.quick else 3
    print(f"{'shard':>9}  {'sha256':>8}  {'footer':>8}  {'decode':>8}  {'decode/sha256':>13}  "
          f"{'decode / download at %g MB/s' % LINK_MB_PER_S:>28}")
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        for chars in sizes:
            d = Path(tmp) / str(chars)
            make_sample(d, 1, chars, seed=3)
            path = d / shard_name(0)
            mb = path.stat().st_size / 1e6
            sha = median_seconds(lambda: sha256_file(path), runs)
            footer = median_seconds(lambda: check_parquet(path), runs)
            decode = median_seconds(lambda: decode_parquet(path), runs)
            print(f"{mb:>6.1f} MB  {sha:>7.3f}s  {footer:>7.4f}s  {decode:>7.3f}s  {decode / sha:>12.2f}x  "
                  f"{decode / (mb / LINK_MB_PER_S):>27.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
