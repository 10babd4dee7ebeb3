"""The reference trainer under torchrun: 2 processes, gloo on CPU, streaming from the local server.

Real torchrun (`python -m torch.distributed.run --standalone --nproc_per_node=2 -m scripts.base_train`) on
the shared sample shards with a disk budget smaller than the data: one downloader for the node (each shard
requested once), rank 0 alone logging and checkpointing, an exact resume of both ranks from rank 0's
checkpoint, and a SIGTERM sent to one rank stopping both at the same step.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch

from shardstream import layout
from shardstream.errors import ConfigError
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.train import parse_args
from test_train import hashes

REPO = Path(__file__).resolve().parents[1]
STEP_RE = re.compile(r"^(\[rank \d+\] )?step (\d+)/(\d+) .*\| loss: ([0-9.]+)", re.M)
BUDGET = 2_000_000            # bytes; the sample's 6 shards hold ~3.4 MB
SHARDS = 6                    # shard_00005 is the val shard


def flags(srv, tmp, **over):
    f = {"depth": 1, "max_seq_len": 64, "device_batch_size": 4, "num_iterations": 10, "vocab_size": 512,
         "streaming_mode": "True", "streaming_buffer_size": 2, "source": srv.url, "dataset_shards": SHARDS,
         "data_dir": tmp / "data", "max_cache_bytes": BUDGET, "tokenizer_dir": tmp / "tok",
         "checkpoint_dir": tmp / "ckpt", "eval_every": -1, "eval_tokens": 256, "status_every": 5,
         "tokenizer_threads": 1, "save_every": 5, "batch_hash_log": tmp / "h.txt"}
    f.update(over)
    return [f"--{k}={v}" for k, v in f.items() if v is not None]


def torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scripts.base_train", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
               SHARDSTREAM_DIST_TIMEOUT="30")
    # its own process group: a hung run is killed whole (torchrun and its workers), never left holding stdout
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finish(p, timeout=150):
    watchdog = threading.Timer(timeout, kill_group, (p,))
    watchdog.start()
    try:
        out, _ = p.communicate()
    finally:
        timed_out = not watchdog.is_alive()
        watchdog.cancel()
    assert not timed_out, "torchrun did not finish in %d s:\n%s" % (timeout, out[-4000:])
    return p.returncode, out


def losses(out):
    """{step: loss} from the step lines; fails on a step line from a rank other than 0."""
    found = STEP_RE.findall(out)
    assert not [m for m in found if m[0]], "a rank other than 0 logged step lines"
    got = {int(m[1]): float(m[3]) for m in found}
    assert len(got) == len(found), "a step was logged twice"
    return got


def gets(srv):
    return [srv.stats(shard_name(s)).get_requests for s in range(SHARDS)]


@pytest.fixture(scope="module")
def runs(sample_dir, tmp_path_factory):
    """An uninterrupted 10-step run (checkpoints at 5 and 10), then a resume from step 5 in a fresh data dir."""
    tmp = tmp_path_factory.mktemp("ddp")
    with ShardServer(sample_dir) as srv:
        full = tmp / "full"
        rc, out = finish(torchrun(flags(srv, full)))
        counts = gets(srv)
        res = tmp / "resume"
        (res / "ckpt").mkdir(parents=True)
        if (full / "ckpt" / "step_000005.pt").is_file():
            shutil.copy(full / "ckpt" / "step_000005.pt", res / "ckpt")
        rc2, out2 = finish(torchrun(flags(srv, res, tokenizer_dir=full / "tok", resume_from_step=5)))
    return {"dir": full, "rc": rc, "out": out, "gets": counts, "res": res, "rc2": rc2, "out2": out2}


def test_ten_steps_under_torchrun(runs):
    out = runs["out"]
    assert runs["rc"] == 0, out[-4000:]
    got = losses(out)
    assert sorted(got) == list(range(10))
    assert got[9] < got[0], "loss did not fall"
    assert "(4 x 64 x 2 ranks x 1 accumulation)" in out
    assert len(re.findall(r"Validation loss", out)) == 1          # averaged over ranks, printed by rank 0
    assert re.search(r"^\[Streaming\] \d+/\d+ shards downloaded", out, re.M)
    assert "node leader ready: one downloader for readers [0, 1]" in out
    # one downloader for the node: every shard requested at most once, the val shard and the first once
    assert all(n <= 1 for n in runs["gets"]), runs["gets"]
    assert runs["gets"][0] == 1 and runs["gets"][SHARDS - 1] == 1 and sum(runs["gets"]) >= 3
    data = runs["dir"] / "data"
    events = [json.loads(line) for line in layout.events_path(data).read_text().splitlines()]
    assert events and max(e["bytes_on_disk"] for e in events) <= BUDGET
    assert sum(f.stat().st_size for f in data.glob("shard_*.parquet")) <= BUDGET
    # both ranks trained, on different rows; rank 0's checkpoint carries both ranks' loader states
    h0, h1 = hashes(runs["dir"] / "h.txt"), hashes(runs["dir"] / "h.txt.rank1")
    assert sorted(h0) == sorted(h1) == [(s, 0) for s in range(10)]
    assert all(h0[k] != h1[k] for k in h0)
    ckpt = torch.load(runs["dir"] / "ckpt" / "step_000005.pt", map_location="cpu", weights_only=False)
    ddp = ckpt["loader_state"]["ddp"]
    assert ddp["world_size"] == 2 and ddp["exact"] and len(ddp["ranks"]) == 2
    assert ckpt["fingerprint"]["world_size"] == 2
    assert sorted(p.name for p in (runs["dir"] / "ckpt").iterdir()) == ["step_000005.pt", "step_000010.pt"]


def test_resume_under_torchrun_matches_the_uninterrupted_run(runs):
    assert runs["rc"] == 0, runs["out"][-4000:]
    assert runs["rc2"] == 0, runs["out2"][-4000:]
    ref, got = losses(runs["out"]), losses(runs["out2"])
    assert sorted(got) == list(range(5, 10))
    for s in range(5, 10):
        assert abs(got[s] - ref[s]) <= 1e-5, (s, got[s], ref[s])
    # every rank resumed from rank 0's state exactly where it was (the shards were fetched again)
    for name in ("h.txt", "h.txt.rank1"):
        before, after = hashes(runs["dir"] / name), hashes(runs["res"] / name)
        assert after == {k: v for k, v in before.items() if k[0] >= 5}, name


def test_sigterm_to_one_rank_stops_both_at_the_same_step(sample_dir, tmp_path):
    with ShardServer(sample_dir) as srv:
        p = torchrun(flags(srv, tmp_path, num_iterations=400, save_every=1000, streaming_prefetch="auto"))
        watchdog = threading.Timer(120, kill_group, (p,))     # readline below cannot hang the test
        watchdog.start()
        seen = []
        try:
            for line in p.stdout:
                seen.append(line)
                m = STEP_RE.match(line)
                if m and int(m[2]) >= 2:
                    break
            workers = [c for c in psutil.Process(p.pid).children(recursive=True)
                       if any("scripts.base_train" in a for a in c.cmdline())]
            rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
            assert len(workers) == 2 and rank1, ("".join(seen)[-3000:], [c.cmdline() for c in workers])
            os.kill(rank1[0].pid, signal.SIGTERM)
        except BaseException:
            kill_group(p)
            raise
        finally:
            watchdog.cancel()
        rc, rest = finish(p, timeout=90)
    out = "".join(seen) + rest
    assert rc != 0, out[-3000:]
    stops = re.findall(r"^(\[rank 1\] )?Stopped by SIGTERM at step (\d+)", out, re.M)
    assert len(stops) == 2 and stops[0][1] == stops[1][1], out[-3000:]
    step = int(stops[0][1])
    assert step < 400
    assert "Another rank received SIGTERM" in out
    assert (tmp_path / "ckpt" / f"step_{step:06d}.pt").is_file()   # --save_every set: rank 0 saved the stop
    assert json.loads(layout.status_path(tmp_path / "data").read_text())["state"] == "stopped"


def test_total_batch_size_counts_every_rank(monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    a = parse_args(["--max_seq_len=64", "--device_batch_size=4"])
    assert a.total_batch_size == 512                                  # -1: one micro-batch on every rank
    assert parse_args(["--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=2048"]).total_batch_size \
        == 2048
    with pytest.raises(ConfigError, match=r"total_batch_size 768 .* world size 2 = 512"):
        parse_args(["--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=768"])
    assert parse_args(["--streaming_partition=node", "--streaming_prefetch=auto"]).streaming_partition == "node"
