"""Sources of any parquet corpus (issue 15): a Source with a Manifest, made by make_source(files=,
val_files=, manifest=) from the Hub (the local Hub-like server serving the FineWeb-like tree), a nested
local folder and a plain https URL with a manifest file; `shardstream ls` and `shardstream download`
with --files; nanochat's layout left exactly as it was; the default source pinned only when asked."""
import hashlib
import shutil

import pytest
import requests

from rel_common import FILE_PICKS, isolate_hub_env
from shardstream.cli import main
from shardstream.errors import ConfigError
from shardstream.fetch import FetchPolicy, fetch_shard
from shardstream.listing import make_source, pin_source
from shardstream.manifest import is_cache_name
from shardstream.sample import FINEWEB_FILES
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.source import Source

REPO = "HuggingFaceFW/fineweb-like"
SAMPLE = [p for p in FINEWEB_FILES if p.startswith("sample/10BT/")]
CRAWLS = [p for p in FINEWEB_FILES if p.startswith("data/")]
FAST = FetchPolicy(connect_timeout=2, stall_timeout=5, max_attempts=3, backoff_initial=0.01, backoff_max=0.05,
                   chunk_bytes=16384, fsync=False)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    isolate_hub_env(monkeypatch, tmp_path, also=FILE_PICKS)


@pytest.fixture
def hub(tree, monkeypatch):
    with ShardServer(tree, hub_repo=REPO) as srv:
        srv.tree_page_size = 3              # paging exercised
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        yield srv


# -----------------------------------------------------------------------------
# The Hub

def test_hub_files_glob_gives_a_pinned_manifest_whose_urls_fetch_the_right_bytes(hub, tree):
    src = make_source(f"hf://datasets/{REPO}", files="sample/10BT/*.parquet")
    assert src.kind == "hf" and src.revision == hub.revision and src.manifest.revision == hub.revision
    assert src.dataset_shards == 4 and src.num_train_shards == 3
    assert src.val_shards == (3,) and src.val_shard == 3                       # the last file is val
    assert [src.path(i) for i in range(4)] == SAMPLE
    for i, path in enumerate(SAMPLE):
        data = (tree / path).read_bytes()
        assert f"/resolve/{hub.revision}/" in src.url(i)                      # pinned at the commit
        got = requests.get(src.url(i), timeout=10)
        assert got.status_code == 200 and got.content == data
        assert src.listing[i].size == len(data) and src.listing[i].sha256 == sha256(data)
        name = src.file_name(i)
        assert "/" not in name and is_cache_name(name) and name.startswith(f"{i:06d}-")
    assert src.identity()["source"].startswith(f"hf://datasets/{REPO}@{hub.revision}#manifest-")
    assert src.identity()["manifest"] == src.manifest.digest()


def test_val_files_glob_none_and_identity_follow_the_files(hub, tree):
    src = make_source(f"hf://datasets/{REPO}", files=["data/**/*.parquet"], val_files="sample/10BT/000_00003.parquet")
    assert [src.path(i) for i in range(src.num_train_shards)] == CRAWLS
    assert [src.path(i) for i in src.val_shards] == ["sample/10BT/000_00003.parquet"]
    none = make_source(f"hf://datasets/{REPO}", files="sample/10BT/*.parquet", val_files="none")
    assert none.val_shards == () and none.val_shard is None and none.num_train_shards == 4 == none.dataset_shards
    one = make_source(f"hf://datasets/{REPO}", files="sample/10BT/000_00000.parquet", val_files="none")
    assert one.dataset_shards == 1                                            # >= 1 is enough without val
    with pytest.raises(ConfigError, match="only 1 file.*--val-files none"):
        make_source(f"hf://datasets/{REPO}", files="sample/10BT/000_00000.parquet")
    with pytest.raises(ConfigError, match="matches none.*nearest"):
        make_source(f"hf://datasets/{REPO}", files="sample/100BT/*.parquet")
    # one file changes (same commit here, so only its size/sha256 say so): the identity changes
    before = make_source(f"hf://datasets/{REPO}", files="sample/10BT/*.parquet").identity()
    shutil.copy(tree / SAMPLE[0], tree / SAMPLE[1])
    after = make_source(f"hf://datasets/{REPO}", files="sample/10BT/*.parquet").identity()
    assert before != after and before["dataset_shards"] == after["dataset_shards"]
    assert before["source"].split("#")[0] == after["source"].split("#")[0]    # same commit, other files


def test_a_tree_without_top_level_shards_reads_every_parquet_file(hub):
    src = make_source(f"hf://datasets/{REPO}")          # no flags: nothing at the top, so **/*.parquet
    assert [src.path(i) for i in range(len(FINEWEB_FILES))] == sorted(FINEWEB_FILES)
    assert src.manifest is not None and src.val_shards == (len(FINEWEB_FILES) - 1,)


def test_same_file_names_in_two_folders_get_two_cache_names(tree, tmp_path):
    d = tmp_path / "ab"
    for folder in ("a", "b"):
        (d / folder).mkdir(parents=True)
        shutil.copy(tree / SAMPLE[0 if folder == "a" else 1], d / folder / "0.parquet")
    src = make_source(str(d), files="*/0.parquet", val_files="none")
    assert [src.path(i) for i in range(2)] == ["a/0.parquet", "b/0.parquet"]
    assert src.file_name(0) != src.file_name(1) and all(is_cache_name(src.file_name(i)) for i in range(2))


# -----------------------------------------------------------------------------
# nanochat's layout, as it was

def test_nanochat_layout_is_unchanged(remote_dir, server, monkeypatch):
    src = make_source(str(remote_dir))
    assert src.manifest is None and src.dataset_shards == 6 and src.val_shards == (5,) and src.val_shard == 5
    assert [src.file_name(i) for i in range(6)] == [shard_name(i) for i in range(6)]
    assert [src.path(i) for i in range(6)] == [shard_name(i) for i in range(6)]
    assert src.url(3) == f"file://{remote_dir}/shard_00003.parquet"
    assert set(src.identity()) == {"source", "dataset_shards"}
    # the same shards picked by a glob are the same Source: names, URLs, identity
    assert make_source(str(remote_dir), files="shard_*.parquet") == src
    assert make_source(str(remote_dir), files="shard_*.parquet").identity() == src.identity()
    http = make_source(server.url, dataset_shards=6)
    assert http.manifest is None and http.url(2) == f"{server.url}/shard_00002.parquet"
    assert http.identity() == {"source": server.url, "dataset_shards": 6}
    with pytest.raises(ConfigError, match="int >= 2"):
        Source(server.url, 1)                           # without a manifest the last shard is val: 2 at least


def test_the_default_source_is_made_offline_and_pinned_when_asked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = make_source()                                 # no request: a bare StreamingDownloader() stays offline
    assert src.kind == "http" and src.base_url.endswith("/datasets/karpathy/climbmix-400b-shuffle/resolve/main")
    with pytest.raises(ConfigError, match="cannot pin .*HF_HUB_OFFLINE.*resolve/<40-hex sha>"):
        pin_source(src)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert pin_source(make_source("https://example.com/corpus", dataset_shards=6)).kind == "http"   # no Hub


def test_pinning_the_default_source_names_the_commit(tmp_path, monkeypatch):
    from shardstream.sample import make_sample
    make_sample(tmp_path / "climb", 3, 20_000, seed=1)
    with ShardServer(tmp_path / "climb") as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        src = make_source()
        assert srv.requests == []
        pinned = pin_source(src)
        assert pinned.kind == "hf" and pinned.revision == srv.revision
        assert pinned.base_url == f"{srv.url}/datasets/{srv.hub_repo}/resolve/{srv.revision}"
        assert pinned.dataset_shards == src.dataset_shards and pinned.manifest is None
        assert pinned.identity()["source"] == f"hf://datasets/{srv.hub_repo}@{srv.revision}"
        assert pin_source(pinned) is pinned


# -----------------------------------------------------------------------------
# Local folders and manifest files

def test_local_nested_tree_with_files(tree, tmp_path):
    src = make_source(str(tree), files=["data/CC-MAIN-2024-10/*.parquet", "sample/10BT/000_0000[0-1].parquet"])
    assert [src.path(i) for i in range(4)] == [*CRAWLS[:2], *SAMPLE[:2]]
    assert src.kind == "file" and src.revision.startswith("etags-")
    for i in range(4):
        assert src.listing[i].size == (tree / src.path(i)).stat().st_size
    r = fetch_shard(src, 1, tmp_path / "data", FAST)
    assert r.path.read_bytes() == (tree / src.path(1)).read_bytes()
    before = src.identity()
    (tree / CRAWLS[0]).write_bytes((tree / SAMPLE[3]).read_bytes())              # one file changes
    assert make_source(str(tree), files=["data/CC-MAIN-2024-10/*.parquet",
                                         "sample/10BT/000_0000[0-1].parquet"]).identity() != before


def test_manifest_file_over_http_and_its_errors(tree, tmp_path):
    with ShardServer(tree) as srv:
        m = tmp_path / "files.txt"
        m.write_text("# the sample\n" + "\n".join(SAMPLE[:3]) + "\n\n" + f"{srv.url}/{CRAWLS[0]}\n")
        src = make_source(srv.url, manifest=str(m))
        assert src.kind == "http" and src.dataset_shards == 4 and src.val_shards == (3,)
        assert [src.path(i) for i in range(3)] == SAMPLE[:3]                     # the file's order
        assert src.url(0) == f"{srv.url}/{SAMPLE[0]}" and src.url(3) == f"{srv.url}/{CRAWLS[0]}"
        for i in range(4):
            path = SAMPLE[i] if i < 3 else CRAWLS[0]
            assert requests.get(src.url(i), timeout=10).content == (tree / path).read_bytes()
        bad = tmp_path / "bad.txt"
        bad.write_text(f"{SAMPLE[0]}\nsample/../../etc/passwd\n")
        with pytest.raises(ConfigError, match=r"line 2: .*'\.\.' step"):
            make_source(srv.url, manifest=str(bad))
        with pytest.raises(ConfigError, match="cannot be listed.*--manifest"):
            make_source(srv.url, files="*.parquet")
        with pytest.raises(ConfigError, match="cannot read it"):
            make_source(srv.url, manifest=str(tmp_path / "missing.txt"))


def test_manifest_file_against_a_listed_source_pins_from_the_listing(tree, tmp_path):
    m = tmp_path / "files.txt"
    m.write_text(f"{SAMPLE[2]}\n{SAMPLE[0]}\n")
    src = make_source(str(tree), manifest=str(m), val_files="none")
    assert [src.path(i) for i in range(2)] == [SAMPLE[2], SAMPLE[0]] and src.val_shards == ()
    assert src.listing[0].size == (tree / SAMPLE[2]).stat().st_size and src.listing[0].etag
    m.write_text(f"{SAMPLE[0]}\nsample/10BT/999.parquet\n")
    with pytest.raises(ConfigError, match="does not hold.*999.parquet"):
        make_source(str(tree), manifest=str(m))


# -----------------------------------------------------------------------------
# The CLI

def test_ls_files_prints_the_manifest(hub, tree, capsys):
    assert main(["ls", f"hf://datasets/{REPO}", "--files", "sample/10BT/000_0000[01].parquet", "--files",
                 "sample/10BT/000_0000[23].parquet", "--val-files", "data/CC-MAIN-2024-18/*.parquet"]) == 0
    out = capsys.readouterr().out.splitlines()
    src = make_source(f"hf://datasets/{REPO}", files=["sample/10BT/*.parquet"],
                      val_files="data/CC-MAIN-2024-18/*.parquet")
    assert out[0].startswith(f"hf://datasets/{REPO}@{hub.revision}: 5 shards (4 train + val {CRAWLS[2]}")
    assert len(out) == 7
    for i in range(5):
        cells = out[1 + i].split()
        size = (tree / src.path(i)).stat().st_size
        assert cells[:4] == [str(i), "train" if i < 4 else "val", src.path(i), src.file_name(i)]
        assert cells[4] == f"{size:,}"
    total = sum((tree / p).stat().st_size for p in [*SAMPLE, CRAWLS[2]])
    assert out[-1].startswith(f"total {total:,} bytes") and "4 train" in out[-1] and "1 val" in out[-1]


def test_download_files_writes_the_cache_names(hub, tree, tmp_path, capsys):
    d = tmp_path / "data"
    argv = ["download", "-n", "-1", "--source", f"hf://datasets/{REPO}", "--files", "sample/10BT/*.parquet",
            "--data-dir", str(d)]
    assert main(argv) == 0, capsys.readouterr().err
    src = make_source(f"hf://datasets/{REPO}", files="sample/10BT/*.parquet")
    names = sorted(p.name for p in d.iterdir() if p.is_file())
    assert names == sorted(src.file_name(i) for i in range(4))
    for i in range(4):
        assert (d / src.file_name(i)).read_bytes() == (tree / src.path(i)).read_bytes()
    assert "4/4 shards verified" in capsys.readouterr().out
    assert not list(d.rglob("*.partial"))
    assert main(argv) == 0                                                        # a rerun fetches nothing
    assert "4 already there" in capsys.readouterr().out
    # -n counts train files of the manifest
    assert main(["download", "-n", "9", "--source", f"hf://datasets/{REPO}", "--files", "sample/10BT/*.parquet",
                 "--data-dir", str(tmp_path / "d2")]) == 2
    assert "the manifest has 3 train shards" in capsys.readouterr().err


def test_the_settings_and_a_manifest_of_urls_without_a_source(tree, tmp_path):
    from shardstream.settings import read
    env = {"SHARDSTREAM_FILES": "a/*.parquet; b/[,]x.parquet\nc/**", "SHARDSTREAM_VAL_FILES": "none"}
    assert read("SHARDSTREAM_FILES", env) == ["a/*.parquet", "b/[,]x.parquet", "c/**"]
    assert read("SHARDSTREAM_FILES", {}) is None and read("SHARDSTREAM_VAL_FILES", env) == "none"
    assert read("SHARDSTREAM_TEXT_COLUMN", {}) == "text" and read("SHARDSTREAM_MANIFEST", {}) is None
    with ShardServer(tree) as srv:
        m = tmp_path / "urls.txt"
        m.write_text("".join(f"{srv.url}/{p}\n" for p in SAMPLE[:2]))
        src = make_source(manifest=str(m))
        assert src.kind == "http" and src.dataset_shards == 2 and src.url(1) == f"{srv.url}/{SAMPLE[1]}"
        assert requests.get(src.url(0), timeout=10).content == (tree / SAMPLE[0]).read_bytes()
        m.write_text(f"{SAMPLE[0]}\n{SAMPLE[1]}\n")
        with pytest.raises(ConfigError, match="relative paths .*give --source"):
            make_source(manifest=str(m))
        m.write_text("s3://bucket/x.parquet\nb.parquet\n")
        with pytest.raises(ConfigError, match="s3:// URL, but the source .* reads http:// or https://"):
            make_source(srv.url, manifest=str(m))


def test_the_run_pins_the_default_source_at_start_and_rides_out_a_hub_api_that_fails(tmp_path, monkeypatch, caplog):
    """start() pins a Hub branch URL to its commit; an API that fails now (503) leaves the run going unpinned,
    with a warning, instead of dead (the transfer loop rides out what it must)."""
    import logging
    from shardstream.downloader import StreamingDownloader
    from shardstream.sample import make_sample
    from shardstream.server import Fault
    make_sample(tmp_path / "climb", 3, 20_000, seed=1)
    with ShardServer(tmp_path / "climb") as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        with StreamingDownloader(2, data_dir=tmp_path / "a", source=make_source(srv.hub_url, dataset_shards=3),
                                 fetch_policy=FAST, progress=False) as dl:
            assert dl.source.kind == "hf" and dl.source.revision == srv.revision
            assert dl.wait_for_shard(0).read_bytes() == (tmp_path / "climb" / shard_name(0)).read_bytes()
        srv.add_fault(Fault("status", status=503, file="api/*", times=None))
        with caplog.at_level(logging.WARNING, logger="shardstream.listing"):
            with StreamingDownloader(2, data_dir=tmp_path / "b", source=make_source(srv.hub_url, dataset_shards=3),
                                     fetch_policy=FAST, progress=False) as dl:
                assert dl.source.kind == "http"                     # unpinned, still at main
                assert dl.wait_for_shard(1).read_bytes() == (tmp_path / "climb" / shard_name(1)).read_bytes()
    assert "unpinned" in caplog.text and "503" in caplog.text
