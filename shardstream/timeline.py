"""A PNG timeline of a streaming run, drawn with matplotlib from the downloader's events.jsonl.

    plot_timeline("data/.shardstream/events.jsonl", "timeline.png")          # -> Timeline summary
    plot_timeline(events, png, progress=[(t, step, loss), ...]) # + a training panel (the demo passes it)
    python -m shardstream.timeline data/.shardstream/events.jsonl timeline.png

Panels share the time axis (seconds since the first event):
1. bytes on disk (shard files + partial files) against the disk budget;
2. verified shards ready ahead of the reader;
3. shards: the reader's shard, each download as a bar from its start to its end (a dot), shards found on
   disk when the downloader started (rings), deletions (crosses); the val shard has its own row, "val";
4. with progress: training steps done and the train loss, so waits line up against steps.
Periods when the reader waited for data are shaded in every panel.

The event log is one JSON object per line with (at least) `t` and `event`, and where known `shard`,
`bytes_on_disk`, `budget`, `ahead`, `reader_shard` (the downloader's "start" event carries `val_shard`,
its "scan" event `found`). Event names are matched by what they say (a name containing "wait" is about
the reader waiting, "evict"/"delete" about deleting, ...), so a new event kind never breaks the plot.
A torn last line (a killed writer) is skipped.
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
    downloads: int              # shard downloads completed: every fetch in the log, the val shard's too
    deletions: int
    waits: int
    wait_seconds: float
    last_reader_shard: int | None
    downloaded_shards: tuple = ()   # the shard of each completed download, in order
    downloaded_bytes: int = 0       # their sizes added up (transfers cut short are not in it)
    on_disk_at_start: tuple = ()    # shards the downloader found on disk when it started (fetched earlier)
    val_shard: int | None = None
    steps: int | None = None        # the last training step drawn (None: no training panel)
    panels: tuple = ()              # the panels drawn, top to bottom


def load_events(path):
    """The events in an events.jsonl file, in order, as dicts; lines that are not JSON objects are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no event log at {path}: a StreamingDownloader writes <data_dir>/.shardstream/events.jsonl")
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
    if "scan" in name:
        return "scan"
    if ("download" in name or "fetch" in name) and ("start" in name or "begin" in name):
        return "download_start"
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


def download_spans(events):
    """[(shard, t_start, t_done)] of each completed download; t_start is the matching start event's time,
    else t_done minus the event's `seconds`, else t_done."""
    spans, started = [], {}
    for ev in events:
        kind, shard = _kind(ev["event"]), ev.get("shard")
        if not isinstance(shard, int):
            continue
        if kind == "download_start":
            started[shard] = ev["t"]
        elif kind == "download":
            t0 = started.pop(shard, None)
            if t0 is None:
                t0 = ev["t"] - float(_duration(ev) or 0.0)
            spans.append((shard, t0, ev["t"]))
    return spans


def val_shard(events):
    """The val shard's id, from the events that name it (the downloader's "start"), else None."""
    ids = [e["val_shard"] for e in events if isinstance(e.get("val_shard"), int)]
    return ids[-1] if ids else None


def found_at_start(events):
    """Shards the downloader found already on disk when it scanned its data dir (its "scan" event)."""
    for ev in events:
        if _kind(ev["event"]) == "scan" and isinstance(ev.get("found"), list):
            return tuple(s for s in ev["found"] if isinstance(s, int))
    return ()


def shard_rows(events):
    """{shard id: row} for the shards panel: train shards on their own id, the val shard one row above the
    highest train shard (its id can be thousands above them)."""
    val = val_shard(events)
    ids = {e[k] for e in events for k in ("shard", "reader_shard") if isinstance(e.get(k), int)}
    ids |= set(found_at_start(events))
    train = sorted(ids - {val})
    rows = {s: s for s in train}
    if val is not None:
        rows[val] = (train[-1] if train else -1) + 1
    return rows


def _duration(ev):
    for key in ("seconds", "wait_seconds", "waited", "duration"):
        if isinstance(ev.get(key), (int, float)):
            return ev[key]
    return None


def _series(events, key, t0):
    pts = [(e["t"] - t0, e[key]) for e in events if isinstance(e.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _progress(progress):
    """(t, step, loss) tuples with a numeric t and step, in time order; loss may be None."""
    out = []
    for p in progress or ():
        t, step, loss = (tuple(p) + (None,))[:3]
        if isinstance(t, (int, float)) and isinstance(step, (int, float)):
            out.append((float(t), step, loss if isinstance(loss, (int, float)) else None))
    return sorted(out)


def summarize(events, path=None, progress=None):
    budgets = [e["budget"] for e in events if isinstance(e.get("budget"), (int, float)) and e["budget"]]
    on_disk = [e["bytes_on_disk"] for e in events if isinstance(e.get("bytes_on_disk"), (int, float))]
    readers = [e["reader_shard"] for e in events if isinstance(e.get("reader_shard"), int)]
    spans = wait_spans(events)
    downloaded = tuple(e.get("shard") for e in events if _kind(e["event"]) == "download")
    progress = _progress(progress)
    panels = ("disk", "ahead", "shards") + (("training",) if progress else ())
    return Timeline(path=Path(path) if path else None, events=len(events),
                    seconds=(events[-1]["t"] - events[0]["t"]) if events else 0.0,
                    peak_bytes_on_disk=int(max(on_disk, default=0)), budget=int(max(budgets)) if budgets else None,
                    downloads=len(downloaded),
                    deletions=sum(_kind(e["event"]) == "delete" for e in events),
                    waits=len(spans), wait_seconds=sum(b - a for a, b in spans),
                    last_reader_shard=readers[-1] if readers else None,
                    downloaded_shards=downloaded, on_disk_at_start=found_at_start(events),
                    downloaded_bytes=int(sum(e["size"] for e in events if _kind(e["event"]) == "download"
                                             and isinstance(e.get("size"), (int, float)))),
                    val_shard=val_shard(events), steps=int(progress[-1][1]) if progress else None,
                    panels=panels)


def draw_timeline(events, summary, progress=None, title=None):
    """The matplotlib Figure of the timeline (plot_timeline saves and closes it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    progress = _progress(progress)
    t0 = min([events[0]["t"]] + [p[0] for p in progress])
    heights = [3, 2, 3] + ([3] if progress else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(13, 2.4 * len(heights) + 0.8), sharex=True,
                             gridspec_kw={"height_ratios": heights})
    outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1), "fontsize": 8}    # legends never hide data
    ax_disk, ax_ahead, ax_shards = axes[:3]
    # 1. bytes on disk vs budget
    ts, vs = _series(events, "bytes_on_disk", t0)
    ax_disk.step(ts, [v / 1e6 for v in vs], where="post", color="tab:blue", label="bytes on disk")
    if summary.budget:
        ax_disk.axhline(summary.budget / 1e6, color="tab:red", linestyle="--", label="budget")
    ax_disk.set_ylabel("MB on disk")
    ax_disk.set_ylim(bottom=0, top=max([summary.budget or 0, summary.peak_bytes_on_disk, 1]) / 1e6 * 1.15)
    # 2. shards ahead of the reader
    ts, vs = _series(events, "ahead", t0)
    ax_ahead.step(ts, vs, where="post", color="tab:green")
    ax_ahead.set_ylabel("shards ahead")
    ax_ahead.set_ylim(bottom=0)
    ax_ahead.yaxis.set_major_locator(MaxNLocator(integer=True))
    # 3. shards: the reader's position, downloads (start to end), found on disk at start, deletions
    rows = shard_rows(events)
    pts = [(e["t"] - t0, rows[e["reader_shard"]]) for e in events if e.get("reader_shard") in rows]
    if pts:
        ax_shards.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="black", linewidth=1,
                       label="reader's shard")
    spans = [(rows[s], a - t0, b - t0) for s, a, b in download_spans(events) if s in rows]
    if spans:
        ax_shards.hlines([r for r, _, _ in spans], [a for _, a, _ in spans], [b for _, _, b in spans],
                         color="tab:blue", alpha=0.45, linewidth=4, gid="download spans")
        ax_shards.scatter([b for _, _, b in spans], [r for r, _, _ in spans], marker="o", color="tab:blue",
                          s=22, zorder=3, label="download (start to end)")
    found = [rows[s] for s in summary.on_disk_at_start if s in rows]
    if found:
        scan_t = next(e["t"] for e in events if _kind(e["event"]) == "scan") - t0
        ax_shards.scatter([scan_t] * len(found), found, marker="o", facecolors="none", edgecolors="tab:blue",
                          s=40, zorder=3, label="on disk at start")
    dels = [(e["t"] - t0, rows[e["shard"]]) for e in events
            if _kind(e["event"]) == "delete" and e.get("shard") in rows]
    if dels:
        ax_shards.scatter([p[0] for p in dels], [p[1] for p in dels], marker="x", color="tab:red", s=22,
                          zorder=3, label="deleted")
    train_rows = sorted(r for s, r in rows.items() if s != summary.val_shard)
    ticks = train_rows if len(train_rows) <= 16 else train_rows[::-(-len(train_rows) // 12)]
    labels = [str(r) for r in ticks]
    if summary.val_shard is not None:
        ticks, labels = ticks + [rows[summary.val_shard]], labels + ["val"]
        ax_shards.axhline(rows[summary.val_shard] - 0.5, color="grey", linewidth=0.6, linestyle=":")
    ax_shards.set_yticks(ticks, labels)
    ax_shards.set_ylabel("shard")
    if ax_shards.get_legend_handles_labels()[0]:
        ax_shards.legend(**outside)
    # 4. training: steps done and train loss
    if progress:
        ax_train = axes[3]
        ts = [p[0] - t0 for p in progress]
        ax_train.plot(ts, [p[1] for p in progress], color="black", marker=".", markersize=4, label="steps done")
        ax_train.set_ylabel("steps done")
        ax_train.set_ylim(bottom=0)
        losses = [(t, p[2]) for t, p in zip(ts, progress) if p[2] is not None]
        if losses:
            ax_loss = ax_train.twinx()
            ax_loss.plot([x[0] for x in losses], [x[1] for x in losses], color="tab:purple", marker=".",
                         markersize=4, label="train loss")
            ax_loss.set_ylabel("train loss", color="tab:purple")
            ax_loss.tick_params(axis="y", colors="tab:purple")
            lines = ax_train.get_lines() + ax_loss.get_lines()
            # past the loss axis's labels on the right
            ax_train.legend(lines, [line.get_label() for line in lines], **dict(outside, bbox_to_anchor=(1.08, 1)))
        else:
            ax_train.legend(**outside)
    # waits, shaded everywhere
    for i, (a, b) in enumerate(wait_spans(events)):
        for ax in axes:
            ax.axvspan(a - t0, max(b - t0, a - t0 + 0.02), color="orange", alpha=0.3,
                       label="reader waiting for a shard" if (i == 0 and ax is ax_disk) else None)
    ax_disk.legend(**outside)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds")
    budget = f"budget {summary.budget / 1e6:.1f} MB" if summary.budget else "no budget"
    fig.suptitle(title or f"shardstream: peak {summary.peak_bytes_on_disk / 1e6:.1f} MB on disk ({budget}), "
                          f"{summary.downloads} downloads, reader waited {summary.waits}x "
                          f"({summary.wait_seconds:.1f}s)")
    fig.tight_layout()
    return fig


def plot_timeline(events_path, out_png, title=None, progress=None):
    """Draw the timeline of events_path into out_png (parent dirs made); returns a Timeline summary.

    progress: optional (time.time(), steps done, train loss) tuples on the event log's clock; given, a
    training panel is drawn under the others."""
    import matplotlib.pyplot as plt

    events = load_events(events_path)
    if not events:
        raise ConfigError(f"{events_path} holds no events: nothing to plot")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(events, out_png, progress)
    fig = draw_timeline(events, summary, progress, title)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return summary


def cli(argv=None):
    p = argparse.ArgumentParser(prog="python -m shardstream.timeline",
                                description="Draw a PNG timeline from a downloader's events.jsonl.")
    p.add_argument("events", help="path to events.jsonl (in the downloader's data dir, under .shardstream/)")
    p.add_argument("out", nargs="?", default="timeline.png", help="PNG to write (default timeline.png)")
    args = p.parse_args(argv)
    try:
        s = plot_timeline(args.events, args.out)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {s.path}: {s.events} events over {s.seconds:.1f}s, {s.downloads} downloads, "
          f"peak {s.peak_bytes_on_disk / 1e6:.1f} MB on disk")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
