"""Source kinds other than S3 (tests/test_s3.py): the Hub (hf://) against the local server speaking the
Hub's resolve, revision and tree endpoints; local folders; plain http(s) base URLs as before; discovery
errors; `shardstream ls`; the revision in identity() making a resume against changed data fail.
"""
import hashlib
import shutil

import pytest

from shardstream.cli import main
from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader
from shardstream.errors import ConfigError, FetchCancelled, PermanentFetchError, StateMismatchError
from shardstream.fetch import FetchPolicy, fetch_shard, remote_info
from shardstream.loader import STATE_VERSION, parse_resume_state
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.source import Source
from shardstream.listing import make_source

FAST = FetchPolicy(connect_timeout=2, stall_timeout=5, max_attempts=3, backoff_initial=0.01, backoff_max=0.05,
                   chunk_bytes=16384, fsync=False)
REPO = "karpathy/climbmix-400b-shuffle"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(server, monkeypatch):
    """The local server as HF_ENDPOINT, two tree entries a page (so paging is exercised)."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server.tree_page_size = 2
    return server


# -----------------------------------------------------------------------------
# The Hub

def test_hub_source_pins_the_revision_and_lists_the_tree(hub, remote_dir, tmp_path):
    src = make_source(f"hf://datasets/{REPO}")
    assert src.kind == "hf" and src.revision == hub.revision and len(src.revision) == 40
    assert src.base_url == f"{hub.url}/datasets/{REPO}/resolve/{hub.revision}"     # main -> its commit
    assert src.dataset_shards == 6                                                 # from the tree, paged
    assert sum(r.path.startswith(f"/api/datasets/{REPO}/tree/") for r in hub.requests) == 3
    for i, info in enumerate(src.listing):
        assert info.size == (remote_dir / shard_name(i)).stat().st_size
        assert info.sha256 == sha256(remote_dir / shard_name(i))                   # the LFS oid
    assert src.identity() == {"source": f"hf://datasets/{REPO}@{hub.revision}", "dataset_shards": 6}
    r = fetch_shard(src, 3, tmp_path / "data", FAST)
    assert r.sha256 == sha256(remote_dir / shard_name(3)) == sha256(r.path)
    assert all(f"/resolve/{hub.revision}/" in r.path for r in hub.requests if "/resolve/" in r.path)


def test_hub_revision_by_sha_by_folder_and_unknown(hub, remote_dir):
    assert make_source(f"hf://datasets/{REPO}@{hub.revision}").revision == hub.revision
    (remote_dir / "sub").mkdir()
    for i in range(3):
        shutil.copy(remote_dir / shard_name(i), remote_dir / "sub" / shard_name(i))
    sub = make_source(f"hf://datasets/{REPO}/sub")
    assert sub.dataset_shards == 3 and sub.name == f"hf://datasets/{REPO}/sub"
    assert sub.url(2).endswith(f"/resolve/{hub.revision}/sub/shard_00002.parquet")
    assert remote_info(sub, 2, FAST).sha256 == sha256(remote_dir / shard_name(2))
    with pytest.raises(ConfigError, match="HTTP 404.*check the repo name, the revision"):
        make_source(f"hf://datasets/{REPO}@v9")
    with pytest.raises(ConfigError, match="HTTP 404"):
        make_source("hf://datasets/someone/else")
    with pytest.raises(ConfigError, match="not an hf:// dataset URL"):
        make_source("hf://models/gpt2")


def test_new_commit_under_a_pinned_source_fails_and_changes_the_identity(hub, remote_dir, tmp_path):
    old = make_source(f"hf://datasets/{REPO}")
    fetch_shard(old, 0, tmp_path / "data", FAST)
    shutil.copy(remote_dir / shard_name(5), remote_dir / shard_name(1))       # the data changes...
    hub.revision = "ab" * 20                                                  # ...in a new commit
    with pytest.raises(PermanentFetchError, match=f"resolve/{old.revision}/shard_00001.parquet.*HTTP 404"):
        fetch_shard(old, 1, tmp_path / "data", FAST)      # never shard 1 of the new commit
    new = make_source(f"hf://datasets/{REPO}")
    assert new.revision == "ab" * 20 and new.identity() != old.identity()
    # the loader's fingerprint holds identity()["source"]: a resume across the change is refused
    state = {"version": STATE_VERSION, "fingerprint": {"source": old.identity()["source"]}}
    with pytest.raises(StateMismatchError, match=f"source was .*@{old.revision}.* now .*@{new.revision}"):
        parse_resume_state(state, {"source": new.identity()["source"]}, 0, 1, 5)


def test_hub_changed_file_at_the_same_revision_is_refused(hub, remote_dir, tmp_path):
    """A server that swaps a file under the same commit (a broken mirror): the tree's sha256 wins."""
    src = make_source(f"hf://datasets/{REPO}")
    shutil.copy(remote_dir / shard_name(4), remote_dir / shard_name(2))
    with pytest.raises(PermanentFetchError, match="changed since this run started: shard_00002.parquet had"):
        fetch_shard(src, 2, tmp_path / "data", FAST)


def test_hub_token_goes_to_the_api_and_the_files(remote_dir, tmp_path, monkeypatch):
    with ShardServer(remote_dir, token="s3cret") as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(ConfigError, match="HTTP 401.*set HF_TOKEN"):
            make_source(f"hf://datasets/{REPO}")
        monkeypatch.setenv("HF_TOKEN", "s3cret")
        src = make_source(f"hf://datasets/{REPO}")
        assert "s3cret" not in repr(src) and "s3cret" not in str(src.identity())
        assert fetch_shard(src, 0, tmp_path / "data", FAST).size == (remote_dir / shard_name(0)).stat().st_size


def test_hub_over_plain_http_to_a_remote_host_is_refused(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.com")
    with pytest.raises(ConfigError, match="plain http to a non-loopback host"):
        make_source(f"hf://datasets/{REPO}")


# -----------------------------------------------------------------------------
# Local folders

def test_local_folder_source_discovers_fetches_and_resumes(remote_dir, tmp_path):
    src = make_source(str(remote_dir))
    assert src.kind == "file" and src.dataset_shards == 6 and src.base_url == f"file://{remote_dir}"
    assert make_source(f"file://{remote_dir}").identity() == src.identity()
    assert src.identity()["source"].startswith(f"file://{remote_dir}@etags-")
    data = tmp_path / "data"
    stop = stop_after_first_block()
    with pytest.raises(FetchCancelled):
        fetch_shard(src, 4, data, FAST, stop=stop, on_bytes=stop.on_bytes)
    [partial] = data.glob("shard_00004.parquet.*.partial")
    have = partial.stat().st_size
    r = fetch_shard(src, 4, data, FAST)
    assert 0 < have < r.size and r.resumed_from == have and r.bytes_downloaded == r.size - have
    assert r.path.read_bytes() == (remote_dir / shard_name(4)).read_bytes()


def test_local_changed_file_is_refused_and_own_folder_as_data_dir_too(remote_dir, tmp_path):
    src = make_source(str(remote_dir))
    shutil.copy(remote_dir / shard_name(3), remote_dir / shard_name(1))
    with pytest.raises(PermanentFetchError, match="changed since this run started"):
        fetch_shard(src, 1, tmp_path / "data", FAST)
    assert make_source(str(remote_dir)).identity() != src.identity()
    with pytest.raises(ConfigError, match="is the source's own folder"):
        fetch_shard(src, 0, remote_dir, FAST)
    assert (remote_dir / shard_name(0)).is_file()


def test_streaming_downloader_takes_a_local_folder_by_name(remote_dir, tmp_path):
    with StreamingDownloader(-1, buffer_size=2, data_dir=tmp_path / "data", source=str(remote_dir),
                             fetch_policy=FAST, disk_policy=DiskPolicy(warn_free_bytes=0, min_free_bytes=0),
                             failure_policy=FailurePolicy("fail", deadline=30), progress=False) as dl:
        assert dl.total_shards == 5 and dl.val_shard == 5           # counted from the folder
        for i in range(5):
            assert dl.wait_for_shard(i, timeout=20).read_bytes() == (remote_dir / shard_name(i)).read_bytes()
            dl.release(i)


# -----------------------------------------------------------------------------
# Discovery errors, http(s) base URLs, the ls command

def test_discovery_errors_name_the_problem(remote_dir, tmp_path):
    (remote_dir / shard_name(2)).unlink()
    with pytest.raises(ConfigError, match="lacks shard_00002.parquet of shards 0..5.*dataset_shards=2"):
        make_source(str(remote_dir))
    assert make_source(str(remote_dir), dataset_shards=2).dataset_shards == 2
    with pytest.raises(ConfigError, match="dataset_shards=9 but"):
        make_source(str(remote_dir), dataset_shards=9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no shard_XXXXX.parquet"):
        make_source(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no such directory"):
        make_source(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="unknown scheme ftp://"):
        make_source("ftp://host/x")


def test_http_base_url_is_as_before(server):
    src = make_source(server.url, dataset_shards=6)
    assert src.kind == "http" and src.revision is None and src.listing == ()
    assert src.identity() == {"source": server.url, "dataset_shards": 6}
    assert src == Source(server.url, 6)
    with pytest.raises(ConfigError, match="cannot be listed"):        # its shard count is asked for
        make_source(server.url)


def test_ls_lists_local_and_hub_sources(remote_dir, hub, capsys):
    assert main(["ls", str(remote_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    sizes = [(remote_dir / shard_name(i)).stat().st_size for i in range(6)]
    assert "6 shards (5 train + val shard_00005.parquet)" in out[0]
    assert len(out) == 8 and out[-1].startswith(f"total {sum(sizes):,} bytes")
    assert main(["ls", "--summary", f"hf://datasets/{REPO}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"hf://datasets/{REPO}@{hub.revision}: 6 shards") and len(out) == 2
    assert main(["ls", hub.url]) == 2
    assert "cannot be listed" in capsys.readouterr().err


def test_store_metadata_becomes_remote_info():
    """What gcsfs / s3fs / the local filesystem say about a file (their info dicts) -> RemoteInfo."""
    from shardstream.objectstore import _s3_md5, remote_info_of
    md5 = hashlib.md5(b"x").hexdigest()
    gs = remote_info_of("gs", {"size": "10", "generation": "1700000000123", "etag": "CNv...",
                               "md5Hash": "nS7ROXJ4HCKmb1cKAq6MRA=="})
    assert gs.size == 10 and gs.etag == "1700000000123" and gs.md5 == "9d2ed13972781c22a66f570a02ae8c44"
    assert remote_info_of("s3", {"size": 10, "ETag": f'"{md5}"'}).md5 is None     # a listing cannot tell
    assert _s3_md5({"ETag": f'"{md5}"'}) == md5
    assert _s3_md5({"ETag": f'"{md5}-3"'}) is None                                # multipart
    assert _s3_md5({"ETag": f'"{md5}"', "ServerSideEncryption": "aws:kms"}) is None
    assert remote_info_of("file", {"size": 5, "mtime": 1.5}).etag == "1.5-5"


def stop_after_first_block():
    import threading
    stop = threading.Event()
    stop.on_bytes = lambda n: stop.set()
    return stop
