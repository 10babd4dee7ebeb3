"""Streaming: a simulated trainer reading at R MB/s from a server capped at W MB/s, W/R in {0.8, 1.25, 4}.

    python bench/streaming.py               # 24 train shards of ~0.3 MB, R = 0.7 MB/s (a read takes 0.4 s)
    python bench/streaming.py --smoke       # 6 shards, W/R = 1.25 only (CI)
    python bench/streaming.py --size real   # 12 train shards of ~24 MB, W = 10, 25 and 100 MB/s, a long run (~7 min)
    shardstream bench streaming

Offline: sample shards (shardstream.sample.make_sample) served by a local ShardServer whose token bucket
caps all connections together at W MB/s (set_rate). The trainer calls wait_for_shard(i) /
release(i) for every train shard in order and "trains" on each for bytes/R seconds (a sleep).

Three ways to get the data, measured in the same run on the same shards:
- adaptive:  StreamingDownloader(prefetch="auto", initial_buffer=1) under a budget: the window sized from measured rates;
- fixed-5:   StreamingDownloader(buffer_size=5, initial_buffer=5): a fixed window, same budget;
- all-first: download every shard first (4 workers, like `python -m nanochat.dataset -n N -w 4`), then
             train from the local dir: nanochat today.

Figures per case: time to first batch (and / one shard's download time at W), data-wait as % of the wall
time after the first batch, achieved MB/s (train bytes the trainer read / wall time), link MB/s (bytes
downloaded / time from start to the last download: the share of W the downloader used), peak bytes on
disk (sampled every 20 ms from the directory, partial files included) against the budget, waits.
The real size (`--size real`) uses nanochat-like shards of ~24 MB and sets W (10, 25, 100 MB/s) with R =
W / ratio, and adds an uncapped case where the trainer really reads every shard's text column with
pyarrow (no sleep): download + read, streaming against downloading everything first, in parquet MB/s.
Then a long run: adaptive only, W = 25 MB/s, W/R = 0.8, --long-shards train shards (default 48; hard links
to the same files, taken in turn, on a second server). A run of N shards cannot show the reader >= 0.95 W:
its last read starts after all N train shards crossed the link and takes W/R of one shard's download, so
even a perfect link gives the reader at most N / (N + W/R) of W (0.94 W for N = 12, 0.98 W for N = 48);
N / (N + 1 + W/R) when the val shard must cross before the last train shard, as for a trainer that
evaluates early (0.87, 0.96; here nothing reads it, so it may come last). nanochat reads thousands of
shards: the long run is the fair measure of what the reader gets. The same long set is then read uncapped,
streaming vs downloading everything first: a 12-shard uncapped run lasts ~2 s, in which the fixed costs
(the first shard, the helper process's start) weigh as they never do in training. Rows carry both bounds, in W (bound_w,
bound_w_val_first).

Targets: W/R >= 1.25 -> data-wait <= 1 % after the first batch; W/R = 0.8 -> link >= 0.95 W, and the
reader >= 0.95 W in the long run;
first batch <= 1.2x one shard's download; peak disk <= budget. One PNG per streaming case (disk, shards
ahead, waits over time: shardstream.timeline) goes to bench/out/. --json writes the figures.

Beside every measured case it prints what the planner predicts (shardstream.simulate, the scheduler of
`shardstream plan` on a simulated clock) for the same shards, rates, budget and policy, with this
machine's costs measured during the warm-up (a HEAD's round trip, the footer check after a transfer's
last byte, a read's own cost) and the server's token bucket as the link (50 ms of credit banked while
idle; emptied before every case), and a table of how well they agree (targets: first batch within 20 %,
wait within 2 percentage points, peak disk within 15 %). bench/RESULTS.md, section 2b, has the figures.
"""
import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # the checkout's shardstream

from shardstream.checksums import write_sha256sums  # noqa: E402
from shardstream.download import download_shards  # noqa: E402
from shardstream.downloader import DiskPolicy, StreamingDownloader  # noqa: E402
from shardstream.fetch import FetchPolicy  # noqa: E402
from shardstream.sample import make_sample  # noqa: E402
from shardstream.server import ShardServer  # noqa: E402
from shardstream.shards import shard_name  # noqa: E402
from shardstream.simulate import Link, Scenario, download_everything_first, simulate  # noqa: E402
from shardstream.source import Source  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
POLICY = FetchPolicy(fsync=False, connect_timeout=5, stall_timeout=10, backoff_initial=0.05, backoff_max=0.5)
ALL_FIRST = dataclasses.replace(POLICY, process=False)    # the baseline at its fastest: nothing else runs
                                                            # here, so a helper process would only cost its start
NO_FLOOR = DiskPolicy(warn_free_bytes=0, min_free_bytes=0)


def dir_bytes(d):
    """Bytes of shard files and partial files in d, as the budget counts them."""
    total = 0
    try:
        entries = list(os.scandir(d))
    except FileNotFoundError:
        return 0
    for e in entries:
        if e.name.startswith("shard_") and (e.name.endswith(".parquet") or e.name.endswith(".partial")):
            try:
                total += e.stat().st_size
            except FileNotFoundError:
                pass
    return total


class DiskSampler:
    """Peak bytes on disk in a directory, sampled every `every` seconds in a thread."""

    def __init__(self, d, every=0.02):
        self.d, self.every, self.peak = d, every, 0
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, dir_bytes(self.d))
            self._done.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._t.join()
        self.peak = max(self.peak, dir_bytes(self.d))


def train(get, release, ids, sizes, rate_bps, t_start):
    """The simulated trainer: for each shard get it, 'train' bytes/R seconds, release it; with rate_bps
    None it reads the shard's text column with pyarrow instead (the real work of a loader, as fast as
    the machine goes). Returns (time of the first batch, seconds waited after it, waits after it, time done)."""
    import pyarrow.parquet as pq
    first, waited, waits = None, 0.0, 0
    for i in ids:
        t0 = time.monotonic()
        path = get(i)
        t1 = time.monotonic()
        if first is None:
            first = t1
        else:
            waited += t1 - t0
            waits += (t1 - t0) > 0.005
        if rate_bps is None:
            pq.read_table(path, columns=["text"])
        else:
            time.sleep(sizes[i] / rate_bps)
        release(i)
    return first - t_start, waited, waits, time.monotonic()


def run_streaming(mode, srv, n, sizes, rate_bps, budget, work):
    data = work / f"data-{mode}-{time.monotonic_ns()}"
    kw = dict(prefetch="auto", initial_buffer=1) if mode == "adaptive" else dict(buffer_size=5, initial_buffer=5)
    dl = StreamingDownloader(n, data_dir=data, source=Source(srv.url, n + 1), max_cache_bytes=budget, workers=2,
                             fetch_policy=POLICY, disk_policy=NO_FLOOR, progress=False, verify_existing="size",
                             **kw)
    with DiskSampler(data) as disk:
        t_start = time.monotonic()
        dl.start()
        try:
            ttfb, waited, waits, t_end = train(dl.wait_for_shard, dl.release, range(n), sizes, rate_bps, t_start)
            windows = [e.get("window") for e in _events(data) if e.get("window") is not None]
            st = dl.get_status()
        finally:
            dl.stop()
    ev = _events(data)
    done = [e["t"] for e in ev if e["event"] == "downloaded"]
    t0_wall = next(e["t"] for e in ev if e["event"] == "start")
    link = st.downloaded_bytes / (max(done) - t0_wall) if done else 0.0
    return dict(ttfb=ttfb, waited=waited, waits=waits, wall=t_end - t_start, after=t_end - t_start - ttfb,
                link_bps=link, downloaded=st.downloaded_bytes, peak=disk.peak, budget=budget,
                window_max=max(windows, default=None), window_last=windows[-1] if windows else None,
                events=data / ".shardstream" / "events.jsonl")


def run_all_first(srv, n, sizes, rate_bps, work):
    data = work / f"data-all-first-{time.monotonic_ns()}"
    data.mkdir()
    source = Source(srv.url, n + 1)
    with DiskSampler(data) as disk:
        t_start = time.monotonic()
        res = download_shards(source, list(range(n + 1)), data, workers=4, policy=ALL_FIRST)
        t_dl = time.monotonic()
        bad = [r for r in res if isinstance(r, Exception)]
        if bad:
            raise SystemExit(f"download-everything-first failed: {bad[0]}")
        ttfb, waited, waits, t_end = train(lambda i: data / shard_name(i), lambda i: None, range(n), sizes,
                                           rate_bps, t_start)
    got = sum(r.size for r in res)
    return dict(ttfb=ttfb, waited=waited, waits=waits, wall=t_end - t_start, after=t_end - t_start - ttfb,
                link_bps=got / (t_dl - t_start), downloaded=got, peak=disk.peak, budget=None,
                window_max=None, window_last=None, events=None)


def warm_up(srv, n, work):
    """Unmeasured shards through a downloader, so first-use costs (imports, the server's sha256 cache,
    connection setup code paths) are not charged to the first measured case. Returns what the simulation
    needs to know of this machine, measured here at no rate cap, medians: (a HEAD's round trip, the parquet
    footer check after a transfer's last byte, a read's cost beyond its sleep: wait_for_shard of a shard
    on disk + release + the sleep's overshoot)."""
    from shardstream.verify import check_parquet
    reads = []
    with StreamingDownloader(n, data_dir=work / "warm-up", source=Source(srv.url, n + 1), fetch_policy=POLICY,
                             disk_policy=NO_FLOOR, progress=False) as dl:
        time.sleep(0.3)                         # the window comes in at no cap meanwhile
        for i in range(4):
            t0 = time.perf_counter()
            dl.wait_for_shard(i)
            time.sleep(0.05)
            dl.release(i)
            reads.append(time.perf_counter() - t0 - 0.05)
    heads, checks = head_all(srv, n), []
    for i in range(min(n + 1, 8)):
        t0 = time.perf_counter()
        check_parquet(srv.directory / shard_name(i))
        checks.append(time.perf_counter() - t0)
    shutil.rmtree(work / "warm-up", ignore_errors=True)
    return tuple(sorted(v)[len(v) // 2] for v in (heads, checks, reads))


def head_all(srv, n):
    """A HEAD of every shard (train and val) through one kept-alive session, as a worker sends them: the
    server hashes each file on its first HEAD (X-Linked-Etag), which is not to be charged to a case.
    Returns each HEAD's seconds."""
    import requests

    from shardstream.fetch import remote_info
    source, heads = Source(srv.url, n + 1), []
    with requests.Session() as session:
        for i in range(n + 1):
            t0 = time.perf_counter()
            remote_info(source, i, POLICY, session=session)
            heads.append(time.perf_counter() - t0)
    return heads


def link_remote(remote, paths, n):
    """remote/shard_00000.parquet .. shard_{n}.parquet (the last is val): hard links to paths in turn (a copy
    where the file system has none), with their SHA256SUMS. Returns the new paths."""
    remote.mkdir()
    out = []
    for i in range(n + 1):
        src, dst = paths[i % len(paths)], remote / shard_name(i)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        out.append(dst)
    write_sha256sums(remote, out)
    return out


def bound_w(n, ratio, val_first=False):
    """The most of W a reader of n train shards can get with a perfect link at W/R = ratio, in shard-times
    (one shard's download at W): its last read (ratio) starts after all n train shards crossed the link,
    the val shard too with val_first; and it reads n shards (ratio each) after the first one came. None
    uncapped."""
    if ratio is None:
        return None
    return n / max(n + (1 if val_first else 0) + ratio, 1 + n * ratio)


def simulated(mode, n, sizes, rate_bps, w_bps, budget, costs):
    """What shardstream.simulate predicts for this case: (first batch s, wait fraction, peak bytes, window max).
    The link is the server's token bucket: W shared by all connections, 50 ms of credit banked while idle."""
    head_s, check_s, read_s = costs
    link = Link(w_bps / 1e6, probe_latency_s=head_s, verify_s=check_s, burst_s=0.05)
    shards = tuple(sizes[i] for i in range(n + 1))
    if mode == "all-first":
        t = download_everything_first(shards, link, workers=4)
        return t, 0.0, sum(shards), None
    kw = dict(window=None, initial_buffer=1) if mode == "adaptive" else dict(window=5, initial_buffer=5)
    r = simulate(Scenario(shards, rate_bps / 1e6, link, budget, workers=2, read_overhead_s=read_s, **kw)).worst
    return r.first_step_s, r.wait_fraction, r.peak_disk_bytes, r.window_max


def _events(data):
    from shardstream.status import read_events
    try:
        return read_events(data)
    except Exception:
        return []


REAL_CASES = ((25, 0.8), (25, 1.25), (25, 4), (10, 1.25), (100, 1.25), (None, None))   # (W MB/s, W/R)
LONG_W, LONG_RATIO = 25, 0.8                # the long run's case: the target a short run cannot show


def cases(args, rate_bps):
    """(W in bytes/s or None for uncapped, W/R or None, R in bytes/s or None for a real read) per case."""
    if args.size == "real":
        ratios = [float(x) for x in args.ratios.split(",")] if args.ratios else None
        out = []
        for w, ratio in REAL_CASES:
            if w is None:
                out.append((None, None, None))
            elif ratios is None or ratio in ratios:
                out.append((w * 1e6, ratio, w * 1e6 / ratio))
        return out
    ratios = [float(x) for x in (args.ratios or ("1.25" if args.smoke else "0.8,1.25,4")).split(",")]
    return [(ratio * rate_bps, ratio, rate_bps) for ratio in ratios]


def long_case(args):
    """(W in bytes/s, W/R, R in bytes/s, train shards) of the long run, or None: real size only, skipped by
    --long-shards 0 or by a --ratios without 0.8."""
    ratios = [float(x) for x in args.ratios.split(",")] if args.ratios else None
    if args.size != "real" or args.long_shards <= 0 or (ratios is not None and LONG_RATIO not in ratios):
        return None
    return LONG_W * 1e6, LONG_RATIO, LONG_W * 1e6 / LONG_RATIO, args.long_shards


def measure(mode, srv, n, sizes, w_bps, ratio, rate_bps, budget, work, costs, args, long=False):
    """One case, one mode: the measured figures, the simulation's beside them, the bound, the PNG."""
    real = args.size == "real"
    srv.reset_stats()
    srv.set_rate(w_bps / 1e6 if w_bps else None)        # every case starts with an empty bucket
    if mode == "all-first":
        r = run_all_first(srv, n, sizes, rate_bps, work)
    else:
        r = run_streaming(mode, srv, n, sizes, rate_bps, budget, work)
    shard = max(sizes.values())
    r.update(mode=mode, ratio=ratio, w_bps=w_bps, r_bps=rate_bps, one_shard=shard / w_bps if w_bps else None,
             achieved_bps=sum(sizes[i] for i in range(n)) / r["wall"], train_shards=n, long=long,
             bound_w=bound_w(n, ratio), bound_w_val_first=bound_w(n, ratio, val_first=True))
    r["sim_ttfb"] = r["sim_wait"] = r["sim_peak"] = r["sim_window_max"] = None
    if w_bps is not None:
        r["sim_ttfb"], r["sim_wait"], r["sim_peak"], r["sim_window_max"] = simulated(
            mode, n, sizes, rate_bps, w_bps, budget, costs)
    if r["events"] is not None and not args.no_plots and w_bps is not None:
        from shardstream.timeline import plot_timeline
        tail = f"_long{n}" if long else ""
        png = OUT / f"streaming_real_{mode}_w{w_bps / 1e6:g}_wr{ratio:g}{tail}.png" if real else \
            OUT / f"streaming_{mode}_wr{ratio:g}.png"
        title = f"{mode}{f', {n} train shards' if long else ''}, W/R = {ratio:g} (W {w_bps / 1e6:.2f} MB/s, " \
                f"R {rate_bps / 1e6:.2f} MB/s)"
        plot_timeline(r["events"], png, title=title)
        r["png"] = str(png.relative_to(OUT.parent.parent))
    r["events"] = None
    r["shard_bytes"] = shard
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", "--quick", action="store_true", dest="smoke", help="a ~10 s smoke run (CI)")
    p.add_argument("--size", choices=("quick", "real"), default="quick",
                   help="quick: shards of ~0.3 MB at R = 0.7 MB/s; real: 12 shards of ~24 MB, W 10-100 MB/s, "
                        "an uncapped download + read and a long W/R = 0.8 run of --long-shards shards (a short "
                        "run's last read keeps its reader under 0.95 W) (~7 min)")
    p.add_argument("--shards", type=int, default=None, help="train shards (default 24, --smoke 6, real 12)")
    p.add_argument("--chars", type=int, default=None,
                   help="characters per shard (default 1,000,000: ~0.3 MB; real 88,000,000: ~24 MB)")
    p.add_argument("--read-seconds", type=float, default=None, help="seconds the trainer spends on a shard (default 0.4, --smoke 0.25; real: from W and W/R)")
    p.add_argument("--ratios", default=None, help="W/R values, comma-separated (default 0.8,1.25,4)")
    p.add_argument("--budget-shards", type=float, default=8, help="budget in shards, val shard included")
    p.add_argument("--long-shards", type=int, default=48,
                   help="train shards of the real size's long W/R = 0.8 run (adaptive; 0 skips it)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    real = args.size == "real"
    n = args.shards or (12 if real else 6 if args.smoke else 24)
    chars = args.chars or (88_000_000 if real else 1_000_000)
    args.read_seconds = args.read_seconds or (0.25 if args.smoke else 0.4)

    work = Path(tempfile.mkdtemp(prefix="shardstream-bench-streaming-"))
    rows = []
    try:
        remote = work / "remote"
        t0 = time.perf_counter()
        paths = make_sample(remote, n + 1, chars, seed=7)
        if real:        # as the Hub does: every shard's sha256 is known, so each is verified by it
            write_sha256sums(remote, paths)
        sizes = {i: (remote / shard_name(i)).stat().st_size for i in range(n + 1)}
        shard = max(sizes.values())
        budget = int(args.budget_shards * shard)
        quick_r = sum(sizes[i] for i in range(n)) / n / args.read_seconds
        todo = cases(args, quick_r)
        rates = "R = W / ratio" if real else f"R = {quick_r / 1e6:.2f} MB/s ({args.read_seconds:g} s a shard)"
        print(f"bench/streaming ({args.size}): {n} train shards + val of ~{shard / 1e6:.2f} MB (made in "
              f"{time.perf_counter() - t0:.1f}s), {rates}, budget {budget / 1e6:.1f} MB ({args.budget_shards:g} "
              f"shards), {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}", flush=True)
        with ShardServer(remote) as srv:
            costs = warm_up(srv, n, work)
            print(f"per-shard costs measured at no rate cap (the simulation's parameters): HEAD {costs[0] * 1e3:.1f} ms, "
                  f"footer check {costs[1] * 1e3:.1f} ms, a read's own cost {costs[2] * 1e3:.1f} ms", flush=True)
            print(HEADER, flush=True)
            for w_bps, ratio, rate_bps in todo:
                for mode in (["adaptive", "all-first"] if w_bps is None else ["adaptive", "fixed-5", "all-first"]):
                    rows.append(measure(mode, srv, n, sizes, w_bps, ratio, rate_bps, budget, work, costs, args))
                    print(fmt_row(rows[-1]), flush=True)
        long = long_case(args)
        if long:            # its own server: shard ids run to n_long, and the val shard is the last one
            w_bps, ratio, rate_bps, n_long = long
            remote_long = work / "remote-long"
            link_remote(remote_long, paths, n_long)
            sizes_long = {i: (remote_long / shard_name(i)).stat().st_size for i in range(n_long + 1)}
            budget_long = int(args.budget_shards * max(sizes_long.values()))
            with ShardServer(remote_long) as srv:
                head_all(srv, n_long)
                rows.append(measure("adaptive", srv, n_long, sizes_long, w_bps, ratio, rate_bps, budget_long,
                                    work, costs, args, long=True))
                print(fmt_row(rows[-1]), flush=True)
                for mode in ("adaptive", "all-first"):      # and uncapped: a run long enough to amortize its start
                    rows.append(measure(mode, srv, n_long, sizes_long, None, None, None, budget_long, work, costs,
                                        args, long=True))
                    print(fmt_row(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    bounds = bound_lines(rows)
    if bounds:
        print()
        print(bounds)
    print()
    print(agreement(rows))
    for long in (False, True):
        uncapped = {r["mode"]: r for r in rows if r["w_bps"] is None and bool(r.get("long")) == long}
        if len(uncapped) != 2:
            continue
        a, b = uncapped["adaptive"]["achieved_bps"], uncapped["all-first"]["achieved_bps"]
        print(f"\nuncapped download + read, {uncapped['adaptive']['train_shards']} shards: streaming {a / 1e6:.1f} "
              f"MB/s of parquet, download-everything-first "
              f"{b / 1e6:.1f} MB/s: {a / b:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


HEADER = (f"{'W':>5} {'W/R':>5} {'N':>4} {'mode':<10} {'1st batch s':>11} {'/1 shard':>8} {'wait %':>7} {'waits':>5} "
          f"{'achieved MB/s':>13} {'link MB/s':>9} {'link/W':>6} {'peak MB':>8} {'budget MB':>9} {'window':>6}"
          f"  | {'sim 1st s':>9} {'sim wait %':>10} {'sim peak MB':>11}")


def _opt(value, spec, width, scale=1.0):
    if value is None:
        return f"{'-':>{width}}"
    return f"{value * scale if scale != 1 else value:>{width}{spec}}"      # an int stays an int (window)


def fmt_row(r):
    wait_pct = 100 * r["waited"] / r["after"] if r["after"] > 0 else 0.0
    budget = f"{r['budget'] / 1e6:9.1f}" if r["budget"] else f"{'none':>9}"
    win = _opt(r["window_max"], "", 6)
    w = f"{r['w_bps'] / 1e6:>5.3g}" if r["w_bps"] else f"{'none':>5}"
    ratio = f"{r['ratio']:>5g}" if r["ratio"] is not None else f"{'-':>5}"
    per_shard = r["ttfb"] / r["one_shard"] if r["one_shard"] else None
    link_w = r["link_bps"] / r["w_bps"] if r["w_bps"] else None
    return (f"{w} {ratio} {r.get('train_shards', '-'):>4} {r['mode']:<10} {r['ttfb']:>11.2f} {_opt(per_shard, '.2f', 8)} {wait_pct:>7.2f} "
            f"{r['waits']:>5} {r['achieved_bps'] / 1e6:>13.2f} {r['link_bps'] / 1e6:>9.2f} "
            f"{_opt(link_w, '.2f', 6)} {r['peak'] / 1e6:>8.1f} {budget} {win}"
            f"  | {_opt(r['sim_ttfb'], '.2f', 9)} {_opt(r['sim_wait'], '.2f', 10, 100)} "
            f"{_opt(r['sim_peak'], '.1f', 11, 1e-6)}")


def agreement(rows):
    """Simulated vs measured per case, and whether each is within its target."""
    lines = ["simulated (shardstream.simulate, same parameters) vs measured: first batch within 20 %, wait within "
             "2 points, peak disk within 15 %",
             f"{'W':>5} {'W/R':>5} {'N':>4} {'mode':<10} {'1st s':>6} {'sim':>6} {'ratio':>5}  {'wait %':>6} {'sim':>6} {'diff':>5}  "
             f"{'peak MB':>7} {'sim':>6} {'ratio':>5}  {'window':>6} {'sim':>4}  agree"]
    for r in rows:
        if r["sim_ttfb"] is None:
            continue
        wait = 100 * r["waited"] / r["after"] if r["after"] > 0 else 0.0
        sw, f1, fp = 100 * r["sim_wait"], r["sim_ttfb"] / r["ttfb"], r["sim_peak"] / r["peak"] if r["peak"] else 0.0
        ok = abs(f1 - 1) <= 0.2 and abs(sw - wait) <= 2 and abs(fp - 1) <= 0.15
        win = f"{r['window_max']:>6}" if r["window_max"] is not None else f"{'-':>6}"
        swin = f"{r['sim_window_max']:>4}" if r["sim_window_max"] is not None else f"{'-':>4}"
        lines.append(f"{r['w_bps'] / 1e6:>5.3g} {r['ratio']:>5g} {r.get('train_shards', '-'):>4} {r['mode']:<10} {r['ttfb']:>6.2f} {r['sim_ttfb']:>6.2f} {f1:>5.2f}  "
                     f"{wait:>6.2f} {sw:>6.2f} {sw - wait:>+5.2f}  {r['peak'] / 1e6:>7.2f} {r['sim_peak'] / 1e6:>6.2f} "
                     f"{fp:>5.2f}  {win} {swin}  {'yes' if ok else 'NO'}")
    return "\n".join(lines)


def bound_lines(rows):
    """For each adaptive run at W/R < 1 (the reader could take more than W): the reader's share of W against
    the most a perfect link gives a run of that many shards (bound_w), and the link's share."""
    lines = []
    for r in rows:
        if r["mode"] != "adaptive" or r["w_bps"] is None or r["ratio"] >= 1 or r.get("bound_w") is None:
            continue
        n, ratio = r["train_shards"], r["ratio"]
        what = f"long run ({n} train shards)" if r.get("long") else f"({n} train shards)"
        lines.append(f"W/R = {ratio:g} {what}: reader {r['achieved_bps'] / r['w_bps']:.3f} W (bound for this N with a "
                     f"perfect link: N/(N+{ratio:g}) = {r['bound_w']:.3f}; N/(N+{1 + ratio:g}) = "
                     f"{r['bound_w_val_first']:.3f} with the val shard first), link {r['link_bps'] / r['w_bps']:.2f} W")
    return "\n".join(lines)


def table(rows):
    lines = ["streaming (W = server cap in MB/s, none: uncapped and a real pyarrow read; R = trainer; N = train shards; wait % = data-wait after the first"
             " batch / wall after it; window = largest)", HEADER] + [fmt_row(r) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
