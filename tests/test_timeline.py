"""The PNG timeline, drawn from a synthetic events.jsonl (same fields the downloader writes)."""
import json
import subprocess
import sys

import pytest

from shardstream.errors import ConfigError
from shardstream.timeline import load_events, plot_timeline, wait_spans

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
