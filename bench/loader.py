"""The loader vs raw tokenization vs the naive best-fit loader: tokens/s on the same shards, and peak RSS.

    python bench/loader.py            # 8 sample shards x 4 M chars; B=16 T=1024 and B=32 T=2048
    python bench/loader.py --quick    # tiny sizes, for a smoke test (CI)
    shardstream bench loader --quick

One run, the same sample shards (shardstream.sample.make_sample), the same tokenizer (trained here with
rustbpe on shard 0) and the same tokenizer thread count for all three:
- raw encode: `tokenizer.encode(batch, prepend=bos, num_threads=threads)` over the shards' documents,
  already in memory, in batches of tokenizer_batch_size: the ceiling for any loader.
- naive: nanochat's algorithm written plainly (read a row group, encode, refill a list buffer to
  buffer_size docs, scan the list for the largest doc that fits, crop the shortest, torch.tensor per doc),
  all in the calling thread.
- loader: shardstream.loader with a plain data dir, device="cpu", given our Tokenizer (the loader
  uses its encode_arrays: numpy ids without a Python int per token, so it can beat raw encode);
- loader/list: the same loader given a tokenizer with nanochat's interface only (encode returning
  lists, as nanochat's own tokenizer): what a nanochat tokenizer gets.
"raw encode_arrays" (our tokenizer's numpy path, the ceiling for the loader's own path) is printed too, with
the path it takes (tiktoken's encode_to_numpy, or the list fallback on a tiktoken without a matching one).
Both loaders are timed in steady state (from their first batch to the last), and three figures are given:
"tokenized" (tokens the pipeline encoded per second: the unit of raw encode, so the ratio is the share of
the tokenizer's speed a loader keeps), "delivered" (B*T tokens per batch per second; lower than
tokenized by the tokens best-fit crops away) and "per CPU-s" (tokenized tokens per second of this
process's CPU time: the loader's overhead on top of encoding, insensitive to other load on the machine).
Each is the best of --repeats runs, interleaved; under other load the best-of figures swing, so the
median over the rounds of (loader / the raw encode run just before it) is printed too.

Then memory: the loader streams 24 small shards through a StreamingDownloader from a local ShardServer
under a budget, and the process's RSS is sampled every batch (flat = peak within a few MB of the RSS
after the first shards).
"""
import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # the checkout's shardstream

from shardstream.loader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn  # noqa: E402
from shardstream.sample import make_sample  # noqa: E402
from shardstream.tokenizer import array_encoder, train_tokenizer_from_shards  # noqa: E402


class CountingTokenizer:
    """Passes nanochat's interface through to a tokenizer, counting the tokens encode() returns."""

    def __init__(self, tok):
        self.tok = tok
        self.tokens = 0

    def get_bos_token_id(self):
        return self.tok.get_bos_token_id()

    def identity(self):
        return self.tok.identity()

    def encode(self, texts, prepend=None, append=None, num_threads=8):
        rows = self.tok.encode(texts, prepend=prepend, append=append, num_threads=num_threads)
        self.tokens += sum(map(len, rows))
        return rows


class CountingArrayTokenizer(CountingTokenizer):
    """CountingTokenizer plus encode_arrays (counted with the BOS the loader adds, as encode counts it)."""

    def encode_arrays(self, texts, num_threads=8):
        arrays = self.tok.encode_arrays(texts, num_threads=num_threads)
        self.tokens += sum(map(len, arrays)) + len(arrays)
        return arrays


def read_texts(paths):
    texts = []
    for path in paths:
        texts += pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return texts


def naive_loader(tok, paths, B, T, threads, batch_size, buffer_size):
    """nanochat's best-fit loader, written plainly: every step in the calling thread, a list buffer."""
    bos = tok.get_bos_token_id()

    def doc_batches():
        while True:
            for path in paths:
                pf = pq.ParquetFile(path)
                for rg in range(pf.num_row_groups):
                    texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                    for i in range(0, len(texts), batch_size):
                        yield texts[i:i + batch_size]

    stream = doc_batches()
    buf = []
    cap = T + 1
    rows = torch.empty((B, cap), dtype=torch.long)
    while True:
        for r in range(B):
            pos = 0
            while pos < cap:
                while len(buf) < buffer_size:
                    buf.extend(tok.encode(next(stream), prepend=bos, num_threads=threads))
                rem = cap - pos
                best, best_len = -1, 0
                for i, doc in enumerate(buf):
                    if best_len < len(doc) <= rem:
                        best, best_len = i, len(doc)
                if best >= 0:
                    doc = buf.pop(best)
                    rows[r, pos:pos + len(doc)] = torch.tensor(doc, dtype=torch.long)
                    pos += len(doc)
                else:
                    shortest = min(range(len(buf)), key=lambda i: len(buf[i]))
                    doc = buf.pop(shortest)
                    rows[r, pos:] = torch.tensor(doc[:rem], dtype=torch.long)
                    pos = cap
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def time_raw_encode(tok, texts, threads, batch_size, arrays=False):
    """(tokens/s, tokens per CPU second) of tok.encode (or tok.encode_arrays, + 1 BOS per doc)."""
    bos = tok.get_bos_token_id()
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), batch_size):
        if arrays:
            rows = tok.encode_arrays(texts[i:i + batch_size], num_threads=threads)
            n += sum(map(len, rows)) + len(rows)
        else:
            n += sum(map(len, tok.encode(texts[i:i + batch_size], prepend=bos, num_threads=threads)))
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def time_loader(make, counter, B, T, n_batches):
    """(tokenized tokens/s, delivered tokens/s, tokenized tokens per CPU second) from the first batch to
    the n-th."""
    gen = make()
    next(gen)
    tok0 = counter.tokens
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_batches - 1):
        next(gen)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokenized = counter.tokens - tok0
    gen.close()
    return tokenized / dt, (n_batches - 1) * B * T / dt, tokenized / cpu


def rss_while_streaming(tok, work, n_shards, chars, B, T, threads, buffer_size):
    """Stream n_shards through a StreamingDownloader (budget ~3 shards); RSS samples per batch."""
    from shardstream.downloader import StreamingDownloader
    from shardstream.server import ShardServer
    from shardstream.source import Source
    remote = work / "remote"
    make_sample(remote, n_shards + 1, chars, seed=1)
    size = max(p.stat().st_size for p in remote.glob("shard_*.parquet"))
    proc = psutil.Process()
    samples = []            # (shard index being read, rss)
    with ShardServer(remote) as srv, StreamingDownloader(
            source=Source(srv.url, dataset_shards=n_shards + 1), data_dir=work / "cache", buffer_size=1,
            max_cache_bytes=4 * size, progress=False) as dl:
        gen = loader_fn(tok, B, T, "train", tokenizer_threads=threads, device="cpu", buffer_size=buffer_size,
                        streaming_downloader=dl)
        while True:
            _, _, state = next(gen)
            if state["epoch"] > 1:
                break
            samples.append((state["pq_idx"], proc.memory_info().rss))
        gen.close()
    return samples


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--shards", type=int, default=None, help="train shards (default 8, --quick 2)")
    p.add_argument("--chars-per-shard", type=int, default=None, help="default 4,000,000 (--quick 300,000)")
    p.add_argument("--threads", type=int, default=4, help="tokenizer threads, for all three (default 4)")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer vocab size (default 4096)")
    p.add_argument("--buffer-size", type=int, default=1000, help="packing buffer, docs (default 1000)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved; best is reported")
    p.add_argument("--rss-shards", type=int, default=None, help="shards streamed for RSS (default 24, --quick 4)")
    p.add_argument("--dir", default=None, help="work directory (default a new temp dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quick = args.quick
    shards = args.shards or (2 if quick else 8)
    chars = args.chars_per_shard or (300_000 if quick else 4_000_000)
    rss_shards = args.rss_shards or (4 if quick else 24)
    configs = [(4, 128)] if quick else [(16, 1024), (32, 2048)]
    batch_size = 128
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-loader-"))
    data = work / "data"

    print(f"bench/loader: {shards} train shards x {chars:,} chars, tokenizer threads {args.threads}, "
          f"buffer {args.buffer_size}, {os.cpu_count()} cores (load {os.getloadavg()[0]:.1f})")
    make_sample(data, shards + 1, chars, seed=0)
    paths = [data / f"shard_{i:05d}.parquet" for i in range(shards)]
    tok = train_tokenizer_from_shards(paths[:1], vocab_size=args.vocab, max_chars=2_000_000)
    texts = read_texts(paths)
    counter = CountingArrayTokenizer(tok)
    list_counter = CountingTokenizer(tok)
    total_tokens = sum(map(len, tok.encode(texts, prepend=tok.get_bos_token_id(), num_threads=args.threads)))
    print(f"tokenizer {tok.identity()} vocab {tok.get_vocab_size()}; {len(texts):,} docs, {total_tokens:,} tokens "
          f"({total_tokens / len(texts):.0f}/doc); encode_arrays via "
          f"{'encode_to_numpy' if array_encoder(tok.enc)[1] else 'lists (fallback)'}")

    ok = True
    for B, T in configs:
        # rows for about half the data per run (plus cropped tokens and the buffer): no run wraps an epoch
        n_batches = max(3, int(0.5 * total_tokens / (B * (T + 1))))
        best = {"naive": (0, 0, 0), "loader": (0, 0, 0), "loader/list": (0, 0, 0)}
        raw, raw_cpu, raw_arr, raw_arr_cpu = 0, 0, 0, 0
        round_ratios = {"loader": [], "loader/list": []}
        for _ in range(args.repeats):
            r, c = time_raw_encode(tok, texts, args.threads, batch_size)
            round_raw = r
            raw, raw_cpu = max(raw, r), max(raw_cpu, c)
            r, c = time_raw_encode(tok, texts, args.threads, batch_size, arrays=True)
            raw_arr, raw_arr_cpu = max(raw_arr, r), max(raw_arr_cpu, c)

            def loader(tokenizer):
                return lambda: loader_fn(tokenizer, B, T, "train", tokenizer_threads=args.threads,
                                         tokenizer_batch_size=batch_size, device="cpu",
                                         buffer_size=args.buffer_size, data_dir=data)
            runs = {
                "naive": (list_counter, lambda: naive_loader(list_counter, paths, B, T, args.threads, batch_size,
                                                             args.buffer_size)),
                "loader": (counter, loader(counter)),
                "loader/list": (list_counter, loader(list_counter)),
            }
            for name, (count, make) in runs.items():
                r = time_loader(make, count, B, T, n_batches)
                best[name] = tuple(max(a, b) for a, b in zip(best[name], r))
                if name in round_ratios:
                    round_ratios[name].append(r[0] / round_raw)
        print(f"\nB={B} T={T} ({n_batches} batches per run; load {os.getloadavg()[0]:.1f})")
        print(f"  raw encode            {raw / 1e6:6.2f} M tok/s                                          "
              f"     per CPU-s {raw_cpu / 1e6:5.2f} M")
        print(f"  raw encode_arrays     {raw_arr / 1e6:6.2f} M tok/s = {raw_arr / raw:4.2f}x raw                            "
              f"per CPU-s {raw_arr_cpu / 1e6:5.2f} M = {raw_arr_cpu / raw_cpu:4.2f}x raw")
        for name, (tokd, dlv, cpu) in best.items():
            print(f"  {name:<11} tokenized {tokd / 1e6:6.2f} M tok/s = {tokd / raw:4.2f}x raw;  "
                  f"delivered {dlv / 1e6:6.2f} M tok/s = {dlv / raw:4.2f}x raw;  "
                  f"per CPU-s {cpu / 1e6:5.2f} M = {cpu / raw_cpu:4.2f}x raw")
        ratio = best["loader"][0] / raw
        print(f"  loader / naive: tokenized {best['loader'][0] / best['naive'][0]:.2f}x, "
              f"delivered {best['loader'][1] / best['naive'][1]:.2f}x;  target loader >= 0.9x raw encode: "
              f"{'met' if ratio >= 0.9 else 'NOT met'} ({ratio:.2f}x; with a list-only tokenizer "
              f"{best['loader/list'][0] / raw:.2f}x)")
        print("  median over rounds of loader / raw encode run just before: " + ", ".join(
            f"{name} {statistics.median(v):.2f}x" for name, v in round_ratios.items()))
        ok &= ratio >= 0.9

    B, T = configs[0]
    samples = rss_while_streaming(tok, work / "rss", rss_shards, 300_000 if not quick else 100_000, B, T,
                                  args.threads, args.buffer_size)
    by_shard = {}
    for shard, rss in samples:
        by_shard[shard] = max(by_shard.get(shard, 0), rss)
    early = by_shard.get(min(2, max(by_shard)), samples[0][1])
    peak = max(rss for _, rss in samples)
    mb = 1 << 20
    print(f"\nRSS streaming {rss_shards} shards through a StreamingDownloader (B={B} T={T}, {len(samples)} batches):"
          f" after shard 2 {early / mb:.0f} MB, peak {peak / mb:.0f} MB, last {samples[-1][1] / mb:.0f} MB "
          f"(growth after shard 2: {(peak - early) / mb:+.1f} MB)")
    print("per shard (max MB): " + " ".join(f"{by_shard[s] / mb:.0f}" for s in sorted(by_shard)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
