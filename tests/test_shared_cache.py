"""Two processes, one cache dir: no shard downloaded twice at once, no file deleted under the other
process's reader, no corruption.

- `shardstream download` beside a downloader + reader (tests/rel_shared_worker.py): every shard crosses
  the wire once (the per-shard fetch lock), both finish, every file identical to the source.
- Two downloaders + readers, each evicting what it consumed (retain=0, a budget): a slow reader in one
  process holds each shard for a while before it opens it, while the other process races ahead deleting
  what it has read. A reader's lease is a shared lock other processes see (cache.py), so the fast one
  never deletes a shard the slow one holds, and a shard the other process deleted while nobody held it
  is fetched again, not handed over as a dangling path.
The server measures the overlap of GET bodies per shard (rel_common.OverlapServer): never 2.
"""
import subprocess
import sys
from pathlib import Path

from rel_common import OverlapServer, check_final_files, make_shards, partial_files, tally, until
from shardstream.shards import shard_name

WORKER = Path(__file__).with_name("rel_shared_worker.py")
N = 13                  # 12 train shards + val 12
VAL = N - 1


def _worker(srv, data, out, *, total=VAL, hold=0.0, retain=0, budget=0):
    cmd = [sys.executable, str(WORKER), srv.url, str(N), str(data), str(out), str(total), str(hold), str(retain),
           str(budget)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_log(path, shas, total=VAL):
    rows = [line.split() for line in Path(path).read_text().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(total))
    for i, digest, n in rows:
        assert digest == shas[int(i)], f"shard {i}: a reader got bytes that are not the source's"
        assert int(n) == 32
    return len(rows)


def _lines(path):
    try:
        return Path(path).read_text().count("\n")
    except FileNotFoundError:
        return 0


def _finish(proc, what):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{err[-4000:]}"
    return out, err


def test_download_cli_beside_a_streaming_reader_fetches_each_shard_once(tmp_path):
    remote = tmp_path / "remote"
    shas = make_shards(remote, N, chars=200_000, seed=3)
    data = tmp_path / "data"
    with OverlapServer(remote, rate=1.5) as srv:       # slow enough that the two overlap shard by shard
        reader = _worker(srv, data, tmp_path / "reader.txt", retain=100)    # keeps everything: no deletes
        cli = subprocess.Popen([sys.executable, "-m", "shardstream", "download", "-n", str(VAL), "-w", "2",
                                "--source", srv.url, "--data-dir", str(data), "--dataset-shards", str(N)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _finish(cli, "shardstream download")
        _finish(reader, "the streaming reader")
        gets = {i: srv.stats(shard_name(i)).get_requests for i in range(N)}
        overlap = srv.max_overlap()
    assert gets == {i: 1 for i in range(N)}, f"some shard crossed the wire twice: {gets}"
    assert overlap == 1
    read = _read_log(tmp_path / "reader.txt", shas)
    assert partial_files(data) == []
    nbytes = check_final_files(data, shas)
    assert sorted(int(p.name[6:11]) for p in data.glob("shard_*.parquet")) == list(range(N))
    tally("shared_cache/cli-beside-reader", bytes_verified=nbytes, shards_read=read)


def test_two_downloaders_never_delete_a_shard_under_the_others_reader(tmp_path):
    remote = tmp_path / "remote"
    shas = make_shards(remote, N, chars=100_000, seed=4)
    size = max((remote / shard_name(i)).stat().st_size for i in range(N))
    data = tmp_path / "data"
    with OverlapServer(remote, rate=4.0) as srv:
        # The slow one holds every shard 0.3 s before opening it. The fast one starts once the slow one is
        # two shards in, reads at once and deletes what it has read: it catches up and overtakes, passing
        # over the shard the slow one holds and the ones in the slow one's window.
        slow = _worker(srv, data, tmp_path / "slow.txt", hold=0.3, budget=5 * size)
        until(lambda: _lines(tmp_path / "slow.txt") >= 2 or slow.poll() is not None, 60, "the slow reader")
        fast = _worker(srv, data, tmp_path / "fast.txt", hold=0.0, budget=5 * size)
        _, fast_err = _finish(fast, "the fast reader")
        _, slow_err = _finish(slow, "the slow reader")
        overlap = srv.max_overlap()
        gets = sum(srv.stats(shard_name(i)).get_requests for i in range(N))
    read = _read_log(tmp_path / "slow.txt", shas) + _read_log(tmp_path / "fast.txt", shas)
    assert overlap == 1, "a shard was downloaded twice at the same time"
    assert gets >= N                          # each shard at least once (re-fetches after a delete are fine)
    assert partial_files(data) == []
    nbytes = check_final_files(data, shas)
    tally("shared_cache/two-downloaders", bytes_verified=nbytes, shards_read=read)


HOLDER = """
import sys, time, filelock
from shardstream import layout
from shardstream.cache import ShardCache
c = ShardCache(sys.argv[1])
c.files, c.partials = c.scan()
assert c.lease(1, "other") is True                                      # a reader holds shard 1
lock = filelock.FileLock(str(layout.lock_path(sys.argv[1], 2)))        # a fetch of shard 2 is running
lock.acquire()
print("holding", flush=True)
sys.stdin.readline()
"""


def test_cache_keeps_what_another_process_holds_and_notices_what_it_deleted(tmp_path):
    from shardstream.cache import ShardCache
    (tmp_path / shard_name(1)).write_bytes(b"x" * 100)
    (tmp_path / (shard_name(2) + ".123-ab.partial")).write_bytes(b"y" * 50)
    (tmp_path / shard_name(3)).write_bytes(b"z" * 10)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        c = ShardCache(tmp_path)
        c.files, c.partials = c.scan()
        assert c.delete(1) is None and (tmp_path / shard_name(1)).exists() and 1 in c.files
        assert c.delete(2) == 0 and (tmp_path / (shard_name(2) + ".123-ab.partial")).exists()
        assert c.delete(3) == 10 and not (tmp_path / shard_name(3)).exists()
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert c.delete(1) == 100 and not (tmp_path / shard_name(1)).exists()     # its reader is gone now
    assert c.delete(2) == 50 and not list(tmp_path.glob("*.partial"))
    other = ShardCache(tmp_path)                # a process that still believes shard 3 is there
    other.files = {3: 10}
    assert other.lease(3, 0) is False and not other.leases
