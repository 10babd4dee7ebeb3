"""Every bad input is a clear error before any network I/O: exit 2 with a message naming the flag, variable or
path and what to do, never a traceback. The CLI cases run the real commands (`.venv/bin/shardstream ...`,
`python -m scripts.base_train ...`) as subprocesses against real local servers; the library cases call the
functions a program would."""
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from shardstream import layout
from shardstream import status as status_mod
from shardstream.errors import ConfigError, UnsafePathError
from shardstream.server import ShardServer
from shardstream.status import DownloaderStatus, EventLog, read_status, write_status
from shardstream.streaming_env import StreamingSettings, env_downloader
from shardstream.units import parse_bytes

from rel_common import partial_files, until

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent            # .venv/bin: the installed `shardstream` command lives here
HUB_REPO = "karpathy/climbmix-400b-shuffle"
ROOT = os.geteuid() == 0                     # root writes into read-only dirs anyway


def shardstream(*args, env=None, timeout=60):
    return subprocess.run([str(BIN / "shardstream"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def trainer(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def clean(r, rc, *needles):
    """r exited rc, with every needle in its output and no traceback."""
    out = r.stdout + r.stderr
    assert r.returncode == rc, f"exit {r.returncode}, wanted {rc}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    for n in needles:
        assert n in out, f"{n!r} not in:\n{out[-3000:]}"
    return out


def _status(**kw):
    base = dict(state="running", shards_verified=1, total_shards=4, ahead=1, buffer_size=2, current_shard=0,
                bytes_on_disk=10, reserved_bytes=0, budget=None, free_disk_bytes=None, download_mbps=1.0,
                downloaded_bytes=10, pid=os.getpid(), host=socket.gethostname(), updated=time.time())
    base.update(kw)
    return DownloaderStatus(**base)


# --- 1. shardstream serve --port ------------------------------------------------------------------------

@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_port_out_of_range(sample_dir, port):
    r = shardstream("serve", sample_dir, "--port", port, timeout=30)
    clean(r, 2, "--port", port, "0..65535")


def test_server_port_checked_by_the_library_too(sample_dir):
    with pytest.raises(ConfigError, match="0..65535"):
        ShardServer(sample_dir, port=70000)


# --- 2. byte counts: one parser, finite, positive, not past what a disk holds --------------------------

def test_parse_bytes_forms():
    assert [parse_bytes(x) for x in ("20GB", "500MB", "1.5GiB", "2000000", "20 gb", "2_000_000_000", "1.5e9",
                                     "2MiB", "500kb", "1,000")] == \
        [20 * 10**9, 500 * 10**6, int(1.5 * 2**30), 2_000_000, 20 * 10**9, 2 * 10**9, 1_500_000_000,
         2 * 2**20, 500_000, 1000]
    assert parse_bytes("123456789012345678") == 123456789012345678        # exact, not through a float


@pytest.mark.parametrize("text", ["1e400", "inf", "nan", "NaN1", "-1", "-5GB", "0", "0.5", "1e-3", "20XB", "",
                                  "9223372036854775808", "1" * 5000, "1e999999999999999999"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ConfigError, match="byte"):
        parse_bytes(text)


def test_one_parse_bytes_everywhere():
    from shardstream import settings, train
    assert settings.parse_bytes is parse_bytes and train.parse_bytes is parse_bytes


@pytest.mark.parametrize("value", ["1e400", "inf", "nan", "-1", "-5GB", "0.5"])
def test_trainer_max_cache_bytes(value, tmp_path):
    r = trainer(f"--max_cache_bytes={value}", "--streaming_mode=True", f"--data_dir={tmp_path / 'd'}")
    clean(r, 2, "--max_cache_bytes", value)


@pytest.mark.parametrize("name", ["SHARDSTREAM_MAX_CACHE_BYTES", "SHARDSTREAM_MIN_FREE_BYTES"])
@pytest.mark.parametrize("value", ["1e400", "inf", "nan", "-2", "-5GB", "0.5"])
def test_streaming_env_bytes(name, value, tmp_path):
    with pytest.raises(ConfigError) as e:
        StreamingSettings.from_env({name: value, "SHARDSTREAM_DATA_DIR": str(tmp_path)})
    assert f"{name}={value!r}" in str(e.value) and "write a " in str(e.value)     # what to write instead


def test_streaming_env_loader_call_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSTREAM_STREAMING", "1")
    monkeypatch.setenv("SHARDSTREAM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SHARDSTREAM_MAX_CACHE_BYTES", "1e400")
    with pytest.raises(ConfigError, match="SHARDSTREAM_MAX_CACHE_BYTES='1e400'"):
        env_downloader("train")
    assert list(tmp_path.iterdir()) == []


# --- 3. shardstream status --interval -------------------------------------------------------------------

@pytest.mark.parametrize("watch", [False, True])
@pytest.mark.parametrize("interval", ["-1", "0", "nan", "inf", "soon"])
def test_status_interval(tmp_path, interval, watch):
    write_status(tmp_path, _status())
    r = shardstream("status", "--data-dir", tmp_path, *(["--watch"] if watch else []), "--interval", interval,
                    timeout=30)
    clean(r, 2, "--interval", interval)


# --- 4. a status.json that is not ours ------------------------------------------------------------------

def _full():
    return _status().to_dict()


BAD_STATUS = {
    "list": "[]", "number": "3", "string": '"running"', "null": "null", "empty object": "{}",
    "not json": "{torn",
    "state a number": json.dumps({**_full(), "state": 5}),
    "updated a string": json.dumps({**_full(), "updated": "yesterday"}),
    "cached a number": json.dumps({**_full(), "cached": 7}),
    "cached of lists": json.dumps({**_full(), "cached": [[1]]}),
    "ahead a bool": json.dumps({**_full(), "ahead": True}),
    "budget a string": json.dumps({**_full(), "budget": "2GB"}),
}


@pytest.mark.parametrize("text", BAD_STATUS.values(), ids=BAD_STATUS.keys())
def test_status_file_not_ours(tmp_path, text):
    (tmp_path / "status.json").write_text(text)
    path = str(tmp_path / "status.json")
    with pytest.raises(ConfigError, match=re.escape(path)):
        read_status(tmp_path)
    for extra in ([], ["--json"]):
        r = shardstream("status", "--data-dir", tmp_path, *extra, timeout=30)
        clean(r, 2, path, "not a shardstream status file")


def test_status_file_with_unknown_extra_fields_still_reads(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps({**_full(), "from_a_newer_version": {"x": 1}}))
    assert read_status(tmp_path).total_shards == 4


def test_watch_keeps_going_over_a_bad_status_file(tmp_path):
    (tmp_path / "status.json").write_text("[]")
    p = subprocess.Popen([str(BIN / "shardstream"), "status", "--watch", "--interval", "0.2", "--data-dir",
                          str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert out.count("not a shardstream status file") >= 2


# --- 5. a trainer --data_dir that cannot be made ---------------------------------------------------------

@pytest.fixture
def hub(sample_dir):
    with ShardServer(sample_dir) as srv:
        yield srv


def _unmakeable(tmp_path, kind):
    if kind == "under a file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "data"
    if kind == "name too long":
        return tmp_path / ("x" * 300) / "data"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "data"


@pytest.mark.parametrize("kind", ["under a file", "name too long",
                                  pytest.param("read-only parent", marks=pytest.mark.skipif(
                                      ROOT, reason="root writes into a read-only dir"))])
def test_trainer_data_dir_cannot_be_made(hub, tmp_path, kind):
    d = _unmakeable(tmp_path, kind)
    r = trainer("--streaming_mode=True", "--source=hf://datasets/" + HUB_REPO, f"--data_dir={d}",
                f"--tokenizer_dir={tmp_path / 'tok'}", f"--checkpoint_dir={tmp_path / 'ck'}",
                env={"HF_ENDPOINT": hub.url})
    clean(r, 2, str(d), "data dir")
    assert hub.requests == []                   # not even the Hub's revision API was asked


# --- 6. the server's tree API and client hang-ups ---------------------------------------------------------

@pytest.mark.parametrize("cursor", ["abc", "-1", "1e3", "1.5", "%00", "99999999999999999999999999"])
def test_tree_api_bad_cursor_is_a_400(hub, cursor):
    r = requests.get(f"{hub.url}/api/datasets/{HUB_REPO}/tree/main?cursor={cursor}", timeout=10)
    assert r.status_code == 400 and "cursor" in r.json()["error"]
    ok = requests.get(f"{hub.url}/api/datasets/{HUB_REPO}/tree/main?cursor=2", timeout=10)   # server still up
    assert ok.status_code == 200 and len(ok.json()) == 4


def _serve(directory, *args):
    p = subprocess.Popen([str(BIN / "shardstream"), "serve", str(directory), "--port", "0", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if m := re.search(r"plain:\s+http://127\.0\.0\.1:(\d+)/<file>", p.stdout.readline()):
            return p, int(m.group(1))
    p.kill()
    raise AssertionError("serve did not print its URL")


def _hang_up(port, request, read=20_000, reset=False):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(request)
    got = 0
    while got < read:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_serve_logs_one_line_per_client_hang_up(sample_dir):
    p, port = _serve(sample_dir, "--rate", "0.2")
    get = b"GET /shard_00001.parquet HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        _hang_up(port, get)                                     # mid-body, orderly close
        _hang_up(port, get, reset=True)                         # mid-body, TCP RST
        _hang_up(port, b"HEAD /shard_00001.parquet HTTP/1.1\r\nHost: x\r\n\r\n", read=1, reset=True)  # idle
        _hang_up(port, b"GET /api/datasets/" + HUB_REPO.encode() + b"/tree/main?cursor=x HTTP/1.1\r\nHost: x\r\n\r\n",
                 read=1)
        time.sleep(1.5)                                         # the server notices at its next write / read
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "hung up" in ln]
    assert len(lines) == 3, err
    assert sum("shard_00001.parquet" in ln and "bytes" in ln for ln in lines) == 2, err


# --- 7. shardstream download: row-group caps checked before any shard is fetched ---------------------------

@pytest.mark.parametrize("var, value", [("SHARDSTREAM_MAX_ROW_GROUP_BYTES", "abc"),
                                        ("SHARDSTREAM_MAX_ROW_GROUP_BYTES", "1e400"),
                                        ("SHARDSTREAM_MAX_ROW_GROUP_BYTES", "inf"),
                                        ("SHARDSTREAM_MAX_ROW_GROUP_BYTES", "-1"),
                                        ("SHARDSTREAM_MAX_ROW_GROUP_ROWS", "x")])
def test_download_row_group_caps_checked_first(hub, tmp_path, var, value):
    r = shardstream("download", "-n", "2", "--dataset-shards", "6", "--source", hub.url,
                    "--data-dir", tmp_path / "d", env={var: value})
    clean(r, 2, var, value)
    assert hub.requests == []
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").glob("shard_*"))


def test_streaming_env_checks_row_group_caps(tmp_path, caplog):
    with pytest.raises(ConfigError, match="SHARDSTREAM_MAX_ROW_GROUP_BYTES"):
        StreamingSettings.from_env({"SHARDSTREAM_MAX_ROW_GROUP_BYTES": "1e400", "SHARDSTREAM_DATA_DIR": str(tmp_path)})
    StreamingSettings.from_env({"SHARDSTREAM_MAX_ROW_GROUP_BYTES": "1000000000", "SHARDSTREAM_DATA_DIR": str(tmp_path)})
    assert "not a shardstream variable" not in caplog.text


def test_trainer_checks_row_group_caps(tmp_path):
    r = trainer("--streaming_mode=True", f"--data_dir={tmp_path / 'd'}", env={"SHARDSTREAM_MAX_ROW_GROUP_ROWS": "x"})
    clean(r, 2, "SHARDSTREAM_MAX_ROW_GROUP_ROWS")


# --- 8. shardstream download stops cleanly on SIGTERM, and a rerun resumes ----------------------------------

def test_download_sigterm_keeps_partials_and_a_rerun_resumes(sample_dir, tmp_path):
    d = tmp_path / "d"
    cmd = [str(BIN / "shardstream"), "download", "-n", "1", "-w", "2", "--dataset-shards", "6", "--data-dir", str(d)]
    with ShardServer(sample_dir, rate=0.2) as srv:
        p = subprocess.Popen(cmd + ["--source", srv.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            until(lambda: any(os.path.getsize(d / f) > 50_000 for f in partial_files(d)), timeout=30,
                  what="a partial file with bytes in it")
            os.kill(p.pid, signal.SIGTERM)
            out, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 143, err
        assert "Traceback" not in err and "SIGTERM" in err and "resume" in err, err
        kept = partial_files(d)
        assert kept and not list(d.glob("shard_*.parquet"))
        srv.set_rate(None)
        srv.requests.clear()
        r = subprocess.run(cmd + ["--source", srv.url], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        ranged = [q for q in srv.requests if q.method == "GET" and q.headers.get("Range", "").startswith("bytes=")
                  and not q.headers["Range"].startswith("bytes=0-")]
        assert ranged, srv.requests
    assert sorted(f.name for f in d.glob("shard_*.parquet")) == ["shard_00000.parquet", "shard_00005.parquet"]
    assert partial_files(d) == []


# --- 9. status.json / events.jsonl: never written through a planted symbolic link ----------------------------

@pytest.fixture
def outside(tmp_path):
    f = tmp_path / "outside.txt"
    f.write_text("precious\n")
    return f


def _book(tmp_path):
    d = tmp_path / "data"
    layout.book_dir(d).mkdir(parents=True)
    return d


def test_event_log_refuses_a_planted_link(tmp_path, outside):
    d = _book(tmp_path)
    layout.events_path(d).symlink_to(outside)
    with pytest.raises(UnsafePathError) as e:
        EventLog(d)
    assert str(layout.events_path(d)) in str(e.value)
    assert outside.read_text() == "precious\n"


def test_downloader_start_refuses_a_planted_event_log(hub, tmp_path, outside):
    from shardstream.downloader import StreamingDownloader
    d = _book(tmp_path)
    layout.events_path(d).symlink_to(outside)
    dl = StreamingDownloader(source=hub.url, dataset_shards=6, total_shards=2, data_dir=d)
    with pytest.raises(UnsafePathError, match=re.escape(str(layout.events_path(d)))):
        dl.start()
    assert outside.read_text() == "precious\n"


def test_a_planted_bookkeeping_dir_link_is_refused(tmp_path, outside):
    d = tmp_path / "data"
    d.mkdir()
    (d / layout.BOOK_DIR).symlink_to(outside.parent)    # all our writes would land outside the data dir
    with pytest.raises(UnsafePathError, match="symbolic link"):
        EventLog(d)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        write_status(d, _status())


def test_write_status_over_a_planted_link_replaces_the_link(tmp_path, outside):
    d = _book(tmp_path)
    layout.status_path(d).symlink_to(outside)
    write_status(d, _status())
    assert outside.read_text() == "precious\n"
    assert not layout.status_path(d).is_symlink() and read_status(d).total_shards == 4


def test_write_status_refuses_a_planted_temp_file(tmp_path, outside, monkeypatch):
    d = _book(tmp_path)
    planted = layout.book_dir(d) / ".status.json.planted.tmp"
    planted.symlink_to(outside)
    monkeypatch.setattr(status_mod, "_temp_name", lambda: planted.name)
    with pytest.raises(UnsafePathError, match=re.escape(str(planted))):
        write_status(d, _status())
    assert outside.read_text() == "precious\n" and not layout.status_path(d).exists()


def test_status_file_that_is_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "status.json")             # open() would block until a writer came
    with pytest.raises(ConfigError, match="not a regular file"):
        read_status(tmp_path)
    clean(shardstream("status", "--data-dir", tmp_path, timeout=30), 2, str(tmp_path / "status.json"))
