"""status.py: the snapshot dataclass, atomic status.json, the event log, and `shardstream status`."""
import json
import os
import socket
import subprocess
import sys
import time

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
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]     # the temp file was renamed away
    assert json.loads((tmp_path / "status.json").read_text())["skipped"] == [3]


def test_line_reads_like_the_seeds_status_line():
    line = _status().line()
    assert line.startswith("7/10 shards downloaded, buffer: 5/5, current: shard_00001")
    assert "1.2 GB/2.0 GB" in line


def test_render_names_every_figure():
    text = _status(skipped=(3,), retries=4, waits=2, wait_seconds=1.5).render()
    for needle in ("running", "7/10 verified", "5/5 ready ahead", "waited 2x, 1.5s", "budget 2.0 GB",
                   "95.50 MB/s", "4 retries", "skipped 3"):
        assert needle in text, needle


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
    with open(tmp_path / "events.jsonl", "a") as f:
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
    assert cli([]) == 2 and "unknown dataset 'nope'" in capsys.readouterr().err
