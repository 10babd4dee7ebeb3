"""A newcomer's first hour: every figure agrees, every error says what to do.

Real processes against real local servers (shardstream.server.ShardServer): the trainer
(`python -m scripts.base_train`), `shardstream download` and `shardstream status`, on the shared sample
shards (6 shards of ~0.6 MB, the last one val).

- one data wait (status.py's definition: readers blocked on shards not on disk yet) in the step log, the
  [Streaming] lines, the Done line and `shardstream status`, a wait in progress counted as it lasts;
- the shard in training apart from the loader's read-ahead;
- a plain http(s) source without a shard count refused before any request, saying what to give;
- --streaming_total_shards counts train shards, as SHARDSTREAM_TOTAL_SHARDS and StreamingDownloader do;
- `shardstream download`: the bar's total known up front, decimal units, status.json as it goes;
- [Streaming] lines in a run shorter than --status_every; the integrity flags; what vouched for each shard;
- the trainer's own fetch of shard 0 in the event log.
"""
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shardstream.downloader import StreamingDownloader
from shardstream.errors import ConfigError
from shardstream.server import ShardServer
from shardstream.source import Source
from shardstream.listing import make_source
from shardstream.status import read_events, read_status
from shardstream.timeline import summarize

REPO = Path(__file__).resolve().parents[1]
STEPS = 90                  # under --status_every's default 100
WAIT_RE = r"([0-9.]+s \(\d+ waits?(?:; waiting [0-9.]+s now for shard_\d{5})?\))"


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def shardstream(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "shardstream", *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def trainer_args(srv, tmp, **over):
    flags = {"depth": 1, "max_seq_len": 64, "device_batch_size": 4, "num_iterations": 20, "vocab_size": 512,
             "streaming_mode": "True", "streaming_buffer_size": 2, "source": srv.url, "dataset_shards": 6,
             "data_dir": tmp / "data", "max_cache_bytes": 2_000_000, "tokenizer_dir": tmp / "tok",
             "checkpoint_dir": tmp / "ckpt", "eval_every": -1, "eval_tokens": 0, "tokenizer_threads": 1}
    flags.update(over)
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]


def start_trainer(args):
    return subprocess.Popen([sys.executable, "-m", "scripts.base_train", *map(str, args)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_of(text):
    m = re.search(r"data wait:? +" + WAIT_RE, text)
    return m and m.group(1)


# ---------------------------------------------------------------------------------------------------
# One trainer run with a wait in the middle: figures during the wait and after the run

@pytest.fixture(scope="module")
def slow_run(sample_dir, tmp_path_factory):
    """A 90-step streaming run (a fresh tokenizer, so the trainer fetches shard 0 itself) whose server slows
    to a trickle once shard 0 is in: the loader reads ahead into shard 1 and waits for it, and the loop
    waits too once shard 0's documents are used up (~60 steps of 32 rows); the wait is watched from
    outside (status) and in the step log, then the trickle is lifted."""
    tmp = tmp_path_factory.mktemp("slow_run")
    with ShardServer(sample_dir) as srv:
        p = start_trainer(trainer_args(srv, tmp, verify="decode", device_batch_size=32, num_iterations=STEPS))
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
        reader.start()
        try:
            until(lambda: (tmp / "data" / "shard_00000.parquet").is_file(), 90, "the trainer's shard 0")
            srv.set_rate(0.04)
            from shardstream.status import describe
            during = until(lambda: (lambda t: "now for shard_00001" in t and t)(describe(tmp / "data")[0]), 60,
                           "`shardstream status` to show the wait in progress")
            watcher = until(lambda: next((ln for ln in list(lines) if "waiting for data:" in ln), None), 30,
                            "the step log's line during the wait")
            later = describe(tmp / "data")[0]
            srv.set_rate(None)
            p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        reader.join(10)
        after = shardstream("status", "--data-dir", tmp / "data")
    return tmp, p.returncode, "".join(lines), during, later, watcher, after


def test_a_wait_in_progress_shows_its_elapsed_time(slow_run):
    tmp, rc, out, during, later, watcher, _ = slow_run
    assert rc == 0, out[-3000:]
    # `shardstream status` during the wait: the figure counts the wait so far, not "0.0s"
    m = re.search(r"data wait    ([0-9.]+)s \(1 wait; waiting ([0-9.]+)s now for shard_00001\)", during)
    assert m and float(m.group(1)) == float(m.group(2)), during
    m2 = re.search(r"data wait    ([0-9.]+)s \(1 wait; waiting ([0-9.]+)s now for shard_00001\)", later)
    assert m2 and float(m2.group(2)) > float(m.group(2)), later
    # the step log says so while the loop waits, in the same words
    assert re.match(r"step 000\d\d/00090 \| waiting for data: [0-9.]+s so far \| data wait: [0-9.]+s \(1 wait; "
                    r"waiting [0-9.]+s now for shard_00001\)", watcher), watcher
    assert float(re.search(r"waiting ([0-9.]+)s now", watcher).group(1)) >= 5.0


def test_one_data_wait_on_every_surface(slow_run):
    tmp, rc, out, _, _, _, after = slow_run
    assert rc == 0, out[-3000:]
    done = wait_of(next(ln for ln in out.splitlines() if ln.startswith("Done:")))
    final = wait_of(next(ln for ln in out.splitlines() if ln.startswith("[Streaming] final:")))
    assert after.returncode == 0, after.stderr
    shown = wait_of(after.stdout)
    assert done == final == shown, (done, final, shown)
    st = read_status(tmp / "data")
    assert done == f"{st.wait_seconds:.1f}s ({st.waits} wait{'s' * (st.waits != 1)})" and st.wait_seconds >= 5.0
    # the step lines show the same figure as it grows (a wait in progress is timed from its event: allow a
    # tenth of a second between the two clocks)
    seen = [float(wait_of(ln).split("s")[0]) for ln in out.splitlines() if ln.startswith("step ") and "loss:" in ln]
    assert len(seen) == STEPS and seen == sorted(seen) and seen[-1] <= round(st.wait_seconds, 1) + 0.1
    assert "First batch ready" in out and "(data wait so far: " in out


def test_training_and_the_loaders_read_ahead_apart(slow_run):
    tmp, rc, out, _, _, _, after = slow_run
    streaming = [ln for ln in out.splitlines() if ln.startswith("[Streaming]")]
    assert streaming and all(re.search(r"training: shard_\d{5}, loader: shard_\d{5}", ln) for ln in streaming)
    trained = [e["shard"] for e in read_events(tmp / "data") if e["event"] == "training_shard"]
    assert trained and trained[0] == 0
    assert re.search(rf"position     training on shard_0000{trained[-1]}\.parquet, the loader reads ahead at "
                     r"shard_\d{5}\.parquet", after.stdout), after.stdout


def test_streaming_lines_in_a_run_shorter_than_status_every(slow_run):
    _, rc, out, _, _, _, _ = slow_run
    streaming = [ln for ln in out.splitlines() if ln.startswith("[Streaming]")]
    # --status_every 100 (the default) in a 90-step run: one after the first step, one at the end
    assert len(streaming) == 2 and streaming[-1].startswith("[Streaming] final:"), streaming
    lines = out.splitlines()
    first, second = (next(i for i, ln in enumerate(lines) if ln.startswith(f"step {k:05d}/00090 (")) for k in (0, 1))
    assert any(ln.startswith("[Streaming] ") for ln in lines[first:second])


def test_the_trainers_own_fetch_of_shard_0_is_in_the_event_log(slow_run):
    tmp, rc, out, _, _, _, _ = slow_run
    events = read_events(tmp / "data")
    own = [e for e in events if e["event"] == "downloaded" and e.get("by") == "trainer"]
    assert [e["shard"] for e in own] == [0] and own[0]["size"] > 0 and own[0]["checked"] == "size+footer+decode"
    assert all("bytes_on_disk" in e for e in events)
    # every fetch counts, shard 0 included: the timeline (and the demo's summary) count the log's downloads
    fetched = [e["shard"] for e in events if e["event"] == "downloaded"]
    assert fetched[0] == 0 and summarize(sorted(events, key=lambda e: e["t"])).downloads == len(fetched)
    # --verify=decode reached the downloader's fetches too
    assert {e["checked"] for e in events if e["event"] == "downloaded"} == {"size+footer+decode"}


def test_status_says_what_vouched_for_each_streamed_shard(slow_run):
    """Needs downloader.py's _status() to pass checked=dict(self._checked)."""
    tmp, rc, out, _, _, _, after = slow_run
    downloads = [e for e in read_events(tmp / "data") if e["event"] == "downloaded" and e.get("by") != "trainer"]
    assert read_status(tmp / "data").checked == {"size+footer+decode": len(downloads)}
    assert f"verified by  size+footer+decode only: {len(downloads)}" in after.stdout


# ---------------------------------------------------------------------------------------------------
# A plain http(s) source without a shard count

def test_a_plain_https_source_needs_its_shard_count_before_any_request(server, tmp_path, monkeypatch):
    r = shardstream("download", "-n", "1", "--source", server.url, "--data-dir", tmp_path / "d")
    assert r.returncode == 2 and "cannot be listed" in r.stderr and "--dataset-shards T" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "hf://datasets/ORG/NAME" in r.stderr
    p = subprocess.run([sys.executable, "-m", "scripts.base_train", "--streaming_mode=True", f"--source={server.url}",
                        f"--data_dir={tmp_path / 'd'}"], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "--dataset-shards T" in p.stdout, p.stdout[-2000:]
    assert server.requests == []                # nothing was asked for, no shard_06542
    with pytest.raises(ConfigError, match="cannot be listed"):
        make_source("https://example.com/corpus")
    assert make_source("https://example.com/corpus", dataset_shards=6).dataset_shards == 6
    # the default source, and a known dataset's own Hub URL, keep the known count
    assert make_source().dataset_shards == 6543 and make_source(dataset="fineweb-edu").dataset_shards == 1823
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert make_source(server.hub_url).dataset_shards == 6543
    assert make_source().base_url == server.hub_url
    with pytest.raises(ConfigError, match="cannot be listed"):
        make_source(server.hub_url + "/subdir")
    assert server.requests == []


# ---------------------------------------------------------------------------------------------------
# Train shards, the val shard besides: one meaning for the flag, the variable and the library

def test_total_shards_counts_train_shards_everywhere(server, tmp_path):
    p = subprocess.run([sys.executable, "-m", "scripts.base_train", *trainer_args(server, tmp_path,
                        streaming_total_shards=6)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout[-2000:]
    assert ("--streaming_total_shards 6: http://127.0.0.1" in p.stdout and "has 5 train shards" in p.stdout
            and "6 is the dataset's count with the val shard, but the flag counts train shards only" in p.stdout
            and "give 1..5 (5 for all of them), or -1" in p.stdout), p.stdout[-2000:]
    assert server.requests == []                # refused before shard 0 is fetched
    help_text = subprocess.run([sys.executable, "-m", "scripts.base_train", "--help"], cwd=REPO, env=env(),
                               capture_output=True, text=True, timeout=60).stdout
    assert "train shards to stream (0..N-1; the val shard is fetched besides" in " ".join(help_text.split())
    dl = StreamingDownloader(5, source=Source(server.url, 6), data_dir=tmp_path / "lib", progress=False)
    assert (dl.total_shards, dl.val_shard, dl.plan.epoch_length) == (5, 5, 5)
    with pytest.raises(ConfigError, match="only 5 train shards"):
        StreamingDownloader(6, source=Source(server.url, 6), data_dir=tmp_path / "lib", progress=False)


# ---------------------------------------------------------------------------------------------------
# shardstream download: the bar's total up front, one unit system, status.json as it goes

def test_download_bar_total_is_known_up_front_and_status_follows_it(server, tmp_path):
    from tqdm import tqdm
    d = tmp_path / "d"
    ids = [0, 1, 5]
    total = sum((server.directory / f"shard_{i:05d}.parquet").stat().st_size for i in ids)
    server.set_rate(0.6)                        # ~3 s for the three shards
    p = subprocess.Popen([sys.executable, "-m", "shardstream", "download", "-n", "2", "-w", "2", "--dataset-shards",
                          "6", "--source", server.url, "--data-dir", str(d)], cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        st = until(lambda: (lambda s: s if s and s.in_flight else None)(read_status(d) if d.is_dir() else None),
                   30, "status.json of the download in flight")
        shown = shardstream("status", "--data-dir", d)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert st.kind == "download" and st.state == "running" and st.total_shards == 3 and st.val_shard == 5
    assert shown.returncode == 0 and shown.stdout.startswith("shardstream download running"), shown.stdout
    # every render of the bar has the same total, the sum of the sizes in decimal units (1 MB = 10**6 bytes)
    renders = [r for r in re.split(r"[\r\n]", err) if r.startswith("download:")]
    totals = {re.search(r"\| *[0-9.]+[kMG]?/([0-9.]+[kMG]?) \[", r).group(1) for r in renders}
    assert len(renders) >= 2 and totals == {tqdm.format_sizeof(total, divisor=1000)}, renders
    assert re.search(r"100%\|", renders[-1])
    assert f"{total / 1e6:.1f} MB in" in out, out
    # the last status: stopped, every shard verified, what vouched for each
    last = read_status(d)
    assert (last.state, last.shards_verified, last.downloaded_bytes) == ("stopped", 3, total)
    assert last.checked == {"size+footer": 3} and last.cached == (0, 1, 5)
    text = shardstream("status", "--data-dir", d).stdout
    assert "3/3 verified" in text and "verified by  size+footer only: 3" in text, text


def test_download_integrity_flags(server, tmp_path):
    base = ["download", "-n", "1", "--dataset-shards", "6"]
    # no checksum at the plain URL: --require-checksum refuses every shard, naming why
    r = shardstream(*base, "--source", server.url, "--data-dir", tmp_path / "a", "--require-checksum")
    assert r.returncode == 1 and r.stderr.count("shard 0000") >= 2 and "checksum" in r.stderr, r.stderr
    assert not list((tmp_path / "a").glob("shard_*.parquet"))
    # the Hub's URL form gives sha256: required, present, and every page decoded
    r = shardstream(*base, "--source", server.hub_url, "--data-dir", tmp_path / "b", "--require-checksum",
                    "--verify", "decode")
    assert r.returncode == 0, r.stderr
    assert "verified by sha256+decode: 2" in r.stdout and read_status(tmp_path / "b").checked == {"sha256+decode": 2}
    r = shardstream(*base, "--source", server.hub_url, "--data-dir", tmp_path / "c", "--verify", "pages")
    assert r.returncode == 2 and "invalid choice: 'pages'" in r.stderr and "footer" in r.stderr


def test_trainer_require_checksum_refuses_an_unchecked_source(server, tmp_path):
    p = subprocess.run([sys.executable, "-m", "scripts.base_train",
                        *trainer_args(server, tmp_path, require_checksum="True")], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "error:" in p.stdout and "checksum" in p.stdout, p.stdout[-2000:]
    assert "Traceback" not in p.stdout and not list((tmp_path / "data").glob("shard_*.parquet"))
    p = subprocess.run([sys.executable, "-m", "scripts.base_train", "--verify=pages"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "invalid choice: 'pages'" in p.stderr
