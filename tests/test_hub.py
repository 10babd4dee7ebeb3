"""hub.py through huggingface_hub, against the real local Hub-like server serving the FineWeb-like sample:
recursive listing with paging, revision pinning, a gated repo with the token `hf auth login` saves under
HF_HOME, HF_HUB_OFFLINE, and 429 with Retry-After honoured (and capped)."""
import hashlib
import math
import time

import pytest

from rel_common import isolate_hub_env
from shardstream import hub
from shardstream.errors import ConfigError, TransientFetchError
from shardstream.manifest import select
from shardstream.sample import FINEWEB_FILES, make_fineweb_sample
from shardstream.server import Fault, ShardServer

REPO = "HuggingFaceFW/fineweb-like"
TOKEN = "hf_GATEDtok3n_0123456789abcdef"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    d = tmp_path_factory.mktemp("fineweb")
    make_fineweb_sample(d, chars_per_file=20_000)
    return d


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    isolate_hub_env(monkeypatch, tmp_path)


@pytest.fixture
def srv(tree):
    with ShardServer(tree, hub_repo=REPO) as s:
        yield s


def tree_requests(srv):
    return [r for r in srv.requests if "/tree/" in r.path]


def test_recursive_listing_pages_through_the_whole_tree(srv, tree):
    srv.tree_page_size = 3
    sha = hub.resolve_revision(REPO, "main", None, endpoint=srv.url)
    assert sha == srv.revision
    files = hub.list_tree(REPO, sha, "", None, endpoint=srv.url)
    assert sorted(files) == sorted([*FINEWEB_FILES, "README.md"])
    for path in FINEWEB_FILES:
        data = (tree / path).read_bytes()
        assert files[path].size == len(data) and files[path].sha256 == hashlib.sha256(data).hexdigest()
    assert files["README.md"].sha256 is None                       # not an LFS file: no sha256 listed
    entries = len(FINEWEB_FILES) + 1 + 5                           # + data/, its 2 crawls, sample/, sample/10BT/
    pages = tree_requests(srv)
    assert len(pages) == math.ceil(entries / 3)
    assert all(r.path.endswith(f"/tree/{sha}") for r in pages)     # pinned: every page at the commit


def test_a_folder_and_a_flat_listing(srv):
    sha = srv.revision
    sub = hub.list_tree(REPO, sha, "sample/10BT", None, endpoint=srv.url)
    assert sorted(sub) == [f"000_0000{i}.parquet" for i in range(4)]
    assert sorted(hub.list_tree(REPO, sha, "", None, recursive=False, endpoint=srv.url)) == ["README.md"]
    with pytest.raises(ConfigError, match="HTTP 404.*no such folder"):
        hub.list_tree(REPO, sha, "sample/100BT", None, endpoint=srv.url)


def test_the_listing_feeds_a_manifest(srv):
    files = hub.list_tree(REPO, srv.revision, "", None, endpoint=srv.url)
    m = select(files, ["sample/10BT/*.parquet"], revision=srv.revision, source=f"hf://datasets/{REPO}")
    assert [e.path for e in m.train] == [f"sample/10BT/000_0000{i}.parquet" for i in range(3)]
    assert [e.path for e in m.val] == ["sample/10BT/000_00003.parquet"]
    assert len({m.cache_name(i) for i in range(len(m))}) == 4


def test_revision_pinning(srv):
    assert hub.resolve_revision(REPO, srv.revision, None, endpoint=srv.url) == srv.revision
    with pytest.raises(ConfigError, match="HTTP 404, no such revision.*check the repo name, the revision"):
        hub.resolve_revision(REPO, "v9", None, endpoint=srv.url)
    with pytest.raises(ConfigError, match="HTTP 404.*check the repo name"):
        hub.resolve_revision("someone/else", "main", None, endpoint=srv.url)
    old = srv.revision
    srv.revision = "ab" * 20                                       # a new commit: the old sha is gone here
    assert hub.resolve_revision(REPO, "main", None, endpoint=srv.url) == "ab" * 20
    with pytest.raises(ConfigError, match="no such revision"):
        hub.list_tree(REPO, old, "", None, endpoint=srv.url)


def test_a_gated_repo_takes_the_token_saved_under_hf_home(tree, tmp_path, monkeypatch):
    with ShardServer(tree, hub_repo=REPO, token=TOKEN) as srv:
        with pytest.raises(ConfigError, match="gated.*set HF_TOKEN.*hf auth login") as ei:
            hub.resolve_revision(REPO, "main", hub.hub_token(), endpoint=srv.url)
        assert TOKEN not in str(ei.value)
        home = tmp_path / "hf-home"
        home.mkdir()
        (home / "token").write_text(TOKEN + "\n")                  # what `hf auth login` writes
        assert hub.hub_token() == TOKEN
        sha = hub.resolve_revision(REPO, "main", hub.hub_token(), endpoint=srv.url)
        assert len(hub.list_tree(REPO, sha, "", hub.hub_token(), endpoint=srv.url)) == len(FINEWEB_FILES) + 1
        auths = [{k.lower(): v for k, v in r.headers.items()}.get("authorization") for r in srv.requests
                 if r.status == 200]
        assert auths and all(a == f"Bearer {TOKEN}" for a in auths)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")                 # HF_TOKEN wins over the saved one
        assert hub.hub_token() == "hf_wrong" and hub.hub_token("explicit") == "explicit"
        with pytest.raises(ConfigError, match="the token given was refused") as ei:
            hub.resolve_revision(REPO, "main", hub.hub_token(), endpoint=srv.url)
        assert "hf_wrong" not in str(ei.value)


def test_hf_hub_offline_is_a_clear_error_before_any_request(srv, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (lambda: hub.resolve_revision(REPO, "main", None, endpoint=srv.url),
                 lambda: hub.list_tree(REPO, srv.revision, "", None, endpoint=srv.url)):
        with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set.*unset HF_HUB_OFFLINE"):
            call()
    assert srv.requests == []


@pytest.mark.parametrize("op", ["revision", "tree"])
def test_429_waits_what_retry_after_says(srv, op):
    srv.add_fault(Fault("429", file=f"api/*/{op}/*", retry_after=1, times=1))
    t0 = time.monotonic()
    if op == "revision":
        assert hub.resolve_revision(REPO, "main", None, endpoint=srv.url) == srv.revision
    else:
        assert len(hub.list_tree(REPO, srv.revision, "", None, endpoint=srv.url)) == len(FINEWEB_FILES) + 1
    assert time.monotonic() - t0 >= 1.0                            # waited as asked, then went on
    statuses = [r.status for r in srv.requests if f"/{op}/" in r.path]
    assert statuses == [429, 200]


def test_a_long_retry_after_is_capped_and_a_429_that_never_ends_is_transient(srv, monkeypatch):
    monkeypatch.setattr(hub, "RETRY_AFTER_MAX", 0.2)
    monkeypatch.setattr(hub, "API_ATTEMPTS", 2)
    srv.add_fault(Fault("429", file="api/*/revision/*", retry_after=3600, times=None))
    t0 = time.monotonic()
    with pytest.raises(TransientFetchError, match="HTTP 429"):
        hub.resolve_revision(REPO, "main", None, endpoint=srv.url)
    assert time.monotonic() - t0 < 10                              # not an hour
    assert [r.status for r in srv.requests if "/revision/" in r.path] == [429, 429]


def test_retry_wait_reads_retry_after_and_ratelimit():
    assert hub._retry_wait({"Retry-After": "7"}) == 7
    assert hub._retry_wait({"RateLimit": '"api";r=0;t=12', "Retry-After": "7"}) == 12
    assert hub._retry_wait({"RateLimit": '"api";r=5;t=12', "Retry-After": "7"}) == 7   # not exhausted
    assert hub._retry_wait({"Retry-After": "99999"}) == hub.RETRY_AFTER_MAX
    assert hub._retry_wait({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0      # a date gone by
    assert hub._retry_wait({"Retry-After": "soon"}) is None and hub._retry_wait({}) is None
