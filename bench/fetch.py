"""fetch_shard vs curl: MB/s of one shard (and of 8 in parallel) from the same local ShardServer to the same disk.

    python bench/fetch.py            # a 200 MB shard, 3 runs each, interleaved; then 8 x 25 MB, w=8
    python bench/fetch.py --quick    # 20 MB, for a smoke test
    python bench/fetch.py --size real   # shards of 20-100 MB behind a link capped at W (10 and 100 MB/s),
                                     # 8 in parallel; a per-connection cap (split fetches); the trainer's
                                     # Python throughput while we download vs while curl does (~2 min)
    shardstream bench fetch --quick

Both clients fetch the same Hub-style URL of an uncapped ShardServer on 127.0.0.1 and write into the
same temporary directory. curl runs as `curl -s -o FILE URL`. fetch_shard does everything it always
does: HEAD, stream into a partial file, sha256 while streaming, parquet footer check, fsync, atomic
rename. Prints best and median MB/s of each, the CPU each client spent per GB (a figure that a busy
machine disturbs less than MB/s), and the ratio fetch/curl (target >= 0.9). The server runs in its own
process, as a remote one would.

fsync makes fetch_shard wait for the disk and curl does not, so two more pairs separate the costs:
curl + an fsync of its file (the same durability) and fetch_shard with FetchPolicy(fsync=False) (the
transfer path alone). Where loopback is faster than the disk's write-back, the plain ratio measures the
disk, not the code.

--size real (the quick sizes above stay the default): the server caps its link at W like a real one.
  8 shards of 20-100 MB at W=100 MB/s and 8 of 20 MB at W=10 MB/s: download_shards(w=8) with and without
  fsync vs 8 curls with and without fsync; one 100 MB shard behind a per-connection cap of 10 MB/s (link
  100 MB/s): one curl vs fetch_shard over one connection, split in 4, and max_connections="auto"; 8
  shards behind the same per-connection cap; and the trainer's side: a pure-Python loop's iterations/s
  in the main thread while download_shards runs (its transfers in the helper process, as a downloader's
  are once the helper is up, and in this process) vs while curl runs in subprocesses over the same bytes
  at the same W (target >= 0.95), beside the loop alone.
"""
import argparse
import dataclasses
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))     # the checkout's shardstream

from shardstream.download import download_shards  # noqa: E402
from shardstream.fetch import FetchPolicy, fetch_shard  # noqa: E402
from shardstream.server import DEFAULT_HUB_REPO  # noqa: E402
from shardstream.shards import shard_name  # noqa: E402
from shardstream.source import Source  # noqa: E402

DOC_BYTES = 4096


class ServerProcess:
    """`shardstream serve DIR` in its own process, as a remote server would be: its threads do not
    share a GIL (or the bench's CPU accounting) with the client being measured."""

    def __init__(self, directory, rate=None, per_connection=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.hub_url = f"{self.url}/datasets/{DEFAULT_HUB_REPO}/resolve/main"
        caps = (["--rate", str(rate)] if rate else []) + \
            (["--per-connection-mb-per-s", str(per_connection)] if per_connection else [])
        self.proc = subprocess.Popen([sys.executable, "-m", "shardstream", "serve", str(directory),
                                      "--port", str(self.port), *caps], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the shard server did not start")
                time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def write_big_shard(path, size_bytes, seed):
    """A parquet shard with a `text` column of incompressible base64 text, about size_bytes on disk.
    (make_sample writes real English-like text, but making 200 MB of it takes minutes on a small box;
    the transfer only cares about bytes.)"""
    rng = np.random.default_rng(seed)
    n_docs = max(1, size_bytes // DOC_BYTES)
    raw = rng.integers(0, 64, size=n_docs * DOC_BYTES, dtype=np.uint8)
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", dtype=np.uint8)
    data = pa.py_buffer(alphabet[raw].tobytes())
    offsets = pa.py_buffer(np.arange(0, n_docs * DOC_BYTES + 1, DOC_BYTES, dtype=np.int32).tobytes())
    text = pa.StringArray.from_buffers(n_docs, offsets, data)
    pq.write_table(pa.table({"text": text}), path, compression="none", use_dictionary=False,
                   write_statistics=False, row_group_size=1024)


def cpu_seconds():
    """User + system CPU of this process (fetch_shard and its threads) and its waited-for children (curl)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def mbps(nbytes, seconds):
    return nbytes / 1e6 / seconds


def time_curl(urls, out_dir, fsync=False):
    """8 curls run at once for 8 URLs. fsync=True also fsyncs each file, as fetch_shard does."""
    procs = []
    t0 = time.perf_counter()
    for i, url in enumerate(urls):
        procs.append(subprocess.Popen(["curl", "-s", "-o", str(out_dir / f"curl_{i}.bin"), url]))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"curl failed with exit code {p.returncode}")
    if fsync:
        for i in range(len(urls)):
            fd = os.open(out_dir / f"curl_{i}.bin", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(out_dir, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t0


def time_fetch(source, ids, out_dir, workers, fsync=True, policy=None):
    policy = policy or FetchPolicy(fsync=fsync)
    t0 = time.perf_counter()
    if len(ids) == 1:
        fetch_shard(source, ids[0], out_dir, policy)
    else:
        for r in download_shards(source, ids, out_dir, workers, policy):
            if isinstance(r, Exception):
                raise SystemExit(f"fetch failed: {r}")
    return time.perf_counter() - t0


def clear(d):
    for p in d.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()      # .shardstream/ too
    os.sync()                   # start each run with no dirty pages from the last one


def compare(label, srv, source, ids, nbytes, out_dir, repeats, workers, clients=None, ratios=None):
    urls = [f"{srv.hub_url}/{shard_name(i)}" for i in ids]
    clients = clients or {
        "curl": lambda: time_curl(urls, out_dir),
        "fetch_shard": lambda: time_fetch(source, ids, out_dir, workers),
        "curl + fsync": lambda: time_curl(urls, out_dir, fsync=True),
        "fetch_shard, fsync=False": lambda: time_fetch(source, ids, out_dir, workers, fsync=False),
    }
    runs = {k: [] for k in clients}
    cpu = {k: 0.0 for k in clients}
    names = list(clients)
    for rep in range(repeats):                      # interleaved, order rotated: drift hits all alike
        for k in names[rep % len(names):] + names[:rep % len(names)]:
            run = clients[k]
            clear(out_dir)
            c0 = cpu_seconds()
            runs[k].append(mbps(nbytes, run()))
            cpu[k] += cpu_seconds() - c0
    clear(out_dir)
    best = {k: max(v) for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\n{label}")
    for k, v in runs.items():
        print(f"  {k:<26} MB/s  best {best[k]:7.1f}  median {med[k]:7.1f}   "
              f"CPU {cpu[k] / (repeats * nbytes / 1e9):5.2f} s/GB   runs {' '.join(f'{x:.0f}' for x in v)}")

    def ratio(a, b, what):
        print(f"  {what:<50} best {best[a] / best[b]:.2f}  median {med[a] / med[b]:.2f}")
    for a, b, what in ratios or [("fetch_shard", "curl", "ratio fetch/curl (target >= 0.9):"),
                                 ("fetch_shard", "curl + fsync", "ratio fetch/(curl + fsync), same durability:"),
                                 ("fetch_shard, fsync=False", "curl", "ratio fetch(fsync=False)/curl, transfer path:")]:
        ratio(a, b, what)
    return best["fetch_shard"] / best["curl"], med["fetch_shard"] / med["curl"]


# -----------------------------------------------------------------------------
# --size real

REAL_SIZES_MB = (20, 30, 40, 50, 60, 70, 80, 100)      # 8 shards, 450 MB: the W=100 MB/s round
REAL_SMALL_MB = 20                                       # 8 more of this size: the W=10 MB/s round
PER_CONNECTION_MB = 10                                   # a CDN's per-connection cap in the split rounds


def python_loop(until_done):
    """Iterations/s of a pure-Python loop (dict stores and integer arithmetic, like a trainer's Python
    side) run in this thread until until_done() says so (asked every ~2 ms of work)."""
    n, d = 0, {}
    t0 = time.perf_counter()
    while not until_done():
        for i in range(2000):
            d[i & 255] = i * 3 + 1
        n += 2000
    return n / (time.perf_counter() - t0)


def trainer_side(srv, source, ids, out_dir, workers, policy=None, rounds=5):
    """The trainer's pure-Python throughput while download_shards fetches ids (its transfers in the helper
    process, and in this process's threads) vs while curl fetches the same URLs in subprocesses, at the
    server's W; and alone, for context. Each round runs every client once, back to back (order rotated),
    and the ratio to curl is taken within the round: this VM's speed drifts by more than the effect, so
    the median of the per-round ratios is the figure (best of each beside it)."""
    import threading
    urls = [f"{srv.hub_url}/{shard_name(i)}" for i in ids]
    clear(out_dir)
    t_end = time.perf_counter() + 3.0
    alone = python_loop(lambda: time.perf_counter() > t_end)
    policies = {"fetch, helper process": FetchPolicy(process=True), "fetch, this process": FetchPolicy(process=False)}
    if policy is not None:
        policies = {k: dataclasses.replace(policy, process=v.process) for k, v in policies.items()}
    names = ["curl", *policies]
    runs = {k: [] for k in names}
    for r in range(rounds):
        for who in names[r % len(names):] + names[:r % len(names)]:
            clear(out_dir)
            if who == "curl":
                procs = [subprocess.Popen(["curl", "-s", "-o", str(out_dir / f"curl_{k}.bin"), u])
                         for k, u in enumerate(urls)]
                rate = python_loop(lambda: all(p.poll() is not None for p in procs))
            else:
                t = threading.Thread(target=time_fetch, args=(source, ids, out_dir, workers),
                                     kwargs={"policy": policies[who]})
                t.start()
                rate = python_loop(lambda: not t.is_alive())
                t.join()
            runs[who].append(rate)
    clear(out_dir)
    print(f"\ntrainer's pure-Python loop while {len(ids)} shards download at the server's W ({rounds} rounds)")
    print(f"  {'alone':<26} {alone / 1e6:6.2f} M iterations/s")
    for k, v in runs.items():
        print(f"  {k:<26} {statistics.median(v) / 1e6:6.2f} M iterations/s median, {max(v) / 1e6:6.2f} best   "
              f"runs {' '.join(f'{x / 1e6:.2f}' for x in v)}")
    out = {"alone": alone}
    for k in policies:
        per_round = [a / c for a, c in zip(runs[k], runs["curl"])]
        out[k] = statistics.median(per_round)
        print(f"  {'ratio while ' + k + ' / while curl:':<50} median {out[k]:.2f} (rounds "
              f"{' '.join(f'{x:.2f}' for x in per_round)}), best {max(runs[k]) / max(runs['curl']):.2f}")
    print("  (target >= 0.95: the downloader fetches in the helper once it is up, ~0.5 s after start)")
    return out


def main_real(args, work):
    remote, out = work / "remote", work / "out"
    remote.mkdir()
    out.mkdir()
    t0 = time.perf_counter()
    big = list(range(len(REAL_SIZES_MB)))
    small = list(range(len(big), 2 * len(big)))
    for i, mb in zip(big, REAL_SIZES_MB):
        write_big_shard(remote / shard_name(i), int(mb * 1e6), seed=i)
    for i in small:
        write_big_shard(remote / shard_name(i), int(REAL_SMALL_MB * 1e6), seed=i)
    size = {i: (remote / shard_name(i)).stat().st_size for i in big + small}
    print(f"made {len(size)} shards ({sum(size.values()) / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s under "
          f"{work} (cpus: {os.cpu_count()}, load {os.getloadavg()[0]:.1f})")
    n = len(size) + 1
    split4 = FetchPolicy(max_connections=4)
    one = FetchPolicy(max_connections=1)

    def warm(srv, ids):
        for i in ids:                           # the server's sha256 cache and the page cache
            subprocess.run(["curl", "-s", "-I", f"{srv.hub_url}/{shard_name(i)}"], capture_output=True)

    results = []
    # 1. the one-connection-capped link: a CDN's per-connection cap below the link
    with ServerProcess(remote, rate=100, per_connection=PER_CONNECTION_MB) as srv:
        warm(srv, big)
        source, url = Source(srv.hub_url, n), f"{srv.hub_url}/{shard_name(big[-1])}"
        results.append(compare(
            f"one {size[big[-1]] / 1e6:.0f} MB shard, link 100 MB/s, "
            f"each connection capped at {PER_CONNECTION_MB} MB/s",
            srv, source, [big[-1]], size[big[-1]], out, 1, 1, clients={
                "curl": lambda: time_curl([url], out),
                "fetch_shard": lambda: time_fetch(source, [big[-1]], out, 1, policy=split4),
                "fetch_shard auto": lambda: time_fetch(source, [big[-1]], out, 1),
                "fetch_shard, 1 connection": lambda: time_fetch(source, [big[-1]], out, 1, policy=one)},
            ratios=[("fetch_shard", "curl", "ratio fetch/curl (target >= 0.9):"),
                    ("fetch_shard auto", "curl", "ratio fetch(auto)/curl:"),
                    ("fetch_shard, 1 connection", "curl", "ratio fetch(1 connection)/curl:")]))
        total = sum(size[i] for i in big)
        compare(f"8 shards of 20-100 MB, w=8, link 100 MB/s, each connection capped at {PER_CONNECTION_MB} MB/s",
                srv, source, big, total, out, 1, 8, clients={
                    "curl": lambda: time_curl([f"{srv.hub_url}/{shard_name(i)}" for i in big], out),
                    "fetch_shard": lambda: time_fetch(source, big, out, 8)},
                ratios=[("fetch_shard", "curl", "ratio fetch(auto)/curl:")])
    # 2. a link capped at W, 8 shards at once: durable commits against curl on the same disk
    for w, ids in ((100, big), (10, small)):
        with ServerProcess(remote, rate=w) as srv:
            warm(srv, ids)
            source = Source(srv.hub_url, n)
            total = sum(size[i] for i in ids)
            label = (f"8 shards of {min(size[i] for i in ids) / 1e6:.0f}-{max(size[i] for i in ids) / 1e6:.0f} MB, "
                     f"w=8 vs 8 curls, link capped at W={w} MB/s")
            if w == 100:
                urls = [f"{srv.hub_url}/{shard_name(i)}" for i in ids]
                results.append(compare(label, srv, source, ids, total, out, args.repeats, 8, clients={
                    "curl": lambda: time_curl(urls, out),
                    "fetch_shard": lambda: time_fetch(source, ids, out, 8),
                    "fetch_shard, helper": lambda: time_fetch(source, ids, out, 8, policy=FetchPolicy(process=True)),
                    "curl + fsync": lambda: time_curl(urls, out, fsync=True),
                    "fetch_shard, fsync=False": lambda: time_fetch(source, ids, out, 8, fsync=False)},
                    ratios=[("fetch_shard", "curl", "ratio fetch/curl (target >= 0.9):"),
                            ("fetch_shard, helper", "curl", "ratio fetch(helper process)/curl:"),
                            ("fetch_shard", "curl + fsync", "ratio fetch/(curl + fsync), same durability:"),
                            ("fetch_shard, fsync=False", "curl", "ratio fetch(fsync=False)/curl, transfer path:")]))
                trainer_side(srv, source, ids, out, 8)
            else:
                urls = [f"{srv.hub_url}/{shard_name(i)}" for i in ids]
                compare(label, srv, source, ids, total, out, 1, 8, clients={
                    "curl": lambda: time_curl(urls, out), "fetch_shard": lambda: time_fetch(source, ids, out, 8)},
                    ratios=[("fetch_shard", "curl", f"ratio fetch/curl at W={w}:")])
    best, med = results[0]
    print(f"\nRESULT fetch/curl ratio (one shard, per-connection cap): best {best:.2f}, median {med:.2f}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 MB instead of 200 MB (a smoke test)")
    p.add_argument("--size-mb", type=float, default=None, help="shard size in MB (default 200, --quick 20)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each client (default 3; --size real: 1)")
    p.add_argument("--parallel", type=int, default=8, help="shards in the parallel round (0 skips it)")
    p.add_argument("--dir", default=None, help="directory to work in (default a new temp dir; same disk for both)")
    p.add_argument("--size", choices=("quick", "real"), default="quick",
                   help="real: shards of 20-100 MB behind a link capped at 10 and 100 MB/s, a per-connection "
                        "cap, the trainer's Python throughput (~2 min); quick (default): the sizes above")
    args = p.parse_args(argv)
    if shutil.which("curl") is None:
        raise SystemExit("curl is not installed: the baseline needs it (apt-get install curl)")
    size = int((args.size_mb or (20 if args.quick else 200)) * 1e6)
    args.repeats = args.repeats or (1 if args.size == "real" else 3)

    work = Path(tempfile.mkdtemp(prefix="shardstream-bench-", dir=args.dir))
    if args.size == "real":
        try:
            return main_real(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    try:
        remote, out = work / "remote", work / "out"
        remote.mkdir()
        out.mkdir()
        t0 = time.perf_counter()
        write_big_shard(remote / shard_name(0), size, seed=0)
        n_par = args.parallel
        for i in range(1, n_par + 1):
            write_big_shard(remote / shard_name(i), size // max(n_par, 1), seed=i)
        nbytes = (remote / shard_name(0)).stat().st_size
        par_bytes = sum((remote / shard_name(i)).stat().st_size for i in range(1, n_par + 1))
        print(f"made {1 + n_par} shards in {time.perf_counter() - t0:.1f}s under {work} "
              f"(cpus: {os.cpu_count()}, curl: {subprocess.run(['curl', '--version'], capture_output=True, text=True).stdout.split()[1]})")
        with ServerProcess(remote) as srv:
            source = Source(srv.hub_url, n_par + 2)
            for i in range(n_par + 1):              # warm the server's sha256 cache and the page cache
                subprocess.run(["curl", "-s", "-I", f"{srv.hub_url}/{shard_name(i)}"], capture_output=True)
                subprocess.run(["curl", "-s", "-o", os.devnull, f"{srv.hub_url}/{shard_name(i)}"])
            best, med = compare(f"one shard, {nbytes / 1e6:.0f} MB, local ShardServer, uncapped",
                                srv, source, [0], nbytes, out, args.repeats, 1)
            if n_par:
                compare(f"{n_par} shards of {par_bytes / n_par / 1e6:.0f} MB: fetch w={n_par} vs {n_par} parallel curls",
                        srv, source, list(range(1, n_par + 1)), par_bytes, out, args.repeats, n_par)
        print(f"\nRESULT fetch/curl ratio (one shard): best {best:.2f}, median {med:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
