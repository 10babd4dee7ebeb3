"""`shardstream demo` end to end, sized down: sample shards, the capped local server, a streaming run,
the summary and the PNG timeline."""
import json
import re

from shardstream import layout
from shardstream.demo import cli
from shardstream.status import describe

SMALL = ["--shards", "5", "--chars-per-shard", "300000", "--budget-shards", "3", "--rate", "5",
         "--buffer", "1", "--batch", "8", "--seq-len", "64", "--vocab", "512"]


def test_demo_streams_under_budget_and_draws_the_timeline(tmp_path, capsys, monkeypatch, caplog):
    import shardstream.timeline as timeline
    caplog.set_level("INFO", logger="shardstream.train")
    drawn = []
    plot = timeline.plot_timeline
    monkeypatch.setattr(timeline, "plot_timeline", lambda *a, **kw: drawn.append(plot(*a, **kw)) or drawn[-1])
    out = tmp_path / "demo_out"
    assert cli(["--out", str(out), "--steps", "30"] + SMALL) == 0
    text = capsys.readouterr().out
    assert "shardstream demo: summary" in text
    m = re.search(r"loss +([0-9.]+) -> ([0-9.]+) \(train\)", text)
    assert m and float(m.group(2)) < float(m.group(1))
    m = re.search(r"peak ([0-9.]+) MB on disk, budget ([0-9.]+) MB, dataset ([0-9.]+) MB", text)
    peak, budget, dataset = map(float, m.groups())
    assert 0 < peak <= budget < dataset
    assert re.search(r"first step +after [0-9.]+s; downloading everything first would take [0-9.]+s", text)
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert f"timeline     {out / 'timeline.png'}" in text
    events = [json.loads(line) for line in layout.events_path(out / "data").read_text().splitlines()]
    assert max(e["bytes_on_disk"] for e in events) <= int(budget * 1e6) + 10_000
    assert (out / "checkpoints" / "step_000030.pt").is_file()
    # every shard came through the downloader, shard 0 and the val shard included, and the summary counts
    # each fetch; the timeline labels the val shard and draws the trainer's steps on its time axis
    fetched = sorted(e["shard"] for e in events if e["event"] == "downloaded")
    assert fetched == [0, 1, 2, 3, 4]
    assert {e.get("checked") for e in events if e["event"] == "downloaded"} == {"sha256"}    # its SHA256SUMS
    assert re.search(r"streamed +all 4 train shards \+ the val shard: 5 downloads,", text)
    [tl] = drawn
    assert tl.downloaded_shards[0] == 0 and sorted(tl.downloaded_shards) == fetched and tl.val_shard == 4
    assert tl.panels[-1] == "training" and tl.steps == 30          # from TrainResult.step_times
    # one data wait: the summary, the trainer's Done line, its final [Streaming] line and `shardstream status`
    wait = re.search(r"^data wait +([0-9.]+s \(\d+ waits?\)): the loader blocked", text, re.M).group(1)
    logged = [r.getMessage() for r in caplog.records]
    assert f"data wait {wait}, " in next(m for m in logged if m.startswith("Done:"))
    assert next(m for m in logged if m.startswith("[Streaming] final:")).endswith(f"data wait {wait}")
    assert f"data wait    {wait}:" in describe(out / "data")[0]
    # a second run reuses the sample and starts its data dir afresh
    assert cli(["--out", str(out), "--steps", "10"] + SMALL) == 0
    assert "reusing the sample shards" in capsys.readouterr().out


def test_demo_refuses_a_budget_that_holds_everything(tmp_path, capsys):
    assert cli(["--out", str(tmp_path), "--shards", "3", "--chars-per-shard", "100000", "--budget-shards", "3"]) == 2
    assert "holds the whole dataset" in capsys.readouterr().out
