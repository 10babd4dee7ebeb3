"""status.py: the snapshot dataclass, atomic status.json, the event log, and `shardstream status`."""
import json
import os
import socket
import subprocess
import sys
import time

from shardstream import layout
from shardstream.status import (DownloaderStatus, EventLog, cli, describe, human_bytes, read_events, read_status,
                                write_status)


def _status(**kw):
    base = dict(state="running", shards_verified=7, total_shards=10, ahead=5, buffer_size=5, current_shard=1,
                bytes_on_disk=1_250_000_000, reserved_bytes=0, budget=2_000_000_000, free_disk_bytes=50_000_000_000,
                download_mbps=95.5, downloaded_bytes=1_750_000_000, in_flight=(7,), cached=(1, 2, 3, 4, 5, 6),
                val_shard=10, data_dir="/data", source="http://127.0.0.1:1/x", pid=os.getpid(),
                host=socket.gethostname(), updated=time.time())
    base.update(kw)
    return DownloaderStatus(**base)


def test_status_round_trips_through_json(tmp_path):
    st = _status(skipped=(3,), error="DiskSpaceError: full")
    write_status(tmp_path, st)
    assert read_status(tmp_path) == st
    assert [p.name for p in layout.book_dir(tmp_path).iterdir()] == ["status.json"]   # the temp file was renamed away
    assert json.loads(layout.status_path(tmp_path).read_text())["skipped"] == [3]


def test_line_reads_like_the_seeds_status_line():
    line = _status().line()
    assert line.startswith("7/10 shards downloaded, buffer: 5/5, loader: shard_00001")
    assert "1.2 GB/2.0 GB" in line and line.endswith("data wait 0.0s (0 waits)")
    # a trainer knows the shard in training; the downloader's current_shard is the loader's read-ahead
    assert "buffer: 5/5, training: shard_00000, loader: shard_00001, disk" in _status(training_shard=0).line()


def test_render_names_every_figure():
    text = _status(skipped=(3,), retries=4, waits=2, wait_seconds=1.5, checked={"sha256": 12, "size+footer": 3},
                   training_shard=0).render()
    for needle in ("running", "7/10 verified", "5/5 ready ahead", "data wait    1.5s (2 waits)", "budget 2.0 GB",
                   "95.50 MB/s", "4 retries", "skipped 3", "verified by  sha256: 12, size+footer only: 3",
                   "training on shard_00000.parquet, the loader reads ahead at shard_00001.parquet"):
        assert needle in text, needle
    assert "loader at shard_00001.parquet (it reads ahead of training)" in _status().render()
    assert "verified by  -" in _status().render()


def test_a_wait_in_progress_counts_up_to_now():
    t = time.time()
    st = _status(waits=3, wait_seconds=2.0, wait_shard=4, wait_started=t - 1.5)
    assert st.data_wait(now=t) == "3.5s (3 waits; waiting 1.5s now for shard_00004)"
    assert st.data_wait_seconds(now=t) == 3.5
    assert "data wait 3.5s (3 waits; waiting 1.5s now for shard_00004)" in st.line(now=t)
    assert "data wait    3.5s (3 waits; waiting 1.5s now for shard_00004)" in st.render(now=t)
    # a stopped downloader has no wait in progress, whatever the snapshot says
    assert _status(state="stopped", waits=3, wait_seconds=2.0, wait_started=t - 1).data_wait(now=t) == "2.0s (3 waits)"


def test_the_event_log_tells_a_wait_in_progress_and_the_shard_in_training(tmp_path):
    log = EventLog(tmp_path)
    log.write("start", shard=None)
    log.write("wait_start", shard=0, reader=None)      # the initial buffer: not a data wait
    log.write("wait_end", shard=0, reader=None)
    log.write("training_shard", shard=1)
    log.write("wait_start", shard=2, reader=0)
    t0 = read_events(tmp_path)[-1]["t"]
    write_status(tmp_path, _status(waits=1, current_shard=2, cached=(1,)))
    text, ok = describe(tmp_path, now=t0 + 2.0)
    assert ok and "data wait    2.0s (1 wait; waiting 2.0s now for shard_00002)" in text, text
    assert "training on shard_00001.parquet, the loader reads ahead at shard_00002.parquet" in text
    log.write("wait_end", shard=2, reader=0)
    text, _ = describe(tmp_path, now=t0 + 2.0)
    assert "waiting" not in text and "training on shard_00001" in text
    log.write("start", shard=None)                      # a new run forgets the last one's
    log.close()
    assert "training on" not in describe(tmp_path)[0]


def test_read_events_tail_reads_the_end_only(tmp_path):
    log = EventLog(tmp_path)
    for i in range(2000):
        log.write("downloaded", shard=i)
    log.close()
    tail = read_events(tmp_path, tail_bytes=4096)
    assert 0 < len(tail) < 100 and tail[-1]["shard"] == 1999
    assert [e["shard"] for e in tail] == list(range(2000 - len(tail), 2000))      # the cut line is dropped


def test_checked_round_trips_and_a_wrong_type_is_refused(tmp_path):
    st = _status(checked={"sha256+decode": 2, "md5": 1}, kind="download")
    write_status(tmp_path, st)
    assert read_status(tmp_path) == st
    d = st.to_dict()
    d["checked"] = {"sha256": "many"}
    layout.status_path(tmp_path).write_text(json.dumps(d))
    text, ok = describe(tmp_path)
    assert not ok and "not a shardstream status file" in text and "checked=" in text


def test_render_of_a_download(tmp_path):
    text = _status(kind="download", total_shards=5, shards_verified=2, in_flight=(2, 3), checked={"sha256": 2}).render()
    assert text.startswith("shardstream download running")
    assert "2/5 verified (train shards and the val shard 10)" in text and "downloading 2, 3" in text
    assert "data wait" not in text and "position" not in text


def test_human_bytes():
    assert human_bytes(250_300_000) == "250.3 MB"
    assert human_bytes(999) == "999 B"
    assert human_bytes(None) == "?"


def test_event_log_appends_one_json_object_per_line(tmp_path):
    log = EventLog(tmp_path)
    log.write("downloaded", shard=3, bytes_on_disk=10, budget=None, ahead=1, reader_shard=0)
    log.write("evicted", shard=0, bytes_on_disk=5, budget=None, ahead=1, reader_shard=1)
    log.close()
    log.write("ignored after close")
    layout.book_dir(tmp_path).mkdir(exist_ok=True)
    with open(layout.events_path(tmp_path), "a") as f:
        f.write('{"torn')                   # a crash mid-line must not break readers
    ev = read_events(tmp_path)
    assert [e["event"] for e in ev] == ["downloaded", "evicted"]
    assert ev[0]["shard"] == 3 and ev[0]["t"] <= ev[1]["t"]


def test_describe_without_status_says_so(tmp_path):
    text, ok = describe(tmp_path)
    assert not ok and "no status" in text


def test_describe_flags_a_stale_status_and_a_dead_process(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    write_status(tmp_path, _status(updated=time.time() - 60, pid=p.pid))
    text, ok = describe(tmp_path)
    assert not ok and "STALE" in text and f"process {p.pid} is gone" in text


def test_describe_of_a_stopped_downloader_is_its_last_status(tmp_path):
    write_status(tmp_path, _status(state="stopped", updated=time.time() - 600))
    text, ok = describe(tmp_path)
    assert ok and "last status" in text and "STALE" not in text


def test_cli_prints_status_and_exit_codes(tmp_path, capsys):
    assert cli(["--data-dir", str(tmp_path)]) == 1
    assert "no status" in capsys.readouterr().out
    write_status(tmp_path, _status())
    assert cli(["--data-dir", str(tmp_path)]) == 0
    assert "7/10 verified" in capsys.readouterr().out
    assert cli(["--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_shards"] == 10


def test_cli_through_the_shardstream_command(tmp_path):
    write_status(tmp_path, _status())
    r = subprocess.run([sys.executable, "-m", "shardstream", "status", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "7/10 verified" in r.stdout


def test_cli_default_data_dir_follows_shardstream_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SHARDSTREAM_DATA_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "base_data").mkdir()
    write_status(tmp_path / "base_data", _status())          # fineweb-edu's data dir
    monkeypatch.setenv("SHARDSTREAM_DATASET", "fineweb-edu")
    assert cli([]) == 0 and "7/10 verified" in capsys.readouterr().out
    monkeypatch.delenv("SHARDSTREAM_DATASET")                  # climbmix's dir holds no status
    assert cli([]) == 1 and "base_data_climbmix" in capsys.readouterr().out
    monkeypatch.setenv("SHARDSTREAM_DATASET", "nope")
    assert cli([]) == 2 and "SHARDSTREAM_DATASET='nope': choose one of climbmix" in capsys.readouterr().err
    monkeypatch.setenv("SHARDSTREAM_DATA_DIR", str(tmp_path / "base_data"))     # the CLI reads it, first
    assert cli([]) == 0 and "7/10 verified" in capsys.readouterr().out
