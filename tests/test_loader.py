"""The loader: nanochat's contract, packing equal to the naive algorithm, DDP coverage, epochs, exact resume."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shardstream.errors import ConfigError, StateMismatchError
from shardstream.loader import (ShardPlan, get_dist_info, iter_doc_batches, tokenizing_distributed_data_loader_bos_bestfit,
                                tokenizing_distributed_data_loader_with_state,
                                tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn)
from shardstream.tokenizer import train_tokenizer, train_tokenizer_from_shards

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much "
         "your way well down should because each just those people how too little state good very make world "
         "river harbor morning quietly garden letter 1987 42, . ; ! ?").split()

# 4 train shards + 1 val shard; row groups of 24 docs, the last one shorter; shard 2 has a single row group
# (so rank 1 of 2 reads nothing from it), to exercise strides and shard skipping
SHARD_ROW_GROUPS = [4, 3, 1, 4, 2]
RG_ROWS = 24
KW = dict(B=4, T=64, tokenizer_batch_size=10, buffer_size=40, device="cpu")


def _write_shards(directory, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for s, n_rg in enumerate(SHARD_ROW_GROUPS):
        n_docs = RG_ROWS * n_rg - 7
        docs = [f"[{s}.{d}] " + " ".join(rng.choice(WORDS, max(1, int(rng.lognormal(3.2, 0.9)))))
                for d in range(n_docs)]
        pq.write_table(pa.table({"text": docs}), directory / f"shard_{s:05d}.parquet", row_group_size=RG_ROWS)
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def tok(data_dir):
    return train_tokenizer_from_shards([data_dir / "shard_00000.parquet"], vocab_size=512)


def train_paths(data_dir):
    return [data_dir / f"shard_{s:05d}.parquet" for s in range(len(SHARD_ROW_GROUPS) - 1)]


def batch_hash(x, y):
    return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]


def take(gen, n):
    out = []
    for _ in range(n):
        x, y, state = next(gen)
        out.append((batch_hash(x, y), json.dumps(state, sort_keys=True)))
    gen.close()
    return out


# --- a straightforward reference: nanochat's document stream and list-scan best-fit packing ------------

def reference_docs(paths, rank, world, batch_size, start_pq=0, start_rg=None):
    first = True
    while True:
        for pq_idx in range(start_pq if first else 0, len(paths)):
            pf = pq.ParquetFile(paths[pq_idx])
            rg = start_rg if (first and pq_idx == start_pq and start_rg is not None) else rank
            while rg < pf.num_row_groups:
                texts = pf.read_row_group(rg).column("text").to_pylist()
                for i in range(0, len(texts), batch_size):
                    yield texts[i:i + batch_size]
                rg += world
        first = False


def reference_rows(tok, doc_batches, B, T, buffer_size, n_batches):
    bos = tok.get_bos_token_id()
    buf, batches = [], []
    for _ in range(n_batches):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buf) < buffer_size:
                    buf.extend(tok.encode(next(doc_batches), prepend=bos, num_threads=2))
                rem = T + 1 - len(row)
                best, best_len = -1, 0
                for i, doc in enumerate(buf):
                    if best_len < len(doc) <= rem:
                        best, best_len = i, len(doc)
                if best >= 0:
                    row.extend(buf.pop(best))
                else:
                    shortest = min(range(len(buf)), key=lambda i: len(buf[i]))
                    row.extend(buf.pop(shortest)[:rem])
            rows.append(row)
        batches.append(np.array(rows, dtype=np.int64))
    return batches


# --- contract ----------------------------------------------------------------------------------------

def test_contract_shapes_bos_shift(tok, data_dir):
    bos = tok.get_bos_token_id()
    gen = loader_fn(tok, split="train", data_dir=data_dir, **KW)
    for _ in range(30):
        x, y, state = next(gen)
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert {"pq_idx", "rg_idx", "epoch", "version", "fingerprint"} <= set(state)
        json.dumps(state)
    gen.close()
    # the pair-yielding name and the seed's name are the same loader
    x2, y2 = next(tokenizing_distributed_data_loader_bos_bestfit(tok, split="train", data_dir=data_dir, **KW))
    x3, y3, _ = next(tokenizing_distributed_data_loader_with_state(tok, split="train", data_dir=data_dir, **KW))
    x1, y1, _ = next(loader_fn(tok, split="train", data_dir=data_dir, **KW))
    assert torch.equal(x1, x2) and torch.equal(x1, x3) and torch.equal(y1, y2)


@pytest.mark.parametrize("rank,world,buffer_size,tbs", [(0, 1, 40, 10), (1, 2, 40, 10), (0, 1, 1, 7),
                                                         (2, 3, 25, 24)])
def test_packing_equals_reference(tok, data_dir, rank, world, buffer_size, tbs):
    n = 60
    kw = dict(KW, buffer_size=buffer_size, tokenizer_batch_size=tbs)
    gen = loader_fn(tok, split="train", data_dir=data_dir, ddp_rank=rank, ddp_world_size=world, **kw)
    ref = reference_rows(tok, reference_docs(train_paths(data_dir), rank, world, tbs), 4, 64, buffer_size, n)
    for k in range(n):
        x, y, _ = next(gen)
        assert np.array_equal(x.numpy(), ref[k][:, :-1]), f"batch {k} differs from the reference"
        assert np.array_equal(y.numpy(), ref[k][:, 1:])
    gen.close()


def test_val_split_reads_the_last_shard(tok, data_dir):
    assert ShardPlan("val", data_dir=data_dir).shard_ids == [4]
    assert ShardPlan("train", data_dir=data_dir).shard_ids == [0, 1, 2, 3]
    gen = loader_fn(tok, split="val", data_dir=data_dir, **KW)
    ref = reference_rows(tok, reference_docs([data_dir / "shard_00004.parquet"], 0, 1, 10), 4, 64, 40, 20)
    for k in range(20):
        x, _, state = next(gen)
        assert np.array_equal(x.numpy(), ref[k][:, :-1])
    assert state["pq_idx"] == 0 and state["epoch"] > 1          # the single val shard wraps into epochs
    with pytest.raises(ConfigError, match="split"):
        loader_fn(tok, split="test", data_dir=data_dir, **KW)


# --- DDP and epochs ----------------------------------------------------------------------------------

def _positions(data_dir, rank, world, epochs=2):
    """(epoch, pq_idx, rg_idx, row) of every document rank reads, over `epochs` epochs."""
    plan = ShardPlan("train", data_dir=data_dir)
    out = []
    for texts, pos, _ in iter_doc_batches(plan, (1, 0, rank, 0), rank, world, 10):
        (epoch, pq_idx, rg_idx, row), n = pos, len(texts)
        if epoch > epochs:
            break
        out += [(epoch, pq_idx, rg_idx, row + i) for i in range(n)]
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ddp_ranks_cover_each_row_group_once_per_epoch(data_dir, world):
    all_rows = {(pq_idx, rg, r) for pq_idx, n_rg in enumerate(SHARD_ROW_GROUPS[:-1]) for rg in range(n_rg)
                for r in range(RG_ROWS if rg < n_rg - 1 else RG_ROWS - 7)}
    per_rank = [_positions(data_dir, rank, world) for rank in range(world)]
    for epoch in (1, 2):
        seen = [(p, g, r) for rank_pos in per_rank for (e, p, g, r) in rank_pos if e == epoch]
        assert len(seen) == len(set(seen)) == len(all_rows)
        assert set(seen) == all_rows
        for rank, rank_pos in enumerate(per_rank):      # rank r reads row groups r, r+W, ...
            assert {g % world for (e, p, g, r) in rank_pos} <= {rank}
    # epoch 2 reads what epoch 1 read, in the same order
    ep = [[pos[1:] for pos in per_rank[0] if pos[0] == e] for e in (1, 2)]
    assert ep[0] == ep[1]


def test_rank_from_env_and_kwargs(tok, data_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert get_dist_info() == (1, 2)
    assert get_dist_info(0, 1) == (0, 1)
    x_env, _, s_env = next(loader_fn(tok, split="train", data_dir=data_dir, **KW))
    x_kw, _, s_kw = next(loader_fn(tok, split="train", data_dir=data_dir, ddp_rank=1, ddp_world_size=2, **KW))
    assert torch.equal(x_env, x_kw) and s_env["rank"] == 1 and s_env["fingerprint"]["world_size"] == 2
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert get_dist_info() == (0, 1)
    x0, _, _ = next(loader_fn(tok, split="train", data_dir=data_dir, **KW))
    assert not torch.equal(x0, x_env)
    with pytest.raises(ConfigError, match="rank"):
        get_dist_info(2, 2)


def test_epochs_count_up_and_repeat_the_data(tok, data_dir):
    epochs = [state["epoch"] for *_, state in _iter(tok, data_dir, 400)]
    assert epochs[0] == 1 and epochs == sorted(epochs) and epochs[-1] >= 3


def _iter(tok, data_dir, n, **kw):
    gen = loader_fn(tok, split="train", data_dir=data_dir, **dict(KW, **kw))
    for _ in range(n):
        yield next(gen)
    gen.close()


# --- exact resume ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_w1(tok, data_dir):
    return take(loader_fn(tok, split="train", data_dir=data_dir, **KW), 420)


def _resume(tok, data_dir, state_json, n=50, **kw):
    gen = loader_fn(tok, split="train", data_dir=data_dir, resume_state_dict=json.loads(state_json),
                    **dict(KW, **kw))
    return take(gen, n)


def _first_change(states, key, after=0):
    vals = [json.loads(s)[key] for _, s in states]
    return next(i for i in range(after + 1, len(vals)) if vals[i] != vals[i - 1])


def test_resume_points_are_exact(tok, data_dir, run_w1):
    states = [json.loads(s) for _, s in run_w1]
    mid_rg = next(k for k, s in enumerate(states) if s["replay"] > 0 and s["anchor"]["cursor"][3] > 0)
    shard_k = _first_change(run_w1, "pq_idx") - 3                 # batches straddle a shard boundary
    epoch_k = _first_change(run_w1, "epoch") - 3                  # ... and an epoch boundary
    epoch2_k = _first_change(run_w1, "epoch", after=epoch_k + 4) + 5  # inside epoch 3, anchor from epoch 2 docs
    points = {"first batch": 0, "mid row group": mid_rg, "shard boundary": shard_k,
              "epoch boundary": epoch_k, "later epoch": epoch2_k, "on an anchor": 32}
    assert states[epoch_k + 6]["epoch"] == states[epoch_k]["epoch"] + 1
    for name, k in points.items():
        assert k + 50 <= len(run_w1), name
        resumed = _resume(tok, data_dir, run_w1[k][1])
        assert resumed == run_w1[k:k + 50], f"resume at {name} (batch {k}) is not exact"
    assert len(run_w1[mid_rg][1]) < 64 * 1024


def test_resume_world_size_2(tok, data_dir):
    kw = dict(ddp_rank=1, ddp_world_size=2)
    run = take(loader_fn(tok, split="train", data_dir=data_dir, **KW, **kw), 130)
    for k in (0, 37, _first_change(run, "epoch") - 2):
        assert _resume(tok, data_dir, run[k][1], **kw) == run[k:k + 50]
    # rank 0's state handed to rank 1 (nanochat's protocol) resumes approximately, not from rank 0's buffer
    run0 = take(loader_fn(tok, split="train", data_dir=data_dir, **KW, ddp_rank=0, ddp_world_size=2), 40)
    approx = _resume(tok, data_dir, run0[37][1], n=5, **kw)
    assert [h for h, _ in approx] != [h for h, _ in run[37:42]]
    assert json.loads(approx[0][1])["rank"] == 1


def test_resume_in_a_fresh_process(tok, data_dir, run_w1, tmp_path):
    k = 45
    tok.save(tmp_path / "tok")
    (tmp_path / "state.json").write_text(run_w1[k][1])
    script = textwrap.dedent(f"""
        import hashlib, json, sys
        from shardstream.tokenizer import Tokenizer
        from shardstream.loader import tokenizing_distributed_data_loader_with_state_bos_bestfit as f
        tok = Tokenizer.load({str(tmp_path / 'tok')!r})
        state = json.load(open({str(tmp_path / 'state.json')!r}))
        gen = f(tok, 4, 64, "train", tokenizer_batch_size=10, buffer_size=40, device="cpu",
                resume_state_dict=state, data_dir={str(data_dir)!r})
        for _ in range(50):
            x, y, s = next(gen)
            print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [h for h, _ in run_w1[k:k + 50]]


def test_default_buffer_spanning_epochs_resumes_exactly_and_state_is_small(tok, data_dir):
    # buffer 1000 > the ~440 docs of an epoch: the buffer holds the same documents from several epochs
    kw = dict(buffer_size=1000, tokenizer_batch_size=128)
    run = take(loader_fn(tok, split="train", data_dir=data_dir, **dict(KW, **kw)), 60)
    state = json.loads(run[37][1])
    assert len({d[0] for d in state["anchor"]["docs"]}) >= 2         # docs of two epochs buffered
    assert len(run[37][1]) < 64 * 1024
    assert _resume(tok, data_dir, run[37][1], n=23, **kw) == run[37:]


def test_close_stops_the_background_thread(tok, data_dir):
    import threading
    gen = loader_fn(tok, split="train", data_dir=data_dir, **KW)
    next(gen)
    assert any(t.name == "shardstream-loader" for t in threading.enumerate())
    gen.close()

    def ours():     # the reader and its tokenize calls (the tokenizer's own encode pool is the tokenizer's)
        return [t.name for t in threading.enumerate()
                if t.name == "shardstream-loader" or t.name.startswith("shardstream-tokenize")]
    deadline = time.monotonic() + 3
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ours() == []


def test_state_mismatch_names_the_field(tok, data_dir, run_w1):
    state = json.loads(run_w1[20][1])
    for change, field in [(dict(B=8), "B"), (dict(T=32), "T"), (dict(buffer_size=41), "buffer_size"),
                          (dict(tokenizer_batch_size=11), "tokenizer_batch_size"),
                          (dict(ddp_rank=0, ddp_world_size=2), "world_size")]:
        with pytest.raises(StateMismatchError, match=field):
            loader_fn(tok, split="train", data_dir=data_dir, resume_state_dict=state, **dict(KW, **change))
    with pytest.raises(StateMismatchError, match="split"):
        loader_fn(tok, split="val", data_dir=data_dir, resume_state_dict=state, **KW)
    other_tok = train_tokenizer(["some other text entirely"] * 50, vocab_size=300)
    with pytest.raises(StateMismatchError, match="tokenizer"):
        loader_fn(other_tok, split="train", data_dir=data_dir, resume_state_dict=state, **KW)
    with pytest.raises(StateMismatchError, match="version"):
        loader_fn(tok, split="train", data_dir=data_dir, resume_state_dict=dict(state, version=99), **KW)
    fewer = _write_shards(data_dir.parent / "fewer")
    os.remove(fewer / "shard_00003.parquet")
    with pytest.raises(StateMismatchError, match="shards"):
        loader_fn(tok, split="train", data_dir=fewer, resume_state_dict=state, **KW)
    with pytest.raises(ConfigError, match="resume_state_dict must be a dict"):
        loader_fn(tok, split="train", data_dir=data_dir, resume_state_dict="nope", **KW)


def test_nanochat_state_resumes_like_nanochat(tok, data_dir):
    # {pq_idx: 1, rg_idx: 0}: nanochat continues at shard 1's next row-group stride (row group 1), empty buffer
    state = {"pq_idx": 1, "rg_idx": 0, "epoch": 1}
    gen = loader_fn(tok, split="train", data_dir=data_dir, resume_state_dict=state, **KW)
    ref = reference_rows(tok, reference_docs(train_paths(data_dir), 0, 1, 10, start_pq=1, start_rg=1),
                         4, 64, 40, 10)
    for k in range(10):
        x, _, s = next(gen)
        assert np.array_equal(x.numpy(), ref[k][:, :-1])
    gen.close()
    # past the last row group of a shard: nanochat moves to the next shard
    state = {"pq_idx": 2, "rg_idx": 0, "epoch": 1}
    x, _, s = next(loader_fn(tok, split="train", data_dir=data_dir, resume_state_dict=state, **KW))
    ref = reference_rows(tok, reference_docs(train_paths(data_dir), 0, 1, 10, start_pq=3), 4, 64, 40, 1)
    assert np.array_equal(x.numpy(), ref[0][:, :-1])
    assert s["epoch"] == 1


def test_bad_arguments(tok, data_dir, tmp_path):
    with pytest.raises(ConfigError, match="B must be"):
        loader_fn(tok, split="train", data_dir=data_dir, **dict(KW, B=0))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            loader_fn(tok, split="train", data_dir=data_dir, **dict(KW, device="cuda"))
    with pytest.raises(ConfigError, match="not a torch device"):
        loader_fn(tok, split="train", data_dir=data_dir, **dict(KW, device="gpu0"))
    with pytest.raises(ConfigError, match="does not exist"):
        loader_fn(tok, split="train", data_dir=tmp_path / "nowhere", **KW)
    (tmp_path / "one").mkdir()
    _write_shards(tmp_path / "one")
    for s in range(1, 5):
        os.remove(tmp_path / "one" / f"shard_{s:05d}.parquet")
    with pytest.raises(ConfigError, match="at least 2"):
        loader_fn(tok, split="train", data_dir=tmp_path / "one", **KW)
    # a rank that gets no row group at all (world larger than any shard's row groups)
    gen = loader_fn(tok, split="train", data_dir=data_dir, ddp_rank=7, ddp_world_size=8, **KW)
    with pytest.raises(ConfigError, match="no documents"):
        next(gen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tok, data_dir):
    cpu = _iter(tok, data_dir, 40)
    gpu = loader_fn(tok, split="train", data_dir=data_dir, **dict(KW, device="cuda"))
    for (xc, yc, sc), (xg, yg, sg) in zip(cpu, gpu):
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc) and sg == sc


# --- over a StreamingDownloader against the local server ----------------------------------------------

def _disk_bytes(directory):
    total = 0
    for entry in os.scandir(directory):
        if entry.name.startswith("shard_") and not entry.name.endswith((".lock", ".json")):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:       # deleted (evicted, renamed) since the listing
                pass
    return total


def test_loader_over_streaming_downloader(tok, data_dir, tmp_path, caplog):
    """A budget of ~2 shards, 3+ epochs of 4 train shards: same batches as the local dir, budget kept,
    evicted shards fetched again, exact resume from a state whose buffered docs live in evicted shards."""
    import logging
    from shardstream.downloader import StreamingDownloader
    from shardstream.server import ShardServer
    from shardstream.source import Source

    local = take(loader_fn(tok, split="train", data_dir=data_dir, **KW), 360)
    sizes = [(data_dir / f"shard_{i:05d}.parquet").stat().st_size for i in range(len(SHARD_ROW_GROUPS))]
    budget = sizes[-1] + int(2.3 * max(sizes[:-1]))          # the val shard + ~2 of the 4 train shards
    assert budget < sum(sizes)
    cache = tmp_path / "cache"
    peak = 0
    with ShardServer(data_dir) as srv:
        source = Source(srv.url, dataset_shards=len(SHARD_ROW_GROUPS))

        def downloader(d):
            return StreamingDownloader(source=source, data_dir=d, buffer_size=1, max_cache_bytes=budget,
                                       progress=False)

        with caplog.at_level(logging.INFO, logger="shardstream.loader"), downloader(cache) as dl:
            gen = loader_fn(tok, split="train", streaming_downloader=dl, **KW)
            streamed = []
            for _ in range(360):
                x, y, state = next(gen)
                streamed.append((batch_hash(x, y), json.dumps(state, sort_keys=True)))
                peak = max(peak, _disk_bytes(cache))
            gen.close()
        assert [h for h, _ in streamed] == [h for h, _ in local]
        assert peak <= budget
        assert json.loads(streamed[-1][1])["epoch"] >= 3
        reads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Reading shard_")]
        assert reads[:5] == [f"Reading shard_{i:05d}.parquet" for i in (0, 1, 2, 3, 0)]
        assert srv.stats("shard_00000.parquet").get_requests >= 2     # evicted, then fetched again

        # resume in a fresh cache dir at a point whose anchor holds docs of earlier, evicted shards
        k = next(k for k in range(300, 340) if len({d[1] for d in json.loads(streamed[k][1])["anchor"]["docs"]}) > 2)
        with downloader(tmp_path / "cache2") as dl2:
            gen = loader_fn(tok, split="train", streaming_downloader=dl2,
                            resume_state_dict=json.loads(streamed[k][1]), **KW)
            assert take(gen, 20) == streamed[k:k + 20]
