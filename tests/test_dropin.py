"""Drop-in streaming for an unmodified nanochat: nanochat's loader names + SHARDSTREAM_* variables.

Real parts throughout: sample shards served by a local ShardServer, the loader called with nanochat's
arguments only, tests/nanochat_like.py (nanochat's training loop, no model) as real processes, torchrun
for the multi-process case. Shards: 9 (8 train + val) of ~180 KB, 1,200 documents each; the budget holds
about 4 of them.
"""
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanochat_like import ByteTokenizer, digest     # the same tokenizer the nanochat-like processes use
from shardstream import streaming_env
from shardstream.errors import ConfigError, ShardStreamError
from shardstream.loader import (tokenizing_distributed_data_loader_bos_bestfit,
                                tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn)
from shardstream.sample import make_sample
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.status import describe, read_events, read_status
from shardstream.streaming_env import StreamingSettings
from shardstream.units import parse_bytes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "nanochat_like.py"
SHARDS = 9
BUDGET = 800_000            # ~4.4 shards of ~180 KB; the data is ~1.6 MB
B, T = 16, 2048             # ~16 batches per shard with the byte tokenizer


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dropin_remote")
    make_sample(d, SHARDS, 600_000, seed=3, docs_per_row_group=600, row_groups=2)
    return d


@pytest.fixture
def srv(shards_dir):
    with ShardServer(shards_dir) as s:
        yield s


def stream_env(srv, data_dir, **extra):
    env = {"SHARDSTREAM_STREAMING": "1", "SHARDSTREAM_SOURCE": srv.url, "SHARDSTREAM_DATASET_SHARDS": str(SHARDS),
           "SHARDSTREAM_DATA_DIR": str(data_dir), "SHARDSTREAM_MAX_CACHE_BYTES": "800KB",
           "SHARDSTREAM_BUFFER_SIZE": "2", "SHARDSTREAM_MIN_FREE_BYTES": "0"}
    env.update(extra)
    return env


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SHARDSTREAM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            monkeypatch.delenv(k)
    yield monkeypatch
    streaming_env.shutdown()


def ours(threads):
    """Threads shardstream started (tqdm's global monitor thread, started by any tqdm bar, is tqdm's)."""
    return sorted(t.name for t in threads if t.name.startswith("shardstream"))


def wait_no_threads(timeout=10.0):
    deadline = time.monotonic() + timeout
    while ours(threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return ours(threading.enumerate())


def partials(d):
    return sorted(p.name for p in Path(d).iterdir() if ".partial" in p.name)


def max_on_disk(d):
    return max(e["bytes_on_disk"] for e in read_events(d) if "bytes_on_disk" in e)


# --- settings from the environment -------------------------------------------------------------------

def test_settings_defaults_and_forms(tmp_path):
    s = StreamingSettings.from_env({"SHARDSTREAM_DATA_DIR": str(tmp_path)})
    assert (s.buffer_size, s.total_shards, s.max_cache_bytes, s.partition, s.scope, s.adaptive) == \
        (5, -1, None, "global", "node", False)
    assert s.data_dir == str(tmp_path)
    assert [parse_bytes(x) for x in ("20GB", "500MB", "1.5GiB", "2000000", "20 gb")] == \
        [20 * 10**9, 500 * 10**6, int(1.5 * 2**30), 2_000_000, 20 * 10**9]
    s = StreamingSettings.from_env({"SHARDSTREAM_MAX_CACHE_BYTES": "500MB", "SHARDSTREAM_BUFFER_SIZE": "auto",
                                    "SHARDSTREAM_TOTAL_SHARDS": "all", "SHARDSTREAM_PARTITION": "Node",
                                    "SHARDSTREAM_STATUS_EVERY": "off", "SHARDSTREAM_DATASET": "fineweb-edu",
                                    "NANOCHAT_BASE_DIR": "/x"})
    assert (s.max_cache_bytes, s.adaptive, s.total_shards, s.partition, s.status_every, s.dataset) == \
        (500_000_000, True, -1, "node", None, "fineweb-edu")
    assert s.data_dir.endswith("base_data")       # nanochat's dir name for fineweb-edu


@pytest.mark.parametrize("name,value", [
    ("SHARDSTREAM_MAX_CACHE_BYTES", "20XB"), ("SHARDSTREAM_MAX_CACHE_BYTES", "-5GB"),
    ("SHARDSTREAM_BUFFER_SIZE", "0"), ("SHARDSTREAM_BUFFER_SIZE", "five"),
    ("SHARDSTREAM_TOTAL_SHARDS", "0"), ("SHARDSTREAM_DATASET_SHARDS", "1"), ("SHARDSTREAM_DATASET", "climb"),
    ("SHARDSTREAM_PARTITION", "rack"), ("SHARDSTREAM_SCOPE", "world"), ("SHARDSTREAM_WORKERS", "0"),
    ("SHARDSTREAM_FAILURE_POLICY", "retry"), ("SHARDSTREAM_RETAIN", "-1"), ("SHARDSTREAM_STATUS_EVERY", "soon"),
    ("SHARDSTREAM_MIN_FREE_BYTES", "lots"), ("SHARDSTREAM_VERIFY", "pages"), ("SHARDSTREAM_REQUIRE_CHECKSUM", "2"),
])
def test_bad_value_names_the_variable(name, value):
    with pytest.raises(ConfigError) as e:
        StreamingSettings.from_env({name: value})
    assert f"{name}={value!r}" in str(e.value)


def test_unknown_variable_warns_with_the_closest_name(caplog):
    StreamingSettings.from_env({"SHARDSTREAM_BUFER_SIZE": "3"})
    assert "did you mean SHARDSTREAM_BUFFER_SIZE?" in caplog.text


def test_every_bad_variable_reported_at_once():
    with pytest.raises(ConfigError) as e:
        StreamingSettings.from_env({"SHARDSTREAM_BUFFER_SIZE": "x", "SHARDSTREAM_MAX_CACHE_BYTES": "y"})
    assert "SHARDSTREAM_BUFFER_SIZE" in str(e.value) and "SHARDSTREAM_MAX_CACHE_BYTES" in str(e.value)


def test_loader_call_fails_clearly_before_any_download(clean_env, tmp_path, srv):
    tok = ByteTokenizer()
    for k, v in stream_env(srv, tmp_path / "c").items():
        clean_env.setenv(k, v)
    clean_env.setenv("SHARDSTREAM_STREAMING", "maybe")
    with pytest.raises(ConfigError, match="SHARDSTREAM_STREAMING='maybe'"):
        loader_fn(tok, B, T, "train", device="cpu")
    clean_env.setenv("SHARDSTREAM_STREAMING", "1")
    clean_env.setenv("SHARDSTREAM_MAX_CACHE_BYTES", "20XB")
    with pytest.raises(ConfigError, match="SHARDSTREAM_MAX_CACHE_BYTES='20XB'"):
        loader_fn(tok, B, T, "train", device="cpu")
    clean_env.setenv("SHARDSTREAM_MAX_CACHE_BYTES", "800KB")
    clean_env.setenv("SHARDSTREAM_TOTAL_SHARDS", "12")
    with pytest.raises(ConfigError, match="SHARDSTREAM_TOTAL_SHARDS=12.*8 train shards"):
        loader_fn(tok, B, T, "train", device="cpu")
    clean_env.setenv("SHARDSTREAM_TOTAL_SHARDS", str(SHARDS))   # "all shards", the val shard counted in
    with pytest.raises(ConfigError, match="SHARDSTREAM_TOTAL_SHARDS=9.*8 train shards .9 is its count with the "
                                          "val shard, but the variable counts train shards only"):
        loader_fn(tok, B, T, "train", device="cpu")
    clean_env.delenv("SHARDSTREAM_TOTAL_SHARDS")
    clean_env.delenv("SHARDSTREAM_DATASET_SHARDS")          # a plain http source of unknown size
    with pytest.raises(ConfigError, match="SHARDSTREAM_SOURCE=.*cannot be listed.*SHARDSTREAM_DATASET_SHARDS=T"):
        loader_fn(tok, B, T, "train", device="cpu")
    clean_env.setenv("SHARDSTREAM_DATASET_SHARDS", str(SHARDS))
    for name, value in (("SHARDSTREAM_VERIFY", "pages"), ("SHARDSTREAM_REQUIRE_CHECKSUM", "maybe")):
        clean_env.setenv(name, value)
        with pytest.raises(ConfigError, match=f"{name}='{value}'"):
            loader_fn(tok, B, T, "train", device="cpu")
        clean_env.delenv(name)
    clean_env.setenv("SHARDSTREAM_SOURCE", "ftp://example.com/x")
    with pytest.raises(ConfigError, match="SHARDSTREAM_SOURCE='ftp://example.com/x'"):
        loader_fn(tok, B, T, "train", device="cpu")
    assert not srv.requests                   # nothing was asked of the server
    clean_env.setenv("SHARDSTREAM_SOURCE", srv.url)
    clean_env.setenv("SHARDSTREAM_MAX_CACHE_BYTES", "300KB")    # less than the val shard + two train shards
    with pytest.raises(ConfigError, match="cannot hold.*set through SHARDSTREAM_MAX_CACHE_BYTES"):
        loader_fn(tok, B, T, "train", device="cpu")
    assert not [r for r in srv.requests if r.method == "GET" and r.path.endswith(".parquet")]   # no shard fetched
    assert not streaming_env._live and wait_no_threads() == []


def test_streaming_off_or_explicit_data_dir_reads_local(clean_env, tmp_path, shards_dir, srv):
    """Off by default; with SHARDSTREAM_STREAMING=1 an explicit data_dir= still reads that dir."""
    tok = ByteTokenizer()
    for k, v in stream_env(srv, tmp_path / "c").items():
        clean_env.setenv(k, v)
    clean_env.setenv("SHARDSTREAM_STREAMING", "0")
    clean_env.setenv("SHARDSTREAM_DATA_DIR", str(shards_dir))
    g = loader_fn(tok, B, T, "train", device="cpu")
    x, _, st = next(g)
    g.close()
    clean_env.setenv("SHARDSTREAM_STREAMING", "1")
    g = loader_fn(tok, B, T, "train", device="cpu", data_dir=shards_dir)
    x2, _, st2 = next(g)
    g.close()
    assert st["fingerprint"]["source"] == st2["fingerprint"]["source"] == "local"
    assert (x == x2).all()
    assert not srv.requests and not (tmp_path / "c").exists()


# --- in one process: shared by train and val, budget, clean stop -----------------------------------

def test_train_and_val_share_one_downloader_and_stop_clean(clean_env, tmp_path, srv):
    data = tmp_path / "cache"
    for k, v in stream_env(srv, data).items():
        clean_env.setenv(k, v)
    before = ours(threading.enumerate())
    assert before == []
    tok = ByteTokenizer()
    train = loader_fn(tok, B, T, "train", device="cpu")
    x, y, state = next(train)
    assert x.shape == (B, T) and state["fingerprint"]["source"] == srv.url
    for step in range(40):
        if step % 10 == 0:                      # nanochat's evaluation: a fresh val loader, dropped after
            val = tokenizing_distributed_data_loader_bos_bestfit(tok, B, T, "val", device="cpu")
            next(val), next(val)
            assert len(streaming_env._live) == 1
            assert next(iter(streaming_env._live.values())).users == 2
            del val
            assert next(iter(streaming_env._live.values())).users == 1    # released when dropped
        x, y, state = next(train)
    assert state["pq_idx"] >= 2                 # it moved through several shards
    ev = read_events(data)
    assert [e["event"] for e in ev].count("start") == 1     # one downloader for train and every val loader
    downloaded = {e["shard"] for e in ev if e["event"] == "downloaded"}
    assert SHARDS - 1 in downloaded and {0, 1, 2} <= downloaded
    assert max_on_disk(data) <= BUDGET
    assert ours(threading.enumerate())          # running
    train.close()
    assert not streaming_env._live
    assert wait_no_threads() == []
    assert partials(data) == []
    assert read_status(data).state == "stopped"


def test_unstarted_generator_dropped_or_closed_releases(clean_env, tmp_path, srv):
    for k, v in stream_env(srv, tmp_path / "cache").items():
        clean_env.setenv(k, v)
    tok = ByteTokenizer()
    g = loader_fn(tok, B, T, "train", device="cpu")     # the downloader starts at call time
    assert len(streaming_env._live) == 1
    del g
    gc.collect()
    assert not streaming_env._live
    assert wait_no_threads() == []
    g = tokenizing_distributed_data_loader_bos_bestfit(tok, B, T, "val", device="cpu")
    next(g)
    g.close()
    assert not streaming_env._live and wait_no_threads() == []


def test_last_loader_dropped_in_one_of_our_threads(clean_env, tmp_path, srv, caplog):
    """The last reference can go in a thread of ours (a GC pass there): the stop is handed to another thread,
    since a thread cannot join itself."""
    for k, v in stream_env(srv, tmp_path / "cache").items():
        clean_env.setenv(k, v)
    caplog.set_level("INFO", logger="shardstream.streaming_env")
    g = loader_fn(ByteTokenizer(), B, T, "train", device="cpu")
    next(g)
    holder = [g]
    del g
    t = threading.Thread(target=holder.clear, name="shardstream-test-drop")
    t.start()
    t.join()
    assert wait_no_threads() == []
    assert not streaming_env._live and read_status(tmp_path / "cache").state == "stopped"
    stops = [r.threadName for r in caplog.records if r.getMessage().startswith("[Streaming] stopped")]
    assert stops == ["shardstream-env-stop"]


def test_integrity_variables_reach_the_fetches(clean_env, tmp_path, srv):
    """SHARDSTREAM_REQUIRE_CHECKSUM=1 refuses a source without checksums before training starts;
    SHARDSTREAM_VERIFY=decode decodes every page, as the event log's "checked" says."""
    from shardstream.errors import PermanentFetchError
    for k, v in stream_env(srv, tmp_path / "plain", SHARDSTREAM_REQUIRE_CHECKSUM="1").items():
        clean_env.setenv(k, v)
    assert StreamingSettings.from_env().require_checksum is True
    with pytest.raises(PermanentFetchError, match="checksum"):
        loader_fn(ByteTokenizer(), B, T, "train", device="cpu")
    assert not list((tmp_path / "plain").glob("shard_*.parquet"))
    assert not streaming_env._live and wait_no_threads() == []
    # the Hub's URL form gives a sha256 per shard: required and present, and every page decoded
    for k, v in stream_env(srv, tmp_path / "hub", SHARDSTREAM_SOURCE=srv.hub_url, SHARDSTREAM_REQUIRE_CHECKSUM="yes",
                           SHARDSTREAM_VERIFY="decode").items():
        clean_env.setenv(k, v)
    g = loader_fn(ByteTokenizer(), B, T, "train", device="cpu")
    next(g)
    g.close()
    checked = {e["checked"] for e in read_events(tmp_path / "hub") if e["event"] == "downloaded"}
    assert checked == {"sha256+decode"}


def test_settings_change_while_open_is_refused(clean_env, tmp_path, srv):
    for k, v in stream_env(srv, tmp_path / "cache").items():
        clean_env.setenv(k, v)
    tok = ByteTokenizer()
    g = loader_fn(tok, B, T, "train", device="cpu")
    clean_env.setenv("SHARDSTREAM_BUFFER_SIZE", "3")
    with pytest.raises(ConfigError, match="buffer_size"):
        loader_fn(tok, B, T, "val", device="cpu")
    assert next(iter(streaming_env._live.values())).users == 1
    g.close()
    assert not streaming_env._live


def test_status_lines_are_logged(clean_env, tmp_path, srv, caplog):
    for k, v in stream_env(srv, tmp_path / "cache").items():
        clean_env.setenv(k, v)
    caplog.set_level("INFO", logger="shardstream.streaming_env")
    g = loader_fn(ByteTokenizer(), B, T, "train", device="cpu")
    for _ in range(40):
        next(g)
    g.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "shardstream.streaming_env"]
    assert any("shardstream status" in s for s in lines)
    status = [s for s in lines if "shards downloaded" in s]
    assert len(status) >= 3 and all(s.startswith("[Streaming]") for s in status)
    # one line as training moves on to a new shard, naming it and the loader's read-ahead, and the data wait
    assert "training: shard_00000, loader: shard_" in status[0]
    assert "training: shard_00002, loader: shard_" in " ".join(status)
    assert all(re.search(r"data wait [0-9.]+s \(\d+ waits?", s) for s in status)
    assert lines[-1].startswith("[Streaming] stopped") and "data wait" in lines[-1]
    # the shard in training is in the event log, so `shardstream status` shows it too
    trained = [e["shard"] for e in read_events(tmp_path / "cache") if e["event"] == "training_shard"]
    assert trained[:3] == [0, 1, 2]
    text, _ = describe(tmp_path / "cache")
    assert f"training on {shard_name(trained[-1])}" in text, text


# --- any parquet corpus: SHARDSTREAM_FILES, _VAL_FILES, _MANIFEST, _TEXT_COLUMN ----------------------

def write_corpus(d, column="content"):
    """A corpus that is not nanochat's: nested folders, other names, the documents in `column`, a file
    outside the globs; returns the train paths in manifest order (sorted) and the val path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from shardstream.sample import make_documents
    paths = ["train/a/part-1.parquet", "train/a/part-0.parquet", "train/b/x.parquet", "val/v.parquet",
             "other/skip.parquet"]
    for k, rel in enumerate(paths):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        docs = make_documents(60, 60_000, seed=[7, k])
        pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), d / rel, row_group_size=20)
    return sorted(paths[:3]), paths[3]


def test_file_variables_parse_and_reach_the_source(tmp_path):
    s = StreamingSettings.from_env({"SHARDSTREAM_FILES": "train/**/*.parquet; extra/*.parquet\n",
                                    "SHARDSTREAM_VAL_FILES": "none", "SHARDSTREAM_TEXT_COLUMN": "content",
                                    "SHARDSTREAM_DATA_DIR": str(tmp_path)})
    assert (s.files, s.val_files, s.text_column, s.manifest) == \
        (("train/**/*.parquet", "extra/*.parquet"), "none", "content", None)
    assert s.downloader_kwargs("train")["text_column"] == "content"
    assert "files train/**/*.parquet;extra/*.parquet; val files none; text column content" in s.describe()
    d = tmp_path / "corpus"
    write_corpus(d)
    s = StreamingSettings.from_env({"SHARDSTREAM_SOURCE": str(d), "SHARDSTREAM_FILES": "train/**/*.parquet",
                                    "SHARDSTREAM_VAL_FILES": "nothing/*.parquet"})
    with pytest.raises(ConfigError, match="SHARDSTREAM_FILES='train/.*SHARDSTREAM_VAL_FILES='nothing.*matches none"):
        s.make_source()
    (tmp_path / "files.txt").write_text("# two files, val last\ntrain/b/x.parquet\nval/v.parquet\n")
    s = StreamingSettings.from_env({"SHARDSTREAM_SOURCE": str(d), "SHARDSTREAM_MANIFEST": str(tmp_path / "files.txt")})
    src = s.make_source()
    assert [e.path for e in src.manifest.train] == ["train/b/x.parquet"] and src.path(src.val_shard) == "val/v.parquet"


def test_another_corpus_streams_bitwise_in_manifest_order(clean_env, tmp_path):
    """SHARDSTREAM_FILES / _VAL_FILES / _TEXT_COLUMN over a local folder: the same batches as the files copied
    by hand, in manifest order, into a nanochat-layout dir; val reads the val file; a wrong column is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "corpus"
    train, val = write_corpus(d)
    by_hand = tmp_path / "by-hand"          # the loader's local mode reads `text`: the same docs renamed
    by_hand.mkdir()
    for i, rel in enumerate(train + [val]):
        t = pq.read_table(d / rel)
        pq.write_table(pa.table({"text": t.column("content")}), by_hand / shard_name(i), row_group_size=20)
    tok = ByteTokenizer()
    expect = {split: [digest(x, y) for x, y, _ in _take(loader_fn(tok, 4, 64, split, device="cpu",
                                                                   data_dir=by_hand), 40)]
              for split in ("train", "val")}
    env = {"SHARDSTREAM_STREAMING": "1", "SHARDSTREAM_SOURCE": str(d), "SHARDSTREAM_FILES": "train/**/*.parquet",
           "SHARDSTREAM_VAL_FILES": "val/*.parquet", "SHARDSTREAM_TEXT_COLUMN": "content",
           "SHARDSTREAM_DATA_DIR": str(tmp_path / "cache"), "SHARDSTREAM_MIN_FREE_BYTES": "0",
           "SHARDSTREAM_BUFFER_SIZE": "1"}
    for k, v in env.items():
        clean_env.setenv(k, v)
    for split in ("train", "val"):
        got = [digest(x, y) for x, y, _ in _take(loader_fn(tok, 4, 64, split, device="cpu"), 40)]
        assert got == expect[split], split
    assert not streaming_env._live
    cached = {p.name for p in (tmp_path / "cache").iterdir() if p.is_file()}
    assert cached and not any(n.startswith("shard_") for n in cached)          # cache names
    # no val files: the val loader says so; a column that is not there is named with the ones that are
    clean_env.setenv("SHARDSTREAM_VAL_FILES", "none")
    with pytest.raises(ConfigError, match="val"):
        next(loader_fn(tok, 4, 64, "val", device="cpu"))
    streaming_env.shutdown()
    clean_env.setenv("SHARDSTREAM_TEXT_COLUMN", "body")
    clean_env.setenv("SHARDSTREAM_DATA_DIR", str(tmp_path / "cache2"))
    with pytest.raises(ShardStreamError, match="body.*content"):
        next(loader_fn(tok, 4, 64, "train", device="cpu"))


def _take(gen, n):
    try:
        return [next(gen) for _ in range(n)]
    finally:
        gen.close()


# --- nanochat's loop in real processes: budget, exact resume in a fresh process, atexit ---------------

def run_script(env, *args, timeout=120):
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=e, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_nanochat_loop_resumes_bitwise_in_a_fresh_process(tmp_path, srv):
    common = ["--num-iterations", 60, "--eval-every", 20, "--eval-steps", 2, "--save-every", 20]
    # the reference: one uninterrupted run (its own cache dir)
    ref_dir = tmp_path / "ref"
    r = run_script(stream_env(srv, ref_dir), *common, "--checkpoint-dir", tmp_path / "ck_ref",
                   "--out", tmp_path / "ref.json")
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert sorted(map(int, ref["steps"])) == list(range(60)) and sorted(map(int, ref["val"])) == [0, 20, 40, 60]
    assert "[Streaming]" in r.stderr and "shards downloaded" in r.stderr       # what the user sees
    # the process ended without closing its loaders: atexit stopped the downloader and tidied up
    assert read_status(ref_dir).state == "stopped" and partials(ref_dir) == []
    assert max_on_disk(ref_dir) <= BUDGET

    # a preempted run: checkpoint at step 20, killed (os._exit, nothing cleaned up) before step 58
    data = tmp_path / "cache"
    ck = tmp_path / "ck"
    r = run_script(stream_env(srv, data), *common, "--checkpoint-dir", ck, "--out", tmp_path / "a.json",
                   "--crash-at-step", 58)
    assert r.returncode == 3, r.stderr[-3000:]
    a = json.loads((tmp_path / "a.json").read_text())
    assert {k: ref["steps"][k] for k in a["steps"]} == a["steps"]
    saved = json.loads((ck / "meta_000020.json").read_text())["dataloader_state_dict"]
    anchor_shard = saved["anchor"]["cursor"][1]       # train pq_idx == shard id
    assert not (data / shard_name(anchor_shard)).exists()     # evicted under the budget before the crash
    gets_before = srv.stats(shard_name(anchor_shard)).get_requests

    # nanochat's --resume-from-step 20 in a fresh process: the same batches as the uninterrupted run
    r = run_script(stream_env(srv, data), *common, "--checkpoint-dir", ck, "--out", tmp_path / "b.json",
                   "--resume-from-step", 20)
    assert r.returncode == 0, r.stderr[-3000:]
    b = json.loads((tmp_path / "b.json").read_text())
    assert sorted(map(int, b["steps"])) == list(range(20, 60))
    assert b["steps"] == {k: v for k, v in ref["steps"].items() if int(k) >= 20}
    assert b["val"] == {k: v for k, v in ref["val"].items() if int(k) >= 20}
    assert srv.stats(shard_name(anchor_shard)).get_requests > gets_before   # the evicted shard fetched again
    assert max_on_disk(data) <= BUDGET
    assert read_status(data).state == "stopped" and partials(data) == []    # the crash's partials too
    assert json.loads((ck / "meta_000060.json").read_text())["dataloader_state_dict"] == \
        json.loads((tmp_path / "ck_ref" / "meta_000060.json").read_text())["dataloader_state_dict"]


def test_nanochat_loop_closes_without_leftover_threads(tmp_path, srv):
    r = run_script(stream_env(srv, tmp_path / "cache"), "--num-iterations", 12, "--eval-every", 6,
                   "--checkpoint-dir", tmp_path / "ck", "--out", tmp_path / "out.json", "--close-at-end")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert ours(type("T", (), {"name": n}) for n in out["threads"]) == []
    assert partials(tmp_path / "cache") == []


def test_torchrun_one_downloader_per_node(tmp_path, srv):
    """Two ranks under torchrun, nanochat's loop unchanged: the node downloads each shard once."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SHARDSTREAM_DIST_TIMEOUT="30",
               **stream_env(srv, tmp_path / "cache", SHARDSTREAM_MAX_CACHE_BYTES="none"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(SCRIPT), "--num-iterations", 20, "--eval-every", 10,
           "--checkpoint-dir", tmp_path / "ck", "--out", tmp_path / "out.json"]
    r = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ev = read_events(tmp_path / "cache")
    assert [e["event"] for e in ev].count("start") == 1           # one downloader on the node
    fetched = [e["shard"] for e in ev if e["event"] == "downloaded"]
    assert set(fetched) == set(range(SHARDS))     # the loader's read-ahead reaches the next epoch: 0, 1 again
    for s in range(SHARDS):                       # every GET came from the node's one downloader
        assert srv.stats(shard_name(s)).get_requests == fetched.count(s), s
    outs = [json.loads((tmp_path / f"out.json.rank{r}").read_text()) for r in (0, 1)]
    assert [len(o["steps"]) for o in outs] == [20, 20]
    assert not set(outs[0]["steps"].values()) & set(outs[1]["steps"].values())    # each rank its row groups
