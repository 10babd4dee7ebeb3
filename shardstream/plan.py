"""`shardstream plan`: what a streaming run will do, before running it, from the downloader's own scheduler.

    shardstream plan --shards 6543 --shard-mb 100 --link-mb-per-s 100 --consume-mb-per-s 1.72 --budget-mb 2000
    shardstream plan ... --nodes 64 --ranks-per-node 8 --partition node --outage 3600:3600 --json
    shardstream plan ... --solve link          # the smallest link (MB/s) with no data-wait
    shardstream plan --source /data/shards ... # shard sizes from a listing (hf://, s3://, gs://, a local dir)

It runs simulate.py (a discrete-event simulation driving schedule.py and prefetch.py, no I/O) and prints,
per node: time to first step, data-wait % of the wall time after it, peak disk, bytes over the wire and
the window's sizes; `--json` prints one object (the worst node's figures at top level, every node's under
`nodes`), `--png` draws the worst node's timeline like shardstream.timeline draws a real one.

Units: every rate in MB/s, 1 MB = 10**6 bytes. The link W is per node. The consumption R is the shard
bytes one node trains on per second, all its ranks together (or --tokens-per-s T / --tokens-per-mb M);
under --partition global each node reads every shard but trains on 1/K of it, so its link must carry K*R.
"""
import argparse
import json
import math
import sys

from .errors import ConfigError, ShardStreamError
from .simulate import MB, Link, Scenario, simulate

SOLVE_PRECISION = 0.01          # --solve stops within 1 % of the answer
SOLVE_STEPS = 40
MAX_ROWS = 12                   # node rows printed before the rest is summed up


def cli(argv=None):
    p = argparse.ArgumentParser(
        prog="shardstream plan",
        description="Simulate a streaming run (the downloader's own scheduler on a simulated clock) and print "
                    "time to first step, data-wait, peak disk, wire bytes and window sizes per node.",
        epilog="Rates in MB/s (1 MB = 10^6 bytes). R = shard bytes one node trains on per second, all its ranks "
               "together; under --partition global a node trains on 1/K of every shard, so it reads shards at K*R.")
    data = p.add_argument_group("the data")
    data.add_argument("--shards", type=int, default=None, metavar="N",
                      help="train shards (plus one val shard); with --source: the first N (default all)")
    data.add_argument("--shard-mb", type=float, default=None, metavar="S", help="size of every shard, MB")
    data.add_argument("--source", default=None, metavar="URL",
                      help="take the shard sizes from this listing (hf://, s3://, gs://, a local dir)")
    data.add_argument("--epochs", type=int, default=1, metavar="E", help="epochs over the train shards (default 1)")
    run = p.add_argument_group("the run")
    run.add_argument("--link-mb-per-s", type=float, default=None, metavar="W", help="each node's link, MB/s")
    run.add_argument("--consume-mb-per-s", type=float, default=None, metavar="R",
                     help="shard bytes one node trains on per second, MB/s")
    run.add_argument("--tokens-per-s", type=float, default=None, metavar="T",
                     help="tokens one node trains on per second (with --tokens-per-mb: R = T / M)")
    run.add_argument("--tokens-per-mb", type=float, default=None, metavar="M", help="tokens per MB of shard bytes")
    run.add_argument("--budget-mb", type=float, default=None, metavar="B", help="disk budget per node, MB")
    run.add_argument("--nodes", type=int, default=1, metavar="K")
    run.add_argument("--ranks-per-node", type=int, default=1, metavar="G", help="readers per node, in lockstep")
    run.add_argument("--partition", choices=("global", "node"), default="global",
                     help="global: every node reads every shard (nanochat's); node: node n reads n, n+K, ...")
    link = p.add_argument_group("the link")
    link.add_argument("--outage", action="append", default=[], metavar="START:SECONDS",
                      help="no byte moves from START for SECONDS (repeatable)")
    link.add_argument("--jitter", type=float, default=0.0, metavar="F",
                      help="each transfer runs at its share of the link times U[1-F, 1+F] (default 0)")
    link.add_argument("--probe-latency", type=float, default=0.05, metavar="SECONDS",
                      help="a HEAD's round trip; a GET waits as long for its first byte (default 0.05)")
    link.add_argument("--verify-s", type=float, default=0.0, metavar="SECONDS",
                      help="per shard after its last byte: footer check, fsync, rename (default 0)")
    link.add_argument("--retry-gap", type=float, default=30.0, metavar="SECONDS",
                      help="after an outage, a transfer's next try comes up to this late (default 30)")
    pol = p.add_argument_group("the downloader (its defaults)")
    pol.add_argument("--window", default="auto", metavar="auto|N", help="adaptive window, or a fixed N shards")
    pol.add_argument("--workers", type=int, default=2)
    pol.add_argument("--initial-buffer", type=int, default=1)
    pol.add_argument("--retain", type=int, default=0)
    pol.add_argument("--failure-policy", choices=("fail", "wait"), default="fail",
                     help="what a reader gets after --deadline s of failed tries (an outage): the error, or more wait")
    pol.add_argument("--deadline", type=float, default=300.0, metavar="SECONDS")
    out = p.add_argument_group("output")
    out.add_argument("--solve", choices=("budget", "link"), default=None,
                     help="find the smallest budget (MB) or link (MB/s) with no data-wait after the first step "
                          "(exit 1: none does)")
    out.add_argument("--max-wait", type=float, default=0.0, metavar="PCT",
                     help="with --solve: the data-wait %% allowed (default 0: none at all; start-up waits count)")
    out.add_argument("--seed", type=int, default=0, help="for jitter and retry gaps (default 0)")
    out.add_argument("--sample-nodes", type=int, default=8, metavar="N",
                     help="under --partition global with jitter or outages: simulate this many nodes (default 8)")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--png", default=None, metavar="FILE", help="draw the worst node's timeline")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code
    try:
        return _run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ShardStreamError as e:           # --source could not be listed (unreachable, refused)
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args):
    sc = scenario_from_args(args)
    solved = None
    if args.solve:
        solved = solve(sc, args.solve, args.sample_nodes, args.max_wait / 100)
        if solved is None:
            what = "budget" if args.solve == "budget" else "link"
            msg = (f"no {what} gives {_target(args.max_wait)} here" +
                   (" (an outage longer than the window's buffer: see --window and --failure-policy)"
                    if sc.link.outages else ""))
            if args.json:
                print(json.dumps({"solve": args.solve, "value": None, "note": msg}))
            else:
                print(msg)
            return 1
        sc = solved[1]
        worse = above(sc, args.solve, solved[0], args.sample_nodes, args.max_wait / 100)
    res = simulate(sc, record_events=bool(args.png), sample_nodes=args.sample_nodes)
    if args.json:
        obj = res.to_json()
        obj["pass_mb_per_s"] = sc.pass_mb_per_s
        obj["scenario"] = describe_json(sc)
        if solved:
            obj["solve"] = args.solve
            obj["value"] = solved[0]
            obj["not_monotone"] = [{"value": v, "wait_fraction": w} for v, w in worse]
        print(json.dumps(obj, indent=1))
    else:
        print(report(res, solve_what=args.solve, value=solved[0] if solved else None, max_wait=args.max_wait))
        if solved and worse:
            unit = "MB" if args.solve == "budget" else "MB/s"
            print("  but more is not always better here: " + ", ".join(
                f"{v:.4g} {unit} waits {100 * w:.2f} %" for v, w in worse)
                  + " (the start-up or the parallel-transfer rule near its thresholds)")
    if args.png:
        path = plot(res, args.png)
        if not args.json:
            print(f"wrote {path}")
    return 0


def scenario_from_args(args):
    """A Scenario from parsed flags; ConfigError naming the flag for anything wrong."""
    _at_least("--epochs", args.epochs, 1)
    _at_least("--nodes", args.nodes, 1)
    _at_least("--ranks-per-node", args.ranks_per_node, 1)
    _at_least("--workers", args.workers, 1)
    _at_least("--initial-buffer", args.initial_buffer, 0)
    _at_least("--retain", args.retain, 0)
    _at_least("--sample-nodes", args.sample_nodes, 1)
    if not (math.isfinite(args.max_wait) and 0 <= args.max_wait < 100):
        raise ConfigError(f"--max-wait must be a percentage in [0, 100), got {args.max_wait!r}")
    sizes = _sizes(args)
    if args.consume_mb_per_s is not None:
        if args.tokens_per_s is not None or args.tokens_per_mb is not None:
            raise ConfigError("give --consume-mb-per-s or --tokens-per-s with --tokens-per-mb, not both")
        rate = _positive("--consume-mb-per-s", args.consume_mb_per_s)
    elif args.tokens_per_s is not None or args.tokens_per_mb is not None:
        if args.tokens_per_s is None or args.tokens_per_mb is None:
            raise ConfigError("--tokens-per-s and --tokens-per-mb go together (R = T / M MB/s)")
        rate = _positive("--tokens-per-s", args.tokens_per_s) / _positive("--tokens-per-mb", args.tokens_per_mb)
    else:
        raise ConfigError("--consume-mb-per-s (or --tokens-per-s with --tokens-per-mb) is required: how fast one "
                          "node trains on shard bytes")
    if args.link_mb_per_s is None:
        if args.solve != "link":
            raise ConfigError("--link-mb-per-s is required (each node's link in MB/s), unless --solve link")
        link_rate = rate * args.nodes if args.partition == "global" else rate     # a start for the search
    else:
        link_rate = _positive("--link-mb-per-s", args.link_mb_per_s)
    if not (isinstance(args.jitter, float) and 0 <= args.jitter < 1):
        raise ConfigError(f"--jitter must be a fraction in [0, 1), got {args.jitter!r}")
    for flag, v in (("--probe-latency", args.probe_latency), ("--verify-s", args.verify_s),
                    ("--retry-gap", args.retry_gap), ("--deadline", args.deadline)):
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"{flag} must be a number of seconds >= 0, got {v!r}")
    outages = tuple(_outage(o) for o in args.outage)
    window = None
    if str(args.window).lower() != "auto":
        try:
            window = int(args.window)
        except ValueError:
            raise ConfigError(f"--window must be 'auto' or a number of shards >= 1, got {args.window!r}") from None
        _at_least("--window", window, 1)
    if args.initial_buffer > (window or 5):
        raise ConfigError(f"--initial-buffer {args.initial_buffer} is more than the window ({window or 5} shards)")
    budget = None
    if args.budget_mb is None:
        if args.solve != "budget":
            raise ConfigError("--budget-mb is required (each node's disk budget in MB), unless --solve budget")
    else:
        budget = round(_positive("--budget-mb", args.budget_mb) * MB)
    firsts = range(min(args.nodes, len(sizes) - 1)) if args.partition == "node" else (0,)
    need = sizes[-1] + 2 * max(sizes[n] for n in firsts)
    if budget is not None and budget < need:
        raise ConfigError(f"--budget-mb {args.budget_mb:g} cannot hold the val shard ({sizes[-1] / MB:g} MB) plus two "
                          f"train shards ({max(sizes[n] for n in firsts) / MB:g} MB each): give at least "
                          f"{math.ceil(need / MB * 1000) / 1000:g}")
    if budget is None:
        budget = need                   # --solve budget starts from the least the downloader accepts
    if args.partition == "node" and args.nodes > len(sizes) - 1:
        raise ConfigError(f"--partition node with --nodes {args.nodes} needs at least {args.nodes} train shards, "
                          f"got {len(sizes) - 1} (--shards)")
    link = Link(link_rate, jitter=args.jitter, outages=outages, probe_latency_s=args.probe_latency,
                verify_s=args.verify_s, retry_gap_s=args.retry_gap)
    return Scenario(sizes, rate, link, budget, nodes=args.nodes, ranks_per_node=args.ranks_per_node,
                    partition=args.partition, epochs=args.epochs, window=window, workers=args.workers,
                    initial_buffer=args.initial_buffer, retain=args.retain, failure_mode=args.failure_policy,
                    deadline_s=args.deadline, seed=args.seed)


def _sizes(args):
    """Bytes of every shard, the val shard last: N of S MB, or from --source's listing."""
    if args.source is None:
        if args.shards is None or args.shard_mb is None:
            raise ConfigError("--shards and --shard-mb are required (or --source URL to read sizes from a listing)")
        _at_least("--shards", args.shards, 1, "train shard")
        s = round(_positive("--shard-mb", args.shard_mb) * MB)
        return (s,) * (args.shards + 1)
    if args.shard_mb is not None:
        raise ConfigError("--shard-mb and --source both give shard sizes: give one")
    from .listing import make_source
    source = make_source(args.source)
    listing = tuple(source.listing)
    if not listing:
        raise ConfigError(f"--source {args.source}: no listing (a plain http(s) URL cannot be listed): give an "
                          f"hf://, s3://, gs:// URL or a local dir, or --shards with --shard-mb")
    if len(listing) < 2:
        raise ConfigError(f"--source {args.source}: {len(listing)} shard listed; a run needs train shards and a val "
                          f"shard (the last)")
    train = len(listing) - 1
    n = train if args.shards is None else args.shards
    _at_least("--shards", n, 1, "train shard")
    if n > train:
        raise ConfigError(f"--shards {n}: --source {args.source} lists only {train} train shards (and the val shard)")
    sizes = [info.size for info in listing[:n]] + [listing[-1].size]
    bad = [i for i, v in enumerate(sizes) if not v]
    if bad:
        raise ConfigError(f"--source {args.source}: the listing gives no size for shard {bad[0]}")
    return tuple(sizes)


def _outage(text):
    try:
        a, b = str(text).split(":")
        start, seconds = float(a), float(b)
    except ValueError:
        raise ConfigError(f"--outage wants START:SECONDS (when it begins, seconds after the start, and how long it "
                          f"lasts), got {text!r}") from None
    if not (math.isfinite(start) and start >= 0 and math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"--outage {text}: START must be >= 0 and SECONDS > 0")
    return start, seconds


def _positive(flag, v):
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ConfigError(f"{flag} must be a number > 0, got {v!r}")
    return v


def _at_least(flag, v, lo, what=None):
    if v < lo:
        raise ConfigError(f"{flag} must be >= {lo}{f' {what}' if what else ''}, got {v}")


# -----------------------------------------------------------------------------
# searching

def good_enough(res, max_wait=0.0):
    """No node failed and the worst one's data-wait is at most max_wait (a fraction; 0: none at all)."""
    return res.worst.failed_at_s is None and res.worst.wait_fraction <= max_wait


def solve(sc, what, sample_nodes=8, max_wait=0.0):
    """The smallest budget (what="budget", MB) or link (what="link", MB/s) whose data-wait after the first
    step is at most max_wait (a fraction; 0: none at all), within SOLVE_PRECISION, as (value, Scenario);
    None when none does. Bisection: it assumes more never hurts, which holds for the steady state but not
    always for the few waits of the first shards (the window is still learning the rates), so with
    max_wait=0 the answer may sit among values that alternate between a handful of start-up waits and none."""
    from dataclasses import replace

    def make(v):
        if what == "budget":
            return replace(sc, budget_bytes=round(v * MB))
        return replace(sc, link=replace(sc.link, mb_per_s=v))

    def ok(v):
        return good_enough(simulate(make(v), sample_nodes=sample_nodes), max_wait)

    if what == "budget":
        lo = sc.budget_bytes / MB       # the least the downloader accepts
        if ok(lo):
            return lo, make(lo)
        per_node = sc.train_shards if sc.partition == "global" else -(-sc.train_shards // sc.nodes)
        hi = (sum(sorted(sc.sizes[:-1])[-per_node:]) + sc.sizes[-1]) / MB + 1      # everything a node reads, at once
        hi = max(hi, lo * 2)
        if not ok(hi):
            return None
    else:
        lo, hi = 0.0, max(sc.pass_mb_per_s, 1e-3)
        for _ in range(SOLVE_STEPS):
            if ok(hi):
                break
            lo, hi = hi, hi * 2
        else:
            return None
    for _ in range(SOLVE_STEPS):
        if hi - lo <= SOLVE_PRECISION * hi:
            break
        mid = (lo + hi) / 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    for digits in (3, 4, 6):                # a round answer to type back in, if it holds too
        v = _round_up(hi, digits)
        if ok(v):
            return v, make(v)
    return hi, make(hi)


def above(sc, what, value, sample_nodes=8, max_wait=0.0, factors=(1.01, 1.02, 1.05, 1.1, 1.25, 1.5, 2.0)):
    """[(value * f, wait fraction)] of the values above the answer that do not meet the target: bisection
    assumed more never hurts; these say where it does not (empty: it held at every factor tried)."""
    from dataclasses import replace
    out = []
    for f in factors:
        v = value * f
        s = replace(sc, budget_bytes=round(v * MB)) if what == "budget" else replace(sc, link=replace(sc.link, mb_per_s=v))
        res = simulate(s, sample_nodes=sample_nodes)
        if not good_enough(res, max_wait):
            out.append((v, res.worst.wait_fraction))
    return out


def _round_up(v, digits=3):
    """v rounded up to `digits` significant digits."""
    if v <= 0:
        return v
    k = 10 ** (math.floor(math.log10(v)) - digits + 1)
    return math.ceil(v / k - 1e-9) * k


# -----------------------------------------------------------------------------
# printing

def describe(sc):
    n, total = sc.train_shards, sum(sc.sizes)
    uniform = len(set(sc.sizes)) == 1
    size = f"{sc.sizes[0] / MB:g} MB" if uniform else f"{min(sc.sizes) / MB:.3g}-{max(sc.sizes) / MB:.3g} MB"
    ln = sc.link
    extra = [f"jitter {ln.jitter:g}"] if ln.jitter else []
    extra += [f"outage {a:g}s+{b:g}s" for a, b in ln.outages]
    per = (f"{sc.pass_mb_per_s:.3g} MB/s through the link ({sc.nodes} x {sc.consume_mb_per_s:.3g}: each node trains "
           f"on 1/{sc.nodes} of every shard)" if sc.partition == "global" and sc.nodes > 1 else "")
    mean = total / len(sc.sizes)
    return "\n".join([
        f"{n} train shards + val of {size} ({total / 1e9:.4g} GB), {sc.epochs} epoch{'s' * (sc.epochs > 1)}, "
        f"{sc.nodes} node{'s' * (sc.nodes > 1)} x {sc.ranks_per_node} rank{'s' * (sc.ranks_per_node > 1)}, "
        f"partition {sc.partition}",
        f"link {ln.mb_per_s:.4g} MB/s per node (probe {ln.probe_latency_s:g} s{', ' if extra else ''}"
        f"{', '.join(extra)}); readers {sc.consume_mb_per_s:.4g} MB/s per node"
        + (f", {per}" if per else "") + f" (a shard every {mean / (sc.pass_mb_per_s * MB):.3g} s)",
        f"budget {sc.budget_bytes / MB:.6g} MB per node; window "
        + ("auto" if sc.window is None else f"fixed {sc.window}")
        + f", workers {sc.workers}, initial buffer {sc.initial_buffer}, failure policy {sc.failure_mode}"
        + (f" ({sc.deadline_s:g} s)" if sc.failure_mode == "fail" else "")])


def describe_json(sc):
    return {"train_shards": sc.train_shards, "shard_bytes_total": sum(sc.sizes), "epochs": sc.epochs,
            "nodes": sc.nodes, "ranks_per_node": sc.ranks_per_node, "partition": sc.partition,
            "link_mb_per_s": sc.link.mb_per_s, "consume_mb_per_s": sc.consume_mb_per_s,
            "budget_bytes": sc.budget_bytes, "window": "auto" if sc.window is None else sc.window,
            "jitter": sc.link.jitter, "outages": [list(o) for o in sc.link.outages],
            "probe_latency_s": sc.link.probe_latency_s, "verify_s": sc.link.verify_s,
            "retry_gap_s": sc.link.retry_gap_s, "failure_policy": sc.failure_mode, "deadline_s": sc.deadline_s,
            "seed": sc.seed}


HEADER = (f"{'node':>7} {'first step':>10} {'wait %':>7} {'waits':>6} {'peak disk':>10} {'wire':>10} "
          f"{'window min/max/last':>19} {'wall':>9}")


def _row(label, r):
    win = f"{r.window_min}/{r.window_max}/{r.window_last}"
    line = (f"{label:>7} {_secs(r.first_step_s):>10} {100 * r.wait_fraction:>7.2f} {r.waits:>6} "
            f"{_bytes(r.peak_disk_bytes):>10} {_bytes(r.wire_bytes):>10} {win:>19} {_secs(r.wall_s):>9}")
    if r.failed_at_s is not None:
        line += f"\n{'':>7} FAILED at {_secs(r.failed_at_s)}: {r.failure}"
    return line


def _target(max_wait):
    return "no data-wait" if not max_wait else f"data-wait <= {max_wait:g} %"


def report(res, solve_what=None, value=None, max_wait=0.0):
    sc = res.scenario
    lines = ["shardstream plan: " + describe(sc).replace("\n", "\n  ")]
    if solve_what:
        unit = "MB budget per node" if solve_what == "budget" else "MB/s link per node"
        lines.append(f"smallest {solve_what} with {_target(max_wait)} after the first step: {value:g} {unit} "
                     f"(within {SOLVE_PRECISION:.0%})")
    lines += ["", HEADER]
    groups = []                     # consecutive nodes with the same figures share a row
    for r in res.nodes:
        key = r.to_json()
        key.pop("node")
        if groups and groups[-1][2] == key:
            groups[-1][1] = r.node
        else:
            groups.append([r.node, r.node, key, r])
    shown = groups if len(groups) <= MAX_ROWS else groups[:MAX_ROWS - 2]
    for a, b, _, r in shown:
        lines.append(_row(str(a) if a == b else f"{a}-{b}", r))
    if len(shown) < len(groups):                # many nodes that differ a little: the range, then the worst
        rest = [r for g in groups[len(shown):] for r in res.nodes if g[0] <= r.node <= g[1]]
        waits = [100 * r.wait_fraction for r in rest]
        lines.append(f"{'...':>7} {len(rest)} more nodes: wait {min(waits):.2f}-{max(waits):.2f} %, peak disk "
                     f"{_bytes(min(r.peak_disk_bytes for r in rest))}-{_bytes(max(r.peak_disk_bytes for r in rest))}")
        if res.worst not in [g[3] for g in shown]:
            lines.append(_row(str(res.worst.node), res.worst))
    if res.sampled:
        lines.append(f"  ({len(res.nodes)} of {sc.nodes} nodes simulated: the others run the same plan on a link "
                     f"like theirs; --sample-nodes to change)")
    w = res.worst
    lines += ["", f"worst node {w.node}: first step {_secs(w.first_step_s)}, data-wait {100 * w.wait_fraction:.2f} % "
                  f"after it ({_secs(w.wait_s)} in {w.waits} waits), peak disk {_bytes(w.peak_disk_bytes)} of "
                  f"{_bytes(sc.budget_bytes)}, {_bytes(w.wire_bytes)} over its link; all nodes "
                  f"{_bytes(res.total_wire_bytes)} over the wire"]
    return "\n".join(lines)


def _secs(s):
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _bytes(n):
    if n is None:
        return "none"
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= k:
            return f"{n / k:.4g} {unit}"
    return f"{n / 1e3:.4g} KB"


def plot(res, png):
    """The worst node's timeline (shardstream.timeline's panels), from the simulated event dicts."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from .timeline import draw_timeline, summarize
    events = list(res.worst.events)
    if not events:
        raise ConfigError("nothing to plot: the simulation recorded no events")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(events, png)
    sc, w = res.scenario, res.worst
    title = (f"simulated: node {w.node}, W {sc.link.mb_per_s:.3g} MB/s, R {sc.consume_mb_per_s:.3g} MB/s"
             + (f" (x{sc.nodes} through the link)" if sc.partition == "global" and sc.nodes > 1 else "")
             + f", budget {sc.budget_bytes / MB:.4g} MB: first step {_secs(w.first_step_s)}, "
             f"wait {100 * w.wait_fraction:.2f} %, peak {_bytes(w.peak_disk_bytes)}")
    fig = draw_timeline(events, summary, title=title)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


if __name__ == "__main__":
    sys.exit(cli())
