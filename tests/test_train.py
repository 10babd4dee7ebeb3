"""The reference trainer (`python -m scripts.base_train`): streaming runs against the real local server,
kill -9 and exact resume, resume mismatches, SIGTERM/SIGINT, the seed's command line, local mode.

Runs are real subprocesses (the trainer's signals and exit codes are part of what is tested) on tiny
settings: depth 1, rows of 64 tokens, a 512-token vocab, a few dozen steps on the shared sample shards.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardstream import layout
from shardstream.errors import ConfigError
from shardstream.server import ShardServer
from shardstream.train import (ShardYield, lr_multiplier, main, packed_rows, parse_args, parse_bytes,
                               shards_needed)

REPO = Path(__file__).resolve().parents[1]
STEP_RE = re.compile(r"^step (\d+)/(\d+) .*\| loss: ([0-9.]+) .*\| data wait: ([0-9.]+)s \(", re.M)
BUDGET = 2_000_000            # bytes; the sample's 6 shards hold ~3.6 MB


def tiny_args(srv, tmp, **over):
    """Flags of a tiny streaming run against srv, everything under tmp."""
    flags = {"depth": 1, "max_seq_len": 64, "device_batch_size": 4, "num_iterations": 20, "vocab_size": 512,
             "streaming_mode": "True", "streaming_buffer_size": 2, "source": srv.url, "dataset_shards": 6,
             "data_dir": tmp / "data", "max_cache_bytes": BUDGET, "tokenizer_dir": tmp / "tok",
             "checkpoint_dir": tmp / "ckpt", "eval_every": -1, "eval_tokens": 256, "status_every": 5,
             "tokenizer_threads": 1}
    flags.update(over)
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]


def start(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "scripts.base_train", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run(args, timeout=120):
    p = start(args)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def steps(out):
    """{step: (loss, data wait s)} from the step lines."""
    return {int(m[0]): (float(m[2]), float(m[3])) for m in STEP_RE.findall(out)}


def hashes(path):
    """{(step, micro): digest}; the last line for a key wins (a resumed run appends)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        s, m, h = line.split()
        out[(int(s), int(m))] = h
    return out


def run_until_step(args, step, timeout=120):
    """Start a run and return (process, output so far) once it has logged `step`."""
    p = start(args)
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = STEP_RE.match(line)
        if m and int(m.group(1)) >= step:
            return p, "".join(seen)
    p.kill()
    raise AssertionError("run ended before step %d:\n%s" % (step, "".join(seen)[-3000:]))


# ---------------------------------------------------------------------------------------------------
# Streaming runs against the local server

@pytest.fixture(scope="module")
def reference(sample_dir, tmp_path_factory):
    """One uninterrupted 30-step streaming run (nanochat's dashed spellings mixed in), logging batch hashes."""
    tmp = tmp_path_factory.mktemp("reference")
    with ShardServer(sample_dir) as srv:
        args = tiny_args(srv, tmp, num_iterations=30, max_seq_len=None, device_batch_size=None,
                         batch_hash_log=tmp / "h.txt")
        rc, out = run(args + ["--max-seq-len=64", "--device-batch-size", "4"])
    return tmp, rc, out


def test_streaming_run_under_budget(reference):
    tmp, rc, out = reference
    assert rc == 0, out[-3000:]
    losses = steps(out)
    assert sorted(losses) == list(range(30))
    assert losses[29][0] < losses[0][0] - 0.3, "loss did not fall"
    assert re.search(r"^\[Streaming\] \d+/\d+ shards downloaded, buffer: \d+/2, training: shard_\d{5}, "
                     r"loader: shard_\d{5}, .* data wait [0-9.]+s \(\d+ waits?", out, re.M)
    assert "Streaming mode: calculated" in out and "Stopping streaming downloader..." in out
    events = [json.loads(line) for line in layout.events_path(tmp / "data").read_text().splitlines()]
    assert events and max(e["bytes_on_disk"] for e in events) <= BUDGET
    assert any(e["event"] == "downloaded" for e in events)
    assert json.loads(layout.status_path(tmp / "data").read_text())["state"] == "stopped"
    assert (tmp / "ckpt" / "step_000030.pt").is_file()
    assert len(hashes(tmp / "h.txt")) == 30
    assert not list((tmp / "ckpt").glob(".*tmp"))


def test_kill9_then_resume_sees_the_same_batches_and_losses(reference, server, tmp_path):
    n = 30
    ref, rc, out_ref = reference
    assert rc == 0, out_ref[-3000:]
    ref_losses, ref_hashes = steps(out_ref), hashes(ref / "h.txt")

    crash = tmp_path / "crash"
    args = tiny_args(server, crash, num_iterations=n, save_every=4, batch_hash_log=crash / "h.txt")
    p, _ = run_until_step(args, 10)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    saved = sorted(int(f.stem.split("_")[1]) for f in (crash / "ckpt").glob("step_*.pt"))
    assert saved and saved[-1] >= 8 and saved[-1] < n
    resumed_from = saved[-1]
    # whether the loader had read shard 0 to its end (and so deleted it) before the kill is timing
    shard0_left = (crash / "data" / "shard_00000.parquet").is_file()

    rc, out = run(args + ["--resume_from_step=latest"])
    assert rc == 0, out[-3000:]
    assert f"Resuming from {crash / 'ckpt' / f'step_{resumed_from:06d}.pt'}" in out
    got_losses, got_hashes = steps(out), hashes(crash / "h.txt")
    assert sorted(got_losses) == list(range(resumed_from, n))
    for s in range(resumed_from, n):
        assert got_hashes[(s, 0)] == ref_hashes[(s, 0)], f"batch of step {s} differs after resume"
        assert got_losses[s][0] == pytest.approx(ref_losses[s][0], abs=1e-5)
    assert got_hashes == ref_hashes      # the steps before the kill matched too
    # the resume point's documents lie in shard 0: the resumed run fetched it again exactly when the
    # crashed run had deleted it behind the reader, and read the file left on disk otherwise
    events = [json.loads(line) for line in layout.events_path(crash / "data").read_text().splitlines()
              if line.strip()]
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    refetched = any(e["event"] == "downloaded" and e["shard"] == 0 for e in events[last_start:])
    assert refetched == (not shard0_left), f"shard 0 left on disk by the kill: {shard0_left}"


def test_resume_against_other_geometry_or_dataset_fails_clearly(server, tmp_path, caplog):
    assert main(tiny_args(server, tmp_path, num_iterations=2)) == 0
    assert main(tiny_args(server, tmp_path, num_iterations=4, device_batch_size=2, resume_from_step=2)) == 2
    assert "cannot resume from step 2" in caplog.text
    assert "--device_batch_size: checkpoint has 4, this run has 2" in caplog.text
    assert not (tmp_path / "ckpt" / "step_000004.pt").exists()
    assert main(tiny_args(server, tmp_path, num_iterations=4, streaming_total_shards=5, resume_from_step=2)) == 2
    assert "--streaming_total_shards 5" in caplog.text
    # another server holding a 5-shard copy of the data: a different source and dataset size
    caplog.clear()
    other = tmp_path / "other"
    other.mkdir()
    for f in sorted(Path(server.directory).glob("shard_*.parquet"))[:5]:
        shutil.copy(f, other / f.name)
    with ShardServer(other) as srv2:
        assert main(tiny_args(srv2, tmp_path, num_iterations=4, dataset_shards=5, resume_from_step=2)) == 2
    assert "data source: checkpoint has" in caplog.text
    assert "dataset shard count: checkpoint has 6, this run has 5" in caplog.text


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_cleanly_with_a_checkpoint_and_resumes(server, tmp_path, sig, code):
    args = tiny_args(server, tmp_path, num_iterations=400, save_every=100, batch_hash_log=tmp_path / "h.txt")
    p, _ = run_until_step(args, 3)
    p.send_signal(sig)
    rest, _ = p.communicate(timeout=60)
    assert p.returncode == code, rest[-3000:]
    m = re.search(r"Stopped by (SIG\w+) at step (\d+)", rest)
    assert m and m.group(1) == signal.Signals(sig).name, rest[-3000:]
    stopped = int(m.group(2))
    assert 3 <= stopped < 400
    assert (tmp_path / "ckpt" / f"step_{stopped:06d}.pt").is_file()
    assert "Stopping streaming downloader..." in rest and "Download thread stopped" in rest
    assert json.loads(layout.status_path(tmp_path / "data").read_text())["state"] == "stopped"
    if sig != signal.SIGTERM:
        return
    before = hashes(tmp_path / "h.txt")
    rc, out = run(args[:-2] + [f"--num_iterations={stopped + 3}", f"--batch_hash_log={tmp_path / 'h.txt'}",
                               f"--resume_from_step={stopped}"])
    assert rc == 0, out[-3000:]
    assert sorted(steps(out)) == [stopped, stopped + 1, stopped + 2]
    assert set(before) <= set(hashes(tmp_path / "h.txt"))


def sigterm_when(args, marker):
    """Start a run, send SIGTERM once `marker` is printed; return (exit code, seconds to exit, output)."""
    p = start(args)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if marker in line:
            break
    time.sleep(0.5)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=30)
    return p.returncode, time.time() - t0, "".join(seen) + rest


def test_sigterm_while_waiting_for_data_stops_at_once(server, tmp_path):
    server.set_rate(0.02)                # a shard now takes half a minute
    # 1. while fetching the first shard for the tokenizer
    rc, dt, out = sigterm_when(tiny_args(server, tmp_path, num_iterations=1), "Fetching shard_00000")
    assert rc == 143 and dt < 15, out[-3000:]
    assert "Stopped by SIGTERM before training started" in out
    # what the killed fetch left behind does not get in the way of the next run
    server.set_rate(None)
    assert main(tiny_args(server, tmp_path, num_iterations=1)) == 0     # tokenizer + shard yield, cached
    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(tmp_path / "ckpt")
    # 2. while the downloader fetches its initial buffer
    server.set_rate(0.02)
    rc, dt, out = sigterm_when(tiny_args(server, tmp_path, num_iterations=5, save_every=5),
                               "Downloading initial buffer")
    assert rc == 143 and dt < 15, out[-3000:]
    assert "Stopped by SIGTERM at step 0" in out and "Download thread stopped" in out
    assert not list((tmp_path / "ckpt").glob("step_*.pt"))


def test_seed_minimal_test_command_line(server, tmp_path):
    """The seed's 'Minimal Test' flags verbatim (fewer iterations, shorter rows, a local source)."""
    seed = ["--depth=4", "--max_seq_len=512", "--device_batch_size=1", "--total_batch_size=512",
            "--num_iterations=50", "--streaming_mode=True", "--streaming_buffer_size=3",
            "--streaming_total_shards=5", "--eval_tokens=512", "--core_metric_every=-1"]
    local = ["--num_iterations=3", "--max_seq_len=64", "--vocab_size=512", f"--source={server.url}",
             "--dataset_shards=6", f"--data_dir={tmp_path / 'data'}", f"--tokenizer_dir={tmp_path / 'tok'}",
             f"--checkpoint_dir={tmp_path / 'ckpt'}"]
    rc, out = run(seed + local)
    assert rc == 0, out[-3000:]
    assert sorted(steps(out)) == [0, 1, 2]
    assert "Initialized StreamingDownloader: 5 shards" in out          # 5 train shards, the val shard besides
    assert "(1 x 64 x 8 accumulation)" in out                            # 512 tokens = 8 micro-batches
    assert "Validation loss" in out and "Stopping streaming downloader..." in out


# ---------------------------------------------------------------------------------------------------
# Local mode (shards already on disk, as nanochat reads them) and the pieces

def test_local_mode_reads_shards_on_disk(sample_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    before = sorted(p.name for p in data.iterdir())
    rc = main(["--depth=1", "--max_seq_len=64", "--device_batch_size=4", "--num_iterations=8", "--vocab_size=512",
               f"--data_dir={data}", f"--tokenizer_dir={tmp_path / 'tok'}", f"--checkpoint_dir={tmp_path / 'ckpt'}",
               "--eval_tokens=256", "--tokenizer_threads=1"])
    assert rc == 0
    assert sorted(p.name for p in data.iterdir()) == before        # nothing fetched, nothing deleted
    assert (tmp_path / "ckpt" / "step_000008.pt").is_file()
    # an empty data dir without streaming is a clear error
    rc = main(["--depth=1", f"--data_dir={tmp_path / 'empty'}", "--num_iterations=1"])
    assert rc == 2


def test_flags_both_spellings_and_bool_forms():
    a = parse_args(["--max-seq-len=128", "--device_batch_size=2", "--streaming-mode", "--max_cache_bytes=1.5GB"])
    assert (a.max_seq_len, a.device_batch_size, a.streaming_mode) == (128, 2, True)
    assert a.total_batch_size == 256 and a.max_cache_bytes == 1_500_000_000
    assert parse_args(["--streaming_mode=False"]).streaming_mode is False
    assert parse_args(["--streaming_mode=True"]).streaming_mode is True
    assert parse_args([]).streaming_buffer_size == 5 and parse_args([]).status_every == 100
    assert parse_args(["--resume_from_step=latest"]).resume_from_step == "latest"
    with pytest.raises(ConfigError, match="total_batch_size 1000 must be a positive multiple"):
        parse_args(["--total_batch_size=1000", "--max_seq_len=512", "--device_batch_size=1"])
    with pytest.raises(SystemExit):
        parse_args(["--streaming_mode=maybe"])
    with pytest.raises(SystemExit):
        parse_args(["--no_such_flag=1"])
    assert parse_bytes("2MiB") == 2 * 2**20 and parse_bytes("500kb") == 500_000
    # the integrity levels, in both spellings; a bad one is argparse's exit 2
    a = parse_args(["--require-checksum", "--verify=decode"])
    assert (a.require_checksum, a.verify) == (True, "decode")
    a = parse_args(["--require_checksum=False", "--verify", "footer"])
    assert (a.require_checksum, a.verify) == (False, "footer")
    assert (parse_args([]).require_checksum, parse_args([]).verify) == (False, "footer")
    for bad in (["--verify=pages"], ["--require_checksum=perhaps"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2
    # --streaming_total_shards counts train shards: 1 is the least
    assert parse_args(["--streaming_total_shards=1"]).streaming_total_shards == 1
    with pytest.raises(ConfigError, match=">= 1 train shards"):
        parse_args(["--streaming_total_shards=0"])


def test_schedule_and_shard_arithmetic():
    lrs = [lr_multiplier(s, 100, 0.1, 0.2, 0.0) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[100] == 0.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    y = ShardYield(docs=1000, raw_tokens=2_000_000, trained_tokens=1_000_000)
    assert shards_needed(3_500_000, y) == 4                          # 4 train shards (the val shard besides)
    assert shards_needed(3_500_000, y, train_shards=2) == 2
    assert shards_needed(3_500_000, y, read_ahead_docs=600) == 5
    assert shards_needed(1, y) == 1
    # best-fit packing: docs that fit are packed whole; a too-long doc is cropped to fill a row
    assert packed_rows([4, 4, 8], 8) == 2
    assert packed_rows([20, 20], 8) == 2


def test_corpus_flags_both_spellings_and_their_variables(monkeypatch):
    a = parse_args(["--streaming_mode=True", "--files", "sample/10BT/*.parquet", "--files=data/**/*.parquet",
                    "--val-files", "none", "--text-column", "content", "--manifest=m.txt"])
    assert (a.files, a.val_files, a.text_column, a.manifest) == \
        (["sample/10BT/*.parquet", "data/**/*.parquet"], "none", "content", "m.txt")
    a = parse_args(["--streaming_mode=True", "--val_files=val/*.parquet", "--text_column=body"])
    assert (a.files, a.val_files, a.text_column, a.manifest) == (None, "val/*.parquet", "body", None)
    assert parse_args([]).text_column == "text"
    monkeypatch.setenv("SHARDSTREAM_FILES", "a/*.parquet;b/*.parquet")
    monkeypatch.setenv("SHARDSTREAM_VAL_FILES", "none")
    monkeypatch.setenv("SHARDSTREAM_TEXT_COLUMN", "content")
    a = parse_args(["--streaming_mode=True"])
    assert (a.files, a.val_files, a.text_column) == (["a/*.parquet", "b/*.parquet"], "none", "content")
    a = parse_args(["--streaming_mode=True", "--files=c/*.parquet", "--val-files=v/*.parquet", "--text-column=x"])
    assert (a.files, a.val_files, a.text_column) == (["c/*.parquet"], "v/*.parquet", "x")      # flags win
    with pytest.raises(ConfigError, match="SHARDSTREAM_FILES.*--streaming_mode=True"):
        parse_args([])                          # they pick files of a --source: a local run reads none
    monkeypatch.delenv("SHARDSTREAM_FILES")
    monkeypatch.delenv("SHARDSTREAM_VAL_FILES")
    with pytest.raises(ConfigError, match="--text_column"):
        parse_args(["--text-column= "])


def test_shards_needed_counts_files_by_their_sizes():
    y = ShardYield(docs=1000, raw_tokens=2_000_000, trained_tokens=1_000_000)      # shard 0: 1 MB
    assert shards_needed(3_500_000, y, 10, sizes=[1_000_000] * 10) == shards_needed(3_500_000, y, 10) == 4
    assert shards_needed(3_500_000, y, 10, sizes=[1_000_000, 250_000] + [1_000_000] * 8) == 5
    assert shards_needed(3_500_000, y, 10, sizes=[1_000_000, 3_000_000] + [1_000_000] * 8) == 2
    assert shards_needed(99_000_000, y, 3, sizes=[1_000_000] * 3) == 3            # at most every train file
    assert shards_needed(3_500_000, y, 10, sizes=[1_000_000, None] + [1] * 8) == 4  # one unknown: uniform
