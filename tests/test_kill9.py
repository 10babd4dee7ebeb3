"""kill -9 at seeded random moments of a download-heavy run, and every restart goes on where it stopped.

A real subprocess (tests/rel_kill9_worker.py) runs a StreamingDownloader under a budget and a loader-style
reader that records each shard it finished; the server is rate-capped so that most kills land in the
middle of transfers. After every kill: each file under a final shard name is byte-identical to the
source (none is ever incomplete), and the progress file is whole. Each restart resumes the partial files
(the server sees Range requests starting mid-file) and the reader resumes exactly after the last shard it
recorded. The last run, unkilled, completes: the reader recorded every shard once, in order, each one
identical to the source.

Quick form: 4 kills. Slow form (`-m slow`): 20 kills over a longer run.
"""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rel_common import check_final_files, make_shards, partial_files, tally, until
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.status import read_status

WORKER = Path(__file__).with_name("rel_kill9_worker.py")


def _progress(path):
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    assert text == "" or text.endswith("\n"), "the progress file has a torn line"
    return [line.split() for line in text.splitlines()]


def _status_pid(data):
    try:
        return read_status(data).pid
    except (OSError, ValueError, AttributeError):
        return None


def _run_with_kills(tmp_path, *, shards, kills, seed, chars, rate_mb):
    remote = tmp_path / "remote"
    shas = make_shards(remote, shards + 1, chars=chars, seed=seed)      # + the val shard
    size = max((remote / shard_name(i)).stat().st_size for i in range(shards + 1))
    data, progress = tmp_path / "data", tmp_path / "progress.txt"
    budget = 6 * size
    rng = random.Random(seed)
    resumed_ranges = killed_mid_partial = 0
    verified = 0
    with ShardServer(remote, rate=rate_mb) as srv:
        cmd = [sys.executable, str(WORKER), srv.hub_url, str(shards + 1), str(data), str(progress), str(shards),
               str(budget)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
        for k in range(kills):
            before = len(_progress(progress))
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            # a seeded moment after this run's downloader started (its status.json names its pid), so the
            # interpreter's start-up time on a loaded machine does not decide where the kills land
            delay = rng.uniform(0.05, 1.2)
            until(lambda: proc.poll() is not None or _status_pid(data) == proc.pid, 60, "the worker to start")
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
            err = proc.communicate(timeout=30)[1].decode(errors="replace")
            assert proc.returncode in (0, -signal.SIGKILL), f"run {k} failed by itself:\n{err[-3000:]}"
            # after the kill: nothing under a final name is incomplete, the progress file is whole
            verified += check_final_files(data, shas)
            rec = _progress(progress)
            assert len(rec) >= before
            killed_mid_partial += bool(partial_files(data))
            if proc.returncode == 0:
                break
        # the last run is not killed: it completes
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        stats = srv.all_stats()
    rec = _progress(progress)
    assert [int(r[0]) for r in rec] == list(range(shards)), "the reader did not resume exactly"
    for i, digest, rows in rec:
        assert digest == shas[int(i)] and int(rows) == 32
    verified += sum(os.path.getsize(remote / shard_name(int(r[0]))) for r in rec)
    verified += check_final_files(data, shas)
    assert partial_files(data) == []
    for name, st in stats.items():
        resumed_ranges += sum(1 for a, _ in st.ranges if a > 0)
    return dict(shas=shas, kills=k + 1, resumed_ranges=resumed_ranges, killed_mid_partial=killed_mid_partial,
                verified=verified, read=len(rec))


def test_kill9_at_random_moments_quick(tmp_path):
    r = _run_with_kills(tmp_path, shards=10, kills=4, seed=11, chars=300_000, rate_mb=0.6)
    assert r["killed_mid_partial"] >= 1, "no kill landed mid-transfer: the test proved nothing about partials"
    assert r["resumed_ranges"] >= 1, "no partial file was resumed with a Range request"
    tally("kill9/quick", faults=r["kills"], bytes_verified=r["verified"], shards_read=r["read"])


@pytest.mark.slow
def test_kill9_at_20_random_moments(tmp_path):
    r = _run_with_kills(tmp_path, shards=80, kills=20, seed=20, chars=300_000, rate_mb=0.4)
    assert r["kills"] == 20
    assert r["killed_mid_partial"] >= 5 and r["resumed_ranges"] >= 5
    tally("kill9/slow", faults=r["kills"], bytes_verified=r["verified"], shards_read=r["read"])
