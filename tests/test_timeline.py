"""The PNG timeline, drawn from a synthetic events.jsonl (same fields the downloader writes)."""
import json
import subprocess
import sys

import pytest

from shardstream.errors import ConfigError
from shardstream.timeline import draw_timeline, load_events, plot_timeline, summarize, wait_spans

MB = 10**6


def synthetic_events(path):
    """Six shards of 1 MB streamed under a 3 MB budget, the reader waiting once for shard 3."""
    evs, t = [], 1000.0
    on_disk = 0
    for shard in range(6):
        evs.append({"t": t, "event": "download_start", "shard": shard, "bytes_on_disk": on_disk,
                    "budget": 3 * MB, "ahead": min(shard, 2), "reader_shard": max(shard - 2, 0)})
        t += 0.5
        on_disk += MB
        evs.append({"t": t, "event": "downloaded", "shard": shard, "bytes_on_disk": on_disk, "budget": 3 * MB,
                    "ahead": min(shard + 1, 2), "reader_shard": max(shard - 2, 0)})
        if on_disk >= 3 * MB:
            on_disk -= MB
            evs.append({"t": t + 0.1, "event": "evicted", "shard": shard - 2, "bytes_on_disk": on_disk,
                        "budget": 3 * MB, "ahead": 1, "reader_shard": shard - 1})
        t += 0.3
    evs.insert(9, {"t": evs[8]["t"] + 0.01, "event": "wait_start", "shard": 3, "reader_shard": 3, "ahead": 0,
                   "bytes_on_disk": 2 * MB, "budget": 3 * MB})
    evs.insert(10, {"t": evs[9]["t"] + 0.4, "event": "wait_end", "shard": 3, "reader_shard": 3, "ahead": 0,
                    "bytes_on_disk": 2 * MB, "budget": 3 * MB, "seconds": 0.4})
    with open(path, "w") as f:
        for ev in evs:
            f.write(json.dumps(ev) + "\n")
        f.write('{"t": 1010.0, "event": "downlo')      # a torn last line, as a killed writer leaves
    return evs


def test_plot_timeline_writes_png_and_summary(tmp_path):
    events_path = tmp_path / "events.jsonl"
    evs = synthetic_events(events_path)
    out = tmp_path / "plots" / "timeline.png"
    s = plot_timeline(events_path, out)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000          # a real drawing, not an empty canvas
    assert s.events == len(evs)
    assert s.peak_bytes_on_disk == 3 * MB and s.budget == 3 * MB
    assert s.downloads == 6 and s.deletions == 4
    assert s.waits == 1 and s.wait_seconds == pytest.approx(0.4, abs=1e-6)
    assert s.last_reader_shard == 4


def test_wait_spans_pairs_and_durations():
    evs = [{"t": 1.0, "event": "wait_start", "shard": 2}, {"t": 3.0, "event": "wait_end", "shard": 2},
           {"t": 5.0, "event": "reader_waited", "shard": 4, "seconds": 0.5},
           {"t": 7.0, "event": "wait_start", "shard": 5}, {"t": 8.0, "event": "downloaded", "shard": 5}]
    assert wait_spans(evs) == [(1.0, 3.0), (4.5, 5.0), (7.0, 8.0)]


def test_missing_or_empty_event_log_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no event log"):
        plot_timeline(tmp_path / "nope.jsonl", tmp_path / "x.png")
    (tmp_path / "events.jsonl").write_text("not json\n")
    assert load_events(tmp_path / "events.jsonl") == []
    with pytest.raises(ConfigError, match="no events"):
        plot_timeline(tmp_path / "events.jsonl", tmp_path / "x.png")


def test_timeline_command_line(tmp_path):
    synthetic_events(tmp_path / "events.jsonl")
    out = tmp_path / "t.png"
    r = subprocess.run([sys.executable, "-m", "shardstream.timeline", str(tmp_path / "events.jsonl"), str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "peak 3.0 MB" in r.stdout


def streaming_run(val=6, found=()):
    """The downloader's events for train shards 0-2 and the val shard, fetched one after the other
    (shard 0 first, as the initial buffer), or found on disk when it started; the reader waits for shard 1."""
    evs = [{"t": 50.0, "event": "start", "val_shard": val, "bytes_on_disk": 0, "budget": 3 * MB, "ahead": 0},
           {"t": 50.01, "event": "scan", "found": list(found), "bytes_on_disk": MB * len(found), "budget": 3 * MB,
            "ahead": 0}]
    t = 50.02
    for shard in [s for s in (0, val, 1, 2) if s not in found]:
        evs.append({"t": t, "event": "download_start", "shard": shard, "bytes_on_disk": 0, "budget": 3 * MB,
                    "ahead": 0, "reader_shard": None})
        t += 1.0
        evs.append({"t": t, "event": "downloaded", "shard": shard, "bytes_on_disk": MB, "budget": 3 * MB,
                    "ahead": 1, "reader_shard": 0, "seconds": 1.0})
    evs += [{"t": t + 0.1, "event": "wait_start", "shard": 1, "reader_shard": 1, "ahead": 0},
            {"t": t + 0.6, "event": "wait_end", "shard": 1, "reader_shard": 1, "ahead": 0, "seconds": 0.5},
            {"t": t + 0.7, "event": "evicted", "shard": 0, "reader_shard": 1, "ahead": 1}]
    return evs


def _axis(fig, ylabel):
    [ax] = [a for a in fig.axes if a.get_ylabel() == ylabel]
    return ax


def test_every_download_is_counted_and_marked_shard_0_and_val_included():
    import matplotlib.pyplot as plt
    evs = streaming_run()
    s = summarize(evs)
    assert s.downloads == 4 and s.downloaded_shards == (0, 6, 1, 2) and s.val_shard == 6
    fig = draw_timeline(evs, s)
    try:
        ax = _axis(fig, "shard")
        dots = [c for c in ax.collections if c.get_label() == "download (start to end)"][0].get_offsets()
        rows = sorted(int(y) for _, y in dots)
        assert rows == [0, 1, 2, 3]                   # the val shard's row sits just above train shard 2
        assert (1.02, 0.0) in [tuple(round(v, 2) for v in p) for p in dots]     # shard 0's, 1 s after the start
        [bars] = [c for c in ax.collections if c.get_gid() == "download spans"]
        assert len(bars.get_segments()) == 4
        assert [tuple(round(x, 2) for x, _ in seg) for seg in bars.get_segments()][0] == (0.02, 1.02)
        ticks = dict(zip(ax.get_yticks(), [t.get_text() for t in ax.get_yticklabels()]))
        assert ticks == {0: "0", 1: "1", 2: "2", 3: "val"}
    finally:
        plt.close(fig)


def test_the_val_shard_gets_its_own_row_whatever_its_id():
    import matplotlib.pyplot as plt
    evs = streaming_run(val=6542)
    s = summarize(evs)
    fig = draw_timeline(evs, s)
    try:
        ax = _axis(fig, "shard")
        ticks = dict(zip(ax.get_yticks(), [t.get_text() for t in ax.get_yticklabels()]))
        assert ticks[3] == "val" and "6542" not in ticks.values() and max(ticks) == 3
    finally:
        plt.close(fig)


def test_shards_found_on_disk_at_start_are_marked_not_counted():
    import matplotlib.pyplot as plt
    evs = streaming_run(found=(0,))           # e.g. the trainer fetched shard 0 for its tokenizer first
    s = summarize(evs)
    assert s.on_disk_at_start == (0,) and s.downloaded_shards == (6, 1, 2) and s.downloads == 3
    fig = draw_timeline(evs, s)
    try:
        ax = _axis(fig, "shard")
        [ring] = [c for c in ax.collections if c.get_label() == "on disk at start"]
        assert [tuple(round(v, 2) for v in p) for p in ring.get_offsets()] == [(0.01, 0.0)]
    finally:
        plt.close(fig)


def test_training_panel_shares_the_time_axis(tmp_path):
    import matplotlib.pyplot as plt
    evs = streaming_run()
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in evs))
    progress = [(53.5, 1, 6.9), (54.0, 10, 5.0), (55.0, 30, 4.1)]
    s = plot_timeline(path, tmp_path / "t.png", progress=progress)
    assert s.panels == ("disk", "ahead", "shards", "training") and s.steps == 30
    assert plot_timeline(path, tmp_path / "u.png").panels == ("disk", "ahead", "shards")
    fig = draw_timeline(evs, s, progress)
    try:
        steps, loss = _axis(fig, "steps done"), _axis(fig, "train loss")
        [line] = steps.get_lines()
        assert list(line.get_xdata()) == pytest.approx([3.5, 4.0, 5.0])     # seconds since the first event
        assert list(line.get_ydata()) == [1, 10, 30]
        assert list(loss.get_lines()[0].get_ydata()) == [6.9, 5.0, 4.1]
        assert steps.get_shared_x_axes().joined(steps, _axis(fig, "shard"))
        # the reader's wait is shaded on the training panel too
        assert any(p.get_facecolor()[:3] == pytest.approx((1.0, 0.647, 0.0), abs=0.01) for p in steps.patches)
    finally:
        plt.close(fig)
