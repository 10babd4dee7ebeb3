"""`shardstream download` and download_shards against the real local server."""
import subprocess
import sys

import pytest

from shardstream.cli import main
from shardstream.download import download_shards
from shardstream.errors import ConfigError, PermanentFetchError
from shardstream.fetch import FetchPolicy, FetchResult
from shardstream.server import Fault
from shardstream.source import Source

FAST = FetchPolicy(connect_timeout=2.0, stall_timeout=1.0, backoff_initial=0.01, backoff_max=0.05)


def name(i):
    return f"shard_{i:05d}.parquet"


def on_disk(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".parquet"))


def identical(srv, d, ids):
    return all((d / name(i)).read_bytes() == (srv.directory / name(i)).read_bytes() for i in ids)


def test_cli_fetches_train_shards_and_val(server, tmp_path, capsys):
    d = tmp_path / "data"
    rc = main(["download", "-n", "3", "-w", "2", "--dataset-shards", "6", "--source", server.hub_url,
               "--data-dir", str(d)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert on_disk(d) == [name(0), name(1), name(2), name(5)]     # 0..2 and the val shard, not 3, 4
    assert identical(server, d, [0, 1, 2, 5])
    assert "4/4 shards verified" in out
    assert not list(d.glob("*.partial*"))
    # a second run finds them all there and fetches nothing
    before = sum(s.get_requests for s in server.all_stats().values())
    assert main(["download", "-n", "3", "--dataset-shards", "6", "--source", server.hub_url,
                 "--data-dir", str(d)]) == 0
    assert sum(s.get_requests for s in server.all_stats().values()) == before
    assert "4 already there" in capsys.readouterr().out


def test_cli_rides_out_faults(server, tmp_path, capsys):
    server.add_fault(Fault("reset", at=0.5, times=3))
    server.add_fault(Fault("status", status=503, times=2))
    server.add_fault(Fault("flip", file=name(1)))
    d = tmp_path / "data"
    assert main(["download", "-n", "2", "--dataset-shards", "6", "--source", server.hub_url,
                 "--data-dir", str(d)]) == 0, capsys.readouterr().err
    assert identical(server, d, [0, 1, 5])


def test_cli_404_shard_fails_with_a_line_naming_it(server, tmp_path, capsys):
    (server.directory / name(1)).unlink()
    d = tmp_path / "data"
    rc = main(["download", "-n", "3", "--dataset-shards", "6", "--source", server.hub_url, "--data-dir", str(d)])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("shard ")]
    assert len(lines) == 1 and lines[0].startswith("shard 00001") and "404" in lines[0]
    assert on_disk(d) == [name(0), name(2), name(5)]               # the others still arrived
    assert "3/4 shards verified" in out


def test_cli_unwritable_data_dir_is_a_clear_error(server, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["download", "-n", "1", "--dataset-shards", "6", "--source", server.hub_url,
               "--data-dir", str(blocker / "data")])
    err = capsys.readouterr().err
    assert rc == 2 and str(blocker / "data") in err and "Traceback" not in err


@pytest.mark.parametrize("args, match", [
    (["-n", "9", "--dataset-shards", "6"], "5 train shards"),
    (["-n", "1", "-w", "0", "--dataset-shards", "6"], "-w must be >= 1"),
    (["-n", "1", "--dataset-shards", "1"], "dataset_shards must be"),
])
def test_cli_bad_arguments_are_clear_errors(server, tmp_path, capsys, args, match):
    rc = main(["download", *args, "--source", server.hub_url, "--data-dir", str(tmp_path)])
    assert rc == 2 and match in capsys.readouterr().err


def test_cli_plain_http_to_a_remote_host_needs_allow_insecure(tmp_path, capsys):
    rc = main(["download", "-n", "1", "--dataset-shards", "6", "--source", "http://example.com/d",
               "--data-dir", str(tmp_path)])
    assert rc == 2 and "--allow-insecure" in capsys.readouterr().err


def test_env_overrides_source_and_data_dir(server, tmp_path, monkeypatch, capsys):
    d = tmp_path / "from_env"
    monkeypatch.setenv("SHARDSTREAM_SOURCE", server.hub_url)
    monkeypatch.setenv("SHARDSTREAM_DATA_DIR", str(d))
    assert main(["download", "-n", "1", "--dataset-shards", "6"]) == 0, capsys.readouterr().err
    assert on_disk(d) == [name(0), name(5)]


def test_download_shards_returns_results_and_errors_in_order(server, tmp_path):
    (server.directory / name(2)).unlink()
    got = []
    out = download_shards(Source(server.hub_url, 6), [3, 2, 0], tmp_path, workers=3, policy=FAST,
                          on_bytes=got.append)
    assert isinstance(out[0], FetchResult) and out[0].shard_id == 3
    assert isinstance(out[1], PermanentFetchError) and out[1].shard_id == 2
    assert isinstance(out[2], FetchResult) and out[2].shard_id == 0
    assert sum(got) == out[0].size + out[2].size
    with pytest.raises(ConfigError):
        download_shards(Source(server.hub_url, 6), [0], tmp_path, workers=0)


def test_console_front_door_exit_codes(server, tmp_path):
    # the real `python -m shardstream download` process: exit status is what scripts see
    d = tmp_path / "data"
    cmd = [sys.executable, "-m", "shardstream", "download", "-n", "1", "--dataset-shards", "6",
           "--source", server.hub_url, "--data-dir", str(d)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    (server.directory / name(1)).unlink()
    bad = subprocess.run(cmd[:5] + ["2"] + cmd[6:], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "shard 00001" in bad.stderr
