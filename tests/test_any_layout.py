"""Any parquet corpus (issue 15) through the downloader and the loader: the FineWeb-like tree served as
hf://datasets/ORG/NAME by the local Hub-like server, streamed with files=GLOB under a small budget. The
data dir holds cache names and .shardstream/ only, each index gets its own file's bytes, val_files GLOB
and "none", a renamed text column, a missing one, a restart adopting the cache-named files, and a changed
manifest that never adopts a file under the wrong index (nor deletes it)."""
import os
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rel_common import FILE_PICKS, isolate_hub_env
from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader
from shardstream.errors import ConfigError, PermanentFetchError
from shardstream.fetch import FetchPolicy
from shardstream.layout import BOOK_DIR
from shardstream.listing import make_source
from shardstream.loader import ShardPlan, iter_doc_batches
from shardstream.manifest import is_cache_name
from shardstream.sample import FINEWEB_FILES
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.status import read_events, read_status

REPO = "HuggingFaceFW/fineweb-like"
HF = f"hf://datasets/{REPO}"
SAMPLE = [p for p in FINEWEB_FILES if p.startswith("sample/10BT/")]
CRAWLS = [p for p in FINEWEB_FILES if p.startswith("data/")]
FAST = FetchPolicy(connect_timeout=2, stall_timeout=5, max_attempts=3, backoff_initial=0.01, backoff_max=0.05,
                   chunk_bytes=16384, fsync=False)
NO_FLOOR = DiskPolicy(warn_free_bytes=0, min_free_bytes=0)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    isolate_hub_env(monkeypatch, tmp_path, also=FILE_PICKS)


@pytest.fixture
def hub(tree, monkeypatch):
    with ShardServer(tree, hub_repo=REPO) as srv:
        srv.tree_page_size = 3
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        yield srv


def make(data_dir, source=HF, **kw):
    kw.setdefault("fetch_policy", FAST)
    kw.setdefault("disk_policy", NO_FLOOR)
    kw.setdefault("failure_policy", FailurePolicy("fail", deadline=30, retry_initial=0.02, retry_max=0.2))
    kw.setdefault("progress", False)
    kw.setdefault("status_interval", 0.05)
    return StreamingDownloader(source=source, data_dir=data_dir, **kw)


def top_names(d):
    return sorted(os.listdir(d))


def downloaded(d):
    return [e["shard"] for e in read_events(d) if e["event"] == "downloaded"]


def scan_event(d, n):
    """The n-th "scan" event (from 1), waiting for the status thread to write it."""
    deadline = time.monotonic() + 10
    while True:
        scans = [e for e in read_events(d) if e["event"] == "scan"]
        if len(scans) >= n or time.monotonic() > deadline:
            return scans[n - 1]
        time.sleep(0.02)


def texts_of(path, column="text"):
    return pq.read_table(path, columns=[column]).column(0).to_pylist()


# -----------------------------------------------------------------------------

def test_streams_a_fineweb_tree_under_a_budget_with_cache_names(hub, tree, tmp_path):
    sizes = [(tree / p).stat().st_size for p in SAMPLE]
    budget = sizes[3] + 2 * max(sizes[:3]) + 100            # the val file + two train files: no more
    d = tmp_path / "data"
    with make(d, files="sample/10BT/*.parquet", max_cache_bytes=budget, buffer_size=2) as dl:
        src = dl.source
        assert dl.val_shards == (3,) and dl.val_shard == 3 and dl.total_shards == 3 and dl.text_column == "text"
        for i in range(3):
            path = dl.wait_for_shard(i)
            assert path.name == src.file_name(i) and is_cache_name(path.name)
            assert path.read_bytes() == (tree / SAMPLE[i]).read_bytes()     # index i is file i, byte for byte
            assert dl.cache.used_bytes() <= budget
            dl.release(i)
        val = dl.wait_for_shard(3)
        assert val.read_bytes() == (tree / SAMPLE[3]).read_bytes()
        dl.release(3)
        st = dl.get_status()
        assert st.val_shards == (3,)
        assert st.shard_paths[str(3)] == f"{SAMPLE[3]} ({src.file_name(3)})"
        assert SAMPLE[3] in st.render()
    for name in top_names(d):                                # cache names and the bookkeeping only
        assert name == BOOK_DIR or is_cache_name(name), name
    assert not any(n.startswith("shard_") or "/" in n for n in top_names(d))
    assert all(not n.startswith("shard_") for n in os.listdir(d / BOOK_DIR))
    ev = [e for e in read_events(d) if e["event"] == "downloaded"]
    assert {e["path"] for e in ev} <= set(SAMPLE) and all(e["file"] == src.file_name(e["shard"]) for e in ev)
    assert read_status(d).shard_paths                       # status.json names the source paths too


def test_val_files_glob_reads_every_val_file_in_order(hub, tree, tmp_path):
    d = tmp_path / "data"
    with make(d, files="data/**/*.parquet", val_files="sample/10BT/000_0000[0-1].parquet") as dl:
        assert dl.val_shards == (3, 4) and dl.total_shards == 3
        assert [dl.source.path(i) for i in range(5)] == [*CRAWLS, *SAMPLE[:2]]
        plan = ShardPlan("val", dl)
        assert plan.shard_ids == [3, 4]
        seen = [t for texts, pos, _ in _one_epoch(plan) for t in texts]
        assert seen == texts_of(tree / SAMPLE[0]) + texts_of(tree / SAMPLE[1])
        assert set(dl.val_shards) <= set(dl.cache.files)    # both fetched early and kept


def _one_epoch(plan):
    it = iter_doc_batches(plan, (1, 0, 0, 0), 0, 1, 64)
    try:
        for texts, pos, nxt in it:
            yield texts, pos, nxt
            if nxt[0] != pos[0]:
                return
    finally:
        it.close()


def test_val_files_none_has_no_val_split(hub, tmp_path):
    with make(tmp_path / "data", files="sample/10BT/*.parquet", val_files="none") as dl:
        assert dl.val_shards == () and dl.val_shard is None and dl.total_shards == 4
        with pytest.raises(ConfigError, match=r"no val files \(--val-files none\)"):
            ShardPlan("val", dl)
        assert len(ShardPlan("train", dl)) == 4


def test_files_with_a_source_object_is_refused(hub, tmp_path):
    src = make_source(HF, files="sample/10BT/*.parquet")
    with pytest.raises(ConfigError, match="pass them to make_source"):
        make(tmp_path / "data", source=src, files="sample/10BT/*.parquet")


def write_renamed(directory, rel, docs):
    """A FineWeb-like file whose text is in `content` (and a `body` that is not a string)."""
    path = directory / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"content": pa.array(docs), "body": pa.array(list(range(len(docs)))),
                             "id": pa.array([f"id-{i}" for i in range(len(docs))])}), path, row_group_size=8)
    return path


def test_a_renamed_text_column(tmp_path):
    src_dir = tmp_path / "corpus"
    docs = {f"part/{k}.parquet": [f"document {k}-{i} " * 5 for i in range(20)] for k in range(3)}
    for rel, ds in docs.items():
        write_renamed(src_dir, rel, ds)
    with make(tmp_path / "data", source=str(src_dir), files="part/*.parquet", text_column="content") as dl:
        assert dl.text_column == "content"
        plan = ShardPlan("train", dl)
        seen = [t for texts, _, _ in _one_epoch(plan) for t in texts]
        assert seen == docs["part/0.parquet"] + docs["part/1.parquet"]
        with pytest.raises(ConfigError, match="the downloader reads column 'content'"):
            ShardPlan("train", dl, text_column="text")


def test_a_missing_text_column_names_the_columns(tmp_path):
    src_dir = tmp_path / "corpus"
    for k in range(3):
        write_renamed(src_dir, f"part/{k}.parquet", [f"doc {i}" for i in range(10)])
    with pytest.raises(PermanentFetchError, match=r"no `text` column \(columns: content, body, id.*--text-column"):
        make(tmp_path / "data", source=str(src_dir), files="part/*.parquet").start()
    with pytest.raises(PermanentFetchError, match=r"column `body` is int64, expected a string"):
        make(tmp_path / "data2", source=str(src_dir), files="part/*.parquet", text_column="body").start()
    local = tmp_path / "local"                               # the loader's own check, local mode
    for i in range(2):
        write_renamed(local, shard_name(i), [f"doc {i}" for i in range(10)])
    plan = ShardPlan("train", data_dir=local)
    with pytest.raises(ConfigError, match=r"has no column 'text'.*content \(string\), body \(int64\).*--text-column"):
        next(iter_doc_batches(plan, (1, 0, 0, 0), 0, 1, 64))
    plan = ShardPlan("train", data_dir=local, text_column="content")
    assert next(iter_doc_batches(plan, (1, 0, 0, 0), 0, 1, 64))[0][0] == "doc 0"


def test_a_restart_adopts_the_cache_named_files(hub, tree, tmp_path):
    d = tmp_path / "data"
    with make(d, files="sample/10BT/*.parquet", buffer_size=3) as dl:
        for i in range(3):
            dl.wait_for_shard(i)
            dl.release(i, consumed=False)
        dl.wait_for_shard(3)
        dl.release(3, consumed=False)
        names = {i: dl.source.file_name(i) for i in range(4)}
    assert sorted(downloaded(d)) == [0, 1, 2, 3]
    # a killed fetch leaves a partial under the cache name: a restart resumes it, never a shard_ name
    (d / names[2]).rename(d / f"{names[2]}.123-abcdef01.partial")
    with make(d, files="sample/10BT/*.parquet", buffer_size=3) as dl:
        scan = scan_event(d, 2)
        assert scan["found"] == [0, 1, 3] and scan["partials"] == [2]
        for i in range(4):
            assert dl.wait_for_shard(i).read_bytes() == (tree / SAMPLE[i]).read_bytes()
            dl.release(i)
    assert downloaded(d).count(2) == 2 and downloaded(d).count(0) == 1     # only the partial one again
    assert not any(n.endswith(".partial") for n in top_names(d))


def test_a_changed_manifest_never_adopts_a_file_under_the_wrong_index(hub, tree, tmp_path, caplog):
    d = tmp_path / "data"
    with make(d, files="sample/10BT/*.parquet") as dl:
        for i in range(3):
            dl.wait_for_shard(i)
            dl.release(i, consumed=False)
        old = {i: dl.source.file_name(i) for i in range(4)}
    before = set(top_names(d))
    # another file set: 000_00001 is index 0 now. Its old file (index 1's name) is not this run's name
    with make(d, files="sample/10BT/000_0000[1-3].parquet") as dl:
        new = {i: dl.source.file_name(i) for i in range(3)}
        assert new[0] != old[1] and new[0].startswith("000000-")
        scan = scan_event(d, 2)
        assert scan["found"] == []                          # nothing adopted: every name is another index's
        for i in range(3):
            assert dl.wait_for_shard(i).read_bytes() == (tree / SAMPLE[i + 1]).read_bytes()
            dl.release(i, consumed=False)
    assert "belong to another file set" in caplog.text
    assert before <= set(top_names(d))                      # the old run's files are not ours to delete


def test_a_changed_file_under_the_same_name_is_fetched_again(hub, tree, tmp_path):
    d = tmp_path / "data"
    with make(d, files="sample/10BT/*.parquet") as dl:
        dl.wait_for_shard(0)
        dl.release(0, consumed=False)
    shutil.copy(tree / SAMPLE[2], tree / SAMPLE[0])         # the source's file 0 changes (same path)
    with make(d, files="sample/10BT/*.parquet", verify_existing="sha256") as dl:
        assert dl.wait_for_shard(0).read_bytes() == (tree / SAMPLE[0]).read_bytes()
        dl.release(0)
    assert downloaded(d).count(0) == 2


def test_a_file_without_the_text_column_fails_on_its_first_download(tmp_path):
    """A readable footer without the run's column is the file's own schema: refused at once (no checksum to
    tell a bad transfer from it, but a new download cannot grow a column), naming the columns and the flag."""
    from shardstream.fetch import fetch_shard
    from shardstream.source import Source
    remote = tmp_path / "remote"
    remote.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"content": [f"doc {i} " * 50] * 20}), remote / shard_name(i))
    with ShardServer(remote) as srv:
        with pytest.raises(PermanentFetchError) as ei:
            fetch_shard(Source(srv.url, 2), 0, tmp_path / "data", FAST)
        gets = srv.stats(shard_name(0)).get_requests
    assert gets == 1, f"fetched {gets} times"
    for words in ("no `text` column", "content", "--text-column"):
        assert words in str(ei.value), str(ei.value)
    assert not (tmp_path / "data" / shard_name(0)).exists()
