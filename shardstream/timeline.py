"""A PNG timeline of a streaming run, drawn with matplotlib from the downloader's events.jsonl.

    plot_timeline("data/events.jsonl", "timeline.png")          # -> Timeline summary
    python -m shardstream.timeline data/events.jsonl timeline.png

Three panels share the time axis (seconds since the first event):
1. bytes on disk (shard files + partial files) against the disk budget;
2. verified shards ready ahead of the reader;
3. the reader's shard, with each shard's download completing (dots) and deletions (crosses).
Periods when the reader waited for data are shaded in every panel.

The event log is one JSON object per line with (at least) `t` and `event`, and where known `shard`,
`bytes_on_disk`, `budget`, `ahead`, `reader_shard`. Event names are matched by what they say (a name
containing "wait" is about the reader waiting, "evict"/"delete" about deleting, ...), so a new event kind
never breaks the plot. A torn last line (a killed writer) is skipped.
"""
import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeline:
    """What the plot shows, in numbers (the demo's summary uses them)."""
    path: Path                  # the PNG written
    events: int
    seconds: float              # first event to last
    peak_bytes_on_disk: int
    budget: int | None
    downloads: int              # shard downloads completed
    deletions: int
    waits: int
    wait_seconds: float
    last_reader_shard: int | None


def load_events(path):
    """The events in an events.jsonl file, in order, as dicts; lines that are not JSON objects are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no event log at {path}: a StreamingDownloader writes <data_dir>/events.jsonl")
    events = []
    with open(path) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(ev, dict) and isinstance(ev.get("t"), (int, float)) and "event" in ev:
                events.append(ev)
    events.sort(key=lambda e: e["t"])
    return events


def _kind(name):
    name = str(name).lower()
    if "wait" in name:
        if any(w in name for w in ("start", "begin", "block")):
            return "wait_start"
        if any(w in name for w in ("end", "done", "over", "ready", "stop")):
            return "wait_end"
        return "wait"
    if "evict" in name or "delet" in name or "remov" in name:
        return "delete"
    if "start" in name or "begin" in name or "retry" in name or "fail" in name or "error" in name:
        return "other"
    if any(w in name for w in ("download", "fetched", "verified", "ready", "complete", "done")):
        return "download"
    return "other"


def wait_spans(events):
    """[(t0, t1)] of the reader's waits: paired start/end events, or single events carrying a duration."""
    spans, open_at = [], {}
    for ev in events:
        kind = _kind(ev["event"])
        if kind == "wait_start":
            open_at.setdefault(ev.get("shard"), ev["t"])
        elif kind == "wait_end":
            t0 = open_at.pop(ev.get("shard"), None)
            if t0 is None and open_at:
                t0 = open_at.pop(next(iter(open_at)))
            if t0 is None:
                t0 = ev["t"] - float(_duration(ev) or 0.0)
            spans.append((t0, ev["t"]))
        elif kind == "wait":
            d = _duration(ev)
            if d:
                spans.append((ev["t"] - float(d), ev["t"]))
    last = events[-1]["t"] if events else 0.0
    spans += [(t0, last) for t0 in open_at.values()]
    return sorted(spans)


def _duration(ev):
    for key in ("seconds", "wait_seconds", "waited", "duration"):
        if isinstance(ev.get(key), (int, float)):
            return ev[key]
    return None


def _series(events, key, t0):
    pts = [(e["t"] - t0, e[key]) for e in events if isinstance(e.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def summarize(events, path=None):
    budgets = [e["budget"] for e in events if isinstance(e.get("budget"), (int, float)) and e["budget"]]
    on_disk = [e["bytes_on_disk"] for e in events if isinstance(e.get("bytes_on_disk"), (int, float))]
    readers = [e["reader_shard"] for e in events if isinstance(e.get("reader_shard"), int)]
    spans = wait_spans(events)
    return Timeline(path=Path(path) if path else None, events=len(events),
                    seconds=(events[-1]["t"] - events[0]["t"]) if events else 0.0,
                    peak_bytes_on_disk=int(max(on_disk, default=0)), budget=int(max(budgets)) if budgets else None,
                    downloads=sum(_kind(e["event"]) == "download" for e in events),
                    deletions=sum(_kind(e["event"]) == "delete" for e in events),
                    waits=len(spans), wait_seconds=sum(b - a for a, b in spans),
                    last_reader_shard=readers[-1] if readers else None)


def plot_timeline(events_path, out_png, title=None):
    """Draw the timeline of events_path into out_png (parent dirs made); returns a Timeline summary."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    events = load_events(events_path)
    if not events:
        raise ConfigError(f"{events_path} holds no events: nothing to plot")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    t0 = events[0]["t"]
    summary = summarize(events, out_png)

    fig, (ax_disk, ax_ahead, ax_reader) = plt.subplots(3, 1, figsize=(11, 8), sharex=True,
                                                        gridspec_kw={"height_ratios": [3, 2, 3]})
    # 1. bytes on disk vs budget
    ts, vs = _series(events, "bytes_on_disk", t0)
    ax_disk.step(ts, [v / 1e6 for v in vs], where="post", color="tab:blue", label="bytes on disk")
    if summary.budget:
        ax_disk.axhline(summary.budget / 1e6, color="tab:red", linestyle="--", label="budget")
    ax_disk.set_ylabel("MB on disk")
    ax_disk.set_ylim(bottom=0)
    ax_disk.legend(loc="best", fontsize=8)
    # 2. shards ahead of the reader
    ts, vs = _series(events, "ahead", t0)
    ax_ahead.step(ts, vs, where="post", color="tab:green")
    ax_ahead.set_ylabel("shards ahead")
    ax_ahead.set_ylim(bottom=0)
    # 3. the reader's position, downloads and deletions
    ts, vs = _series(events, "reader_shard", t0)
    ax_reader.step(ts, vs, where="post", color="black", label="reader's shard")
    for kind, marker, color, label in (("download", "o", "tab:blue", "download done"),
                                       ("delete", "x", "tab:red", "deleted")):
        pts = [(e["t"] - t0, e["shard"]) for e in events
               if _kind(e["event"]) == kind and isinstance(e.get("shard"), int)]
        if pts:
            ax_reader.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, s=18,
                              label=label, zorder=3)
    ax_reader.set_ylabel("shard id")
    ax_reader.set_xlabel("seconds")
    ax_reader.legend(loc="lower right", fontsize=8)
    # waits, shaded everywhere
    for i, (a, b) in enumerate(wait_spans(events)):
        for ax in (ax_disk, ax_ahead, ax_reader):
            ax.axvspan(a - t0, max(b - t0, a - t0 + 0.02), color="orange", alpha=0.3,
                       label="reader waiting for a shard" if (i == 0 and ax is ax_ahead) else None)
    if summary.waits:
        ax_ahead.legend(loc="best", fontsize=8)
    for ax in (ax_disk, ax_ahead, ax_reader):
        ax.grid(alpha=0.3)
    ax_ahead.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_reader.yaxis.set_major_locator(MaxNLocator(integer=True))
    budget = f"budget {summary.budget / 1e6:.1f} MB" if summary.budget else "no budget"
    fig.suptitle(title or f"shardstream: peak {summary.peak_bytes_on_disk / 1e6:.1f} MB on disk ({budget}), "
                          f"{summary.downloads} downloads, reader waited {summary.waits}x "
                          f"({summary.wait_seconds:.1f}s)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return summary


def cli(argv=None):
    p = argparse.ArgumentParser(prog="python -m shardstream.timeline",
                                description="Draw a PNG timeline from a downloader's events.jsonl.")
    p.add_argument("events", help="path to events.jsonl (in the downloader's data dir)")
    p.add_argument("out", nargs="?", default="timeline.png", help="PNG to write (default timeline.png)")
    args = p.parse_args(argv)
    try:
        s = plot_timeline(args.events, args.out)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {s.path}: {s.events} events over {s.seconds:.1f}s, peak {s.peak_bytes_on_disk / 1e6:.1f} MB on disk")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
