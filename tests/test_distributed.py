"""Many ranks, many nodes: real torchrun processes (gloo on CPU) against the local shard server.

Each test launches `python -m torch.distributed.run` with tests/dist_worker.py (or the trainer) and checks
what the ranks wrote and what the server counted. Tiny shards (4 row groups of 48 docs), a byte tokenizer.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardstream.layout import events_path
from shardstream.distributed import NodeInfo, node_info, node_shards
from shardstream.errors import ConfigError
from shardstream.sample import make_sample
from shardstream.server import ShardServer
from shardstream.shards import shard_name

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
SHARDS = 7                  # 6 train + 1 val
ROW_GROUPS = 4
DOCS_PER_RG = 48


@pytest.fixture(scope="module")
def dist_remote(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_remote")
    make_sample(d, SHARDS, 150_000, seed=5, docs_per_row_group=DOCS_PER_RG, row_groups=ROW_GROUPS)
    return d


@pytest.fixture
def srv(dist_remote):
    with ShardServer(dist_remote) as s:
        yield s


def doc_ids(directory, shard, row_groups=None):
    """sha1 prefixes (as the worker's tokenizer records them) of a shard's docs, per row group."""
    pf = pq.ParquetFile(Path(directory) / shard_name(shard))
    out = []
    for g in range(pf.num_row_groups) if row_groups is None else row_groups:
        texts = pf.read_row_group(g, columns=["text"]).column("text").to_pylist()
        out.append([hashlib.sha1(t.encode()).hexdigest()[:16] for t in texts])
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, *, nproc=2, nnodes=None, env=None, timeout=120):
    """Start torchrun (one node: --standalone; nnodes: (node_rank, n, endpoint))."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes is None:
        cmd += ["--standalone"]
    else:
        node_rank, n, endpoint = nnodes
        cmd += [f"--nnodes={n}", f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                "--rdzv_id=ss-test"]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), SHARDSTREAM_DIST_TIMEOUT="30",
             **(env or {}))
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=120):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def run_worker(tmp_path, name, cfg, *, nproc=2, expect_ok=True, timeout=120):
    cfg_path = tmp_path / f"{name}.json"
    cfg.setdefault("out", str(tmp_path / name))
    cfg_path.write_text(json.dumps(cfg))
    rc, out = finish(torchrun([WORKER, cfg_path], nproc=nproc), timeout)
    if expect_ok:
        assert rc == 0, out[-4000:]
    return rc, out, Path(cfg["out"])


def results(out_dir, n):
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(n)]


def downloads(data_dir):
    """Shards the downloader of data_dir started to download, in order (its events.jsonl), val shard left out."""
    events = [json.loads(line) for line in events_path(data_dir).read_text().splitlines()]
    return [e["shard"] for e in events if e.get("event") == "download_start" and e["shard"] != SHARDS - 1]


def first_epoch(starts):
    """The downloads before the first shard downloaded a second time, sorted."""
    out = []
    for s in starts:
        if s in out:
            break
        out.append(s)
    return sorted(out)


def all_docs(directory, shards):
    return {d for s in shards for g in doc_ids(directory, s) for d in g}


def base_cfg(srv, tmp_path, **kw):
    cfg = dict(url=srv.url, data_dir=str(tmp_path / "cache{node}"), total_shards=SHARDS - 1,
               dataset_shards=SHARDS, buffer_size=2, budget=None, B=8, T=512, batches="until_repeat")
    cfg.update(kw)
    return cfg


# -----------------------------------------------------------------------------------------------------
# pure parts

def test_node_info_from_torchrun_env():
    assert node_info({}) == NodeInfo()
    env = dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", GROUP_RANK="1")
    assert node_info(env) == NodeInfo(5, 8, 1, 4, 1, 2)
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        node_info(dict(env, LOCAL_RANK="x"))
    with pytest.raises(ConfigError, match="same number"):
        node_info(dict(env, WORLD_SIZE="7"))


def test_node_shards_split_the_plan():
    assert node_shards(7, 0, 2) == [0, 2, 4, 6] and node_shards(7, 1, 2) == [1, 3, 5]
    with pytest.raises(ConfigError, match="gets none"):
        node_shards(2, 2, 3)


# -----------------------------------------------------------------------------------------------------
# one node, two ranks

def test_two_ranks_read_every_row_group_once_one_download_slow_rank_safe(srv, dist_remote, tmp_path):
    """2 ranks on one node, a budget of ~3 shards, rank 1 sleeping 0.3 s before opening each shard it got:
    every document of the epoch is read by exactly one rank, each shard is downloaded once, and the slow
    rank never finds its shard deleted (the worker raises if it does)."""
    size = (Path(dist_remote) / shard_name(0)).stat().st_size
    cfg = base_cfg(srv, tmp_path, budget=int(size * 3.6), slow_rank=1, slow_seconds=0.3)
    _, _, out = run_worker(tmp_path, "epoch", cfg)
    r0, r1 = results(out, 2)
    seen0, seen1 = set(r0["docs"]), set(r1["docs"])
    assert not seen0 & seen1, "a document was read by both ranks"
    for s in range(SHARDS - 1):
        groups = doc_ids(dist_remote, s)
        assert set(groups[0]) | set(groups[2]) <= seen0        # rank 0: row groups 0, 2
        assert set(groups[1]) | set(groups[3]) <= seen1        # rank 1: row groups 1, 3
    everything = {d for s in range(SHARDS - 1) for g in doc_ids(dist_remote, s) for d in g}
    assert seen0 | seen1 == everything
    # the node's one downloader fetched each shard once in the epoch (a shard read again in epoch 2 was
    # evicted under the budget and is fetched again: that is the second epoch, not a second reader)
    starts = downloads(tmp_path / "cache0")
    assert first_epoch(starts) == list(range(SHARDS - 1))
    assert sum(srv.stats(shard_name(s)).get_requests for s in range(SHARDS - 1)) == len(starts)
    assert srv.stats(shard_name(SHARDS - 1)).get_requests == 1
    # both ranks saw the same (the leader's) downloader
    assert r0["status"]["pid"] == r1["status"]["pid"]


def test_partition_node_on_one_node_strides_row_groups_over_local_ranks(srv, dist_remote, tmp_path):
    """partition="node" with one node reads what "global" reads: each local rank its own row groups."""
    _, _, out = run_worker(tmp_path, "one_node", base_cfg(srv, tmp_path, partition="node"))
    r0, r1 = results(out, 2)
    seen0, seen1 = set(r0["docs"]), set(r1["docs"])
    assert not seen0 & seen1, "a document was read by both local ranks"
    assert seen0 | seen1 == all_docs(dist_remote, range(SHARDS - 1))


def test_a_killed_rank_ends_the_job(srv, tmp_path):
    """Rank 1 SIGKILLs itself at batch 3: torchrun ends the job (non-zero) well within the timeout."""
    cfg = base_cfg(srv, tmp_path, batches=100_000, die_rank=1, die_at=3)
    t0 = time.monotonic()
    rc, out, _ = run_worker(tmp_path, "kill", cfg, expect_ok=False, timeout=90)
    assert rc != 0
    assert time.monotonic() - t0 < 90
    assert "Signals.SIGKILL" in out or "SIGKILL" in out or "exitcode" in out, out[-2000:]


# -----------------------------------------------------------------------------------------------------
# resume: exact at the same world size from rank 0's state alone, elastic 2 -> 1

def consumed_before(directory, cursor, rank, world):
    """Docs an old rank had pulled from its stream before its cursor (epoch 1): its stride of row groups."""
    epoch, P, G, row = cursor
    assert epoch == 1
    out = set()
    for s in range(P + 1):
        groups = doc_ids(directory, s)
        for g in range(rank, len(groups), world):
            if (s, g) < (P, G):
                out |= set(groups[g])
            elif (s, g) == (P, G):
                out |= set(groups[g][:row])
    return out


def test_resume_exact_from_rank0_state_and_elastic_2_to_1(srv, dist_remote, tmp_path):
    save_at = 40
    cfg = base_cfg(srv, tmp_path, batches=save_at + 6, save_at=save_at)
    _, _, out_a = run_worker(tmp_path, "run_a", cfg)
    a = results(out_a, 2)
    state = json.loads((out_a / "state.json").read_text())
    ddp = state["ddp"]
    assert ddp["world_size"] == 2 and ddp["batch"] == save_at and ddp["exact"]
    assert [e["rank"] for e in ddp["ranks"]] == [0, 1]
    assert ddp["ranks"][1]["cursor"] == a[1]["cursors"][save_at]      # rank 1's own state for that batch

    # every rank gets rank 0's state (nanochat's protocol) and goes on bitwise where it was
    cfg_b = base_cfg(srv, tmp_path, batches=6, resume=str(out_a / "state.json"))
    _, _, out_b = run_worker(tmp_path, "run_b", cfg_b)
    b = results(out_b, 2)
    for r in range(2):
        assert b[r]["digests"] == a[r]["digests"][save_at:save_at + 6], f"rank {r} did not resume exactly"

    # elastic: one rank goes on with the interrupted epoch: no row group read twice or skipped
    cursors = [e["cursor"] for e in ddp["ranks"]]
    assert min(c[1] for c in cursors) >= 2, "interrupt later: the check below needs shards 0-1 done"
    cfg_c = base_cfg(srv, tmp_path, batches="until_epoch_2", resume=str(out_a / "state.json"))
    _, _, out_c = run_worker(tmp_path, "run_c", cfg_c, nproc=1)
    (c,) = results(out_c, 1)
    before = set().union(*(consumed_before(dist_remote, cursors[r], r, 2) for r in range(2)))
    late = all_docs(dist_remote, range(2, SHARDS - 1))          # epoch 2 prefetch never reaches shard 2
    leftover = [d for d in c["docs"] if d in late]
    assert len(leftover) == len(set(leftover)), "a document of the interrupted epoch was read twice"
    assert not set(leftover) & before, "the new rank read a row the old ranks had read"
    assert set(leftover) | before == all_docs(dist_remote, range(SHARDS - 1)), "a row group was skipped"


# -----------------------------------------------------------------------------------------------------
# two nodes on localhost

def run_two_nodes(tmp_path, name, cfg, timeout=150):
    cfg_path = tmp_path / f"{name}.json"
    cfg.setdefault("out", str(tmp_path / name))
    cfg_path.write_text(json.dumps(cfg))
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [torchrun([WORKER, cfg_path], nproc=1, nnodes=(n, 2, endpoint)) for n in range(2)]
    outs = [finish(p, timeout) for p in procs]
    for rc, out in outs:
        assert rc == 0, out[-4000:]
    return Path(cfg["out"])


def test_two_nodes_default_every_node_reads_every_shard(srv, dist_remote, tmp_path):
    out = run_two_nodes(tmp_path, "nodes_global", base_cfg(srv, tmp_path))
    r = results(out, 2)
    assert [x["node"] for x in r] == [0, 1]
    seen = [set(x["docs"]) for x in r]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == all_docs(dist_remote, range(SHARDS - 1))
    for n in range(2):          # each node-local cache downloaded the whole epoch
        assert first_epoch(downloads(tmp_path / f"cache{n}")) == list(range(SHARDS - 1))


def test_two_nodes_partition_node_splits_the_shards(srv, dist_remote, tmp_path):
    out = run_two_nodes(tmp_path, "nodes_node", base_cfg(srv, tmp_path, partition="node"))
    r = results(out, 2)
    for n in range(2):
        mine = list(range(n, SHARDS - 1, 2))
        assert set(r[n]["docs"]) == all_docs(dist_remote, mine)        # all row groups of its own shards
        assert set(downloads(tmp_path / f"cache{n}")) == set(mine)      # and never another node's shard
    for s in range(SHARDS - 1):
        assert srv.stats(shard_name(s)).get_requests >= 1


@pytest.mark.slow
def test_shared_cache_dir_scope_cluster_downloads_once(srv, dist_remote, tmp_path):
    """Two nodes, one cache dir (NFS-like), scope="cluster": one downloader for the job, one download each."""
    cfg = base_cfg(srv, tmp_path, data_dir=str(tmp_path / "shared"), scope="cluster")
    out = run_two_nodes(tmp_path, "nodes_shared", cfg)
    r = results(out, 2)
    assert set(r[0]["docs"]) | set(r[1]["docs"]) == all_docs(dist_remote, range(SHARDS - 1))
    starts = downloads(tmp_path / "shared")
    assert first_epoch(starts) == list(range(SHARDS - 1))
    assert sum(srv.stats(shard_name(s)).get_requests for s in range(SHARDS - 1)) == len(starts)
    assert srv.stats(shard_name(SHARDS - 1)).get_requests == 1
