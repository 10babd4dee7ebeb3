"""Hostile and broken servers on the source side: where the token goes, a listing as untrusted input, and
bad source URLs. Every server here is a real HTTP server on 127.0.0.1 (a scripted one below, or the
ShardServer); nothing of the network is mocked.

- The token goes to the exact origin (scheme, host, port) of HF_ENDPOINT: not to another port of the same
  host, whether reached by a redirect of a file, of an API call, or by a tree page's `Link: rel=next`.
- A tree listing that pages in a cycle or without end, an answer that never ends, a malformed entry, a
  name that is not a plain base name, a name listed twice: a clear ConfigError naming it, never a hang,
  never a wrong size or sha256 pinned.
- A bad source URL (port out of range, port 0, malformed, no host) is a ConfigError before any I/O, and
  exit 2 with a message and no traceback for `shardstream download`, `shardstream ls` and the trainer.
"""
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from rel_common import TinyServer, make_shards, sha256_of
from shardstream import hub
from shardstream.cli import main
from shardstream.downloader import StreamingDownloader
from shardstream.errors import ConfigError
from shardstream.fetch import FetchPolicy, fetch_shard
from shardstream.listing import shards_from_listing
from shardstream.server import ShardServer
from shardstream.shards import shard_name
from shardstream.source import RemoteInfo, Source, redact_url
from shardstream.listing import make_source

N = 6                                   # 5 train shards + val 5
REPO = "org/data"
SHA = "c0ffee" + "0" * 34               # the one commit the scripted Hub serves
TOKEN = "hf_HOSTILEtok3n_0123456789abcdef"
FETCH = FetchPolicy(connect_timeout=2, stall_timeout=2, max_attempts=2, backoff_initial=0.01, backoff_max=0.05,
                    fsync=False)
ROOT = Path(__file__).resolve().parents[1]
JSON = {"Content-Type": "application/json"}


def _query(p):
    """The query of a request's URL as a dict (huggingface_hub adds recursive=/expand= beside cursor=)."""
    return dict(kv.split("=", 1) for kv in (p.query or "").split("&") if "=" in kv)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-remote")
    return d, make_shards(d, N, seed=3)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("HF_TOKEN", "HF_ENDPOINT", "SHARDSTREAM_SOURCE"):
        monkeypatch.delenv(name, raising=False)


class Scripted(TinyServer):
    """A real server on 127.0.0.1 answering GET/HEAD with reply(srv, path) -> (status, headers, body), body
    bytes or a JSON-able object. srv.seen logs (method, path, Authorization) of every request."""

    def __init__(self, reply):
        self.seen = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self._go(send=False)

            def do_GET(self):
                self._go(send=True)

            def _go(self, send):
                owner.seen.append((self.command, self.path, self.headers.get("Authorization")))
                status, headers, body = reply(owner, self.path)
                body = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send:
                    self.wfile.write(body)
        super().__init__(Handler)

    def auths(self):
        return [a for _, _, a in self.seen]


def hub_api(tree, files=None):
    """A reply for Scripted speaking the Hub's API as sources use it: revision main -> SHA; a tree page is
    tree(srv, split path) -> (JSON body, next-page URL or None); resolve URLs answer files(srv, name)."""
    def reply(srv, path):
        p = urlsplit(path)
        if p.path == f"/api/datasets/{REPO}/revision/main":
            return 200, JSON, {"id": REPO, "sha": SHA}
        if p.path.startswith(f"/api/datasets/{REPO}/tree/{SHA}"):
            body, nxt = tree(srv, p)
            return 200, {**JSON, **({"Link": f'<{nxt}>; rel="next"'} if nxt else {})}, body
        if "/resolve/" in p.path and files is not None:
            return files(srv, p.path.rsplit("/", 1)[-1])
        return 404, {}, b"not here"
    return reply


def entries_for(d, n=N):
    """The tree entries the Hub gives for shards 0..n-1 in d."""
    out = []
    for i in range(n):
        p = d / shard_name(i)
        sha = sha256_of(p)
        out.append({"type": "file", "oid": sha[:40], "size": p.stat().st_size, "path": p.name,
                    "lfs": {"oid": sha, "size": p.stat().st_size, "pointerSize": 134}})
    return out


def within(seconds, fn):
    """fn()'s result, or its exception re-raised; fails the test if fn is still running after seconds."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:          # noqa: BLE001 - handed to the test thread
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: stuck"
    if "error" in box:
        raise box["error"]
    return box["value"]


def use_hub(monkeypatch, srv, token=TOKEN):
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)


# -----------------------------------------------------------------------------
# 1. The token goes to the exact origin of the Hub

@pytest.mark.parametrize("form", ["http", "hf"])
def test_a_redirect_from_the_hub_to_another_port_of_its_host_gets_no_token(remote, tmp_path, monkeypatch, form):
    d, shas = remote
    with ShardServer(d) as other:           # 127.0.0.1 too, another port: another origin
        files = lambda srv, name: (302, {"Location": f"{other.url}/{name}"}, b"")
        with Scripted(hub_api(lambda srv, p: (entries_for(d), None), files)) as hub_srv:
            use_hub(monkeypatch, hub_srv)
            if form == "http":
                source = make_source(f"{hub_srv.url}/datasets/{REPO}/resolve/main", dataset_shards=N)
            else:
                source = make_source(f"hf://datasets/{REPO}")
            r = fetch_shard(source, 0, tmp_path / "data", FETCH)
            assert sha256_of(r.path) == shas[0]
        assert hub_srv.seen and all(a == f"Bearer {TOKEN}" for a in hub_srv.auths())
        assert other.requests and all("Authorization" not in rec.headers for rec in other.requests)


def test_a_source_on_the_hubs_host_but_another_port_gets_no_token(remote, tmp_path, monkeypatch):
    d, shas = remote
    with ShardServer(d) as other, Scripted(hub_api(lambda srv, p: ([], None))) as hub_srv:
        use_hub(monkeypatch, hub_srv)
        source = make_source(other.url, dataset_shards=N)
        assert source.headers_for(other.url + "/x") == {}
        assert source.headers_for(hub_srv.url + "/x") == {}      # the token is for the Hub, not this source
        assert sha256_of(fetch_shard(source, 1, tmp_path / "data", FETCH).path) == shas[1]
        assert other.requests and all("Authorization" not in rec.headers for rec in other.requests)


def test_a_next_page_link_to_another_port_gets_no_token(remote, monkeypatch):
    d, _ = remote
    entries = entries_for(d)
    with Scripted(hub_api(lambda srv, p: (entries[3:], None))) as other:
        first = lambda srv, p: (entries[:3], f"{other.url}{p.path}?cursor=3")
        with Scripted(hub_api(first)) as hub_srv:
            use_hub(monkeypatch, hub_srv)
            source = make_source(f"hf://datasets/{REPO}")
    assert source.dataset_shards == N
    assert hub_srv.seen and all(a == f"Bearer {TOKEN}" for a in hub_srv.auths())
    assert other.seen and other.auths() == [None]


def test_an_api_redirect_to_another_port_gets_no_token(remote, monkeypatch):
    d, _ = remote
    with Scripted(hub_api(lambda srv, p: (entries_for(d), None))) as other:
        def reply(srv, path):
            if "/revision/" in path:
                return 307, {"Location": other.url + path}, b""
            return hub_api(lambda srv, p: (entries_for(d), None))(srv, path)
        with Scripted(reply) as hub_srv:
            use_hub(monkeypatch, hub_srv)
            assert make_source(f"hf://datasets/{REPO}").revision == SHA
    assert all(a == f"Bearer {TOKEN}" for a in hub_srv.auths())
    assert other.seen and other.auths() == [None]


def test_the_token_origin_is_scheme_host_and_port():
    src = Source("http://127.0.0.1:8000/d", N, token=TOKEN, token_host="127.0.0.1")   # the old form: a host
    assert src.headers_for("http://127.0.0.1:8000/d/x") == {"Authorization": f"Bearer {TOKEN}"}
    for url in ("http://127.0.0.1:8001/d/x", "https://127.0.0.1:8000/d/x", "http://localhost:8000/d/x",
                "http://127.0.0.1/d/x", "http://127.0.0.1:99999/x", "http://[::1/x", "ftp://127.0.0.1:8000/x"):
        assert src.headers_for(url) == {}, url
    hub_src = Source("https://hub.example/d", N, token=TOKEN, token_origin="https://hub.example")
    assert hub_src.headers_for("https://hub.example:443/d/x") and hub_src.token_host == "hub.example"
    assert hub_src.headers_for("https://hub.example:8443/d/x") == {}
    assert hub_src.headers_for("http://hub.example/d/x") == {}
    assert TOKEN not in repr(hub_src)


# -----------------------------------------------------------------------------
# 2. A listing is untrusted input

@pytest.mark.parametrize("cycle", [1, 2])
def test_a_next_link_cycle_is_a_clear_error_not_a_hang(monkeypatch, cycle):
    def tree(srv, p):               # the first page links to cursor=0, which links on in a cycle
        at = int(_query(p).get("cursor", "-1"))
        return [], f"{srv.url}{p.path}?cursor={(at + 1) % cycle}"
    with Scripted(hub_api(tree)) as hub_srv:
        use_hub(monkeypatch, hub_srv, token=None)
        with pytest.raises(ConfigError, match=r"next-page link on page \d+ loops back to page 2") as ei:
            within(30, lambda: make_source(f"hf://datasets/{REPO}"))
    assert f"hf://datasets/{REPO}" in str(ei.value)


def test_an_endless_chain_of_pages_stops_at_the_page_cap(remote, monkeypatch):
    def tree(srv, p):
        at = int(_query(p).get("cursor", "0"))
        return [], f"{srv.url}{p.path}?cursor={at + 1}"
    with Scripted(hub_api(tree)) as hub_srv:
        use_hub(monkeypatch, hub_srv, token=None)
        with pytest.raises(ConfigError, match="more than 25 pages"):
            within(30, lambda: hub.list_tree(REPO, SHA, "", None, max_pages=25))
        assert len(hub_srv.seen) == 25
    assert hub.MAX_TREE_PAGES == 10_000


BAD_ENTRIES = [
    (5, "not a JSON object"),
    ("shard_00000.parquet", "not a JSON object"),
    ({"type": "file", "size": 10}, "no path"),
    ({"type": "file", "path": 7, "size": 10}, "no path"),
    ({"type": "file", "path": "shard_00000.parquet", "size": "big"}, "size"),
    ({"type": "file", "path": "shard_00000.parquet", "size": -1}, "size"),
    ({"type": "file", "path": "shard_00000.parquet", "size": True}, "size"),
    ({"type": "file", "path": "shard_00000.parquet", "size": 1.5}, "size"),
    ({"type": "file", "path": "shard_00000.parquet"}, "size"),
    ({"type": "file", "path": "shard_00000.parquet", "size": 10, "lfs": "x"}, "lfs"),
    ({"type": "file", "path": "shard_00000.parquet", "size": 10, "lfs": {"oid": "../etc"}}, "sha256"),
    ({"path": "shard_00000.parquet", "size": 10}, "type"),
]


@pytest.mark.parametrize("bad,why", BAD_ENTRIES, ids=[str(i) for i in range(len(BAD_ENTRIES))])
def test_a_malformed_tree_entry_is_a_config_error_naming_it_and_the_url(remote, monkeypatch, bad, why):
    d, _ = remote
    entries = entries_for(d)[1:] + [bad]
    with Scripted(hub_api(lambda srv, p: (entries, None))) as hub_srv:
        use_hub(monkeypatch, hub_srv, token=None)
        with pytest.raises(ConfigError) as ei:
            make_source(f"hf://datasets/{REPO}")
    msg = str(ei.value)
    assert why in msg and f"/api/datasets/{REPO}/tree/{SHA}" in msg and hub_srv.url in msg, msg
    assert repr(bad)[:20] in msg or json.dumps(bad)[:20] in msg, msg


@pytest.mark.parametrize("body,why", [({"error": "nope"}, "is not a list"), ("x", "is not a list"),
                                      (None, "is not a list"), (3, "is not a list"),
                                      (b"[" * 200_000, "did not answer JSON"), (b"\xff[]", "did not answer JSON")],
                         ids=["object", "string", "null", "number", "deep", "binary"])
def test_a_tree_answer_that_is_not_a_list_is_a_config_error(monkeypatch, body, why):
    with Scripted(hub_api(lambda srv, p: (body, None))) as hub_srv:
        use_hub(monkeypatch, hub_srv, token=None)
        with pytest.raises(ConfigError, match=why) as ei:
            make_source(f"hf://datasets/{REPO}")
    assert f"{hub_srv.url}/api/datasets/{REPO}/tree/{SHA}" in str(ei.value)


def test_download_ls_and_the_downloader_all_refuse_a_malformed_listing(remote, tmp_path, monkeypatch, capsys):
    d, _ = remote
    entries = entries_for(d)
    entries[2] = {"type": "file", "path": "shard_00002.parquet", "size": -5}
    with Scripted(hub_api(lambda srv, p: (entries, None))) as hub_srv:
        use_hub(monkeypatch, hub_srv, token=None)
        assert main(["ls", f"hf://datasets/{REPO}"]) == 2
        assert "size" in capsys.readouterr().err
        assert main(["download", "-n", "1", "--source", f"hf://datasets/{REPO}",
                     "--data-dir", str(tmp_path / "data")]) == 2
        assert "size" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="size"):
            StreamingDownloader(2, data_dir=tmp_path / "data2", source=f"hf://datasets/{REPO}", progress=False)
    assert not (tmp_path / "data" / shard_name(0)).exists()


@pytest.mark.parametrize("path", ["a/../shard_00004.parquet", "/abs/shard_00004.parquet", "x\\shard_00004.parquet",
                                  "..\\shard_00004.parquet", "shard_00004.parquet/", ".."])
def test_a_tree_name_that_is_not_a_plain_base_name_is_refused(remote, monkeypatch, path):
    d, _ = remote
    entries = entries_for(d)
    entries.append({**entries[4], "path": path, "size": 1})
    with Scripted(hub_api(lambda srv, p: (entries, None))) as hub_srv:
        use_hub(monkeypatch, hub_srv, token=None)
        with pytest.raises(ConfigError, match="not a plain file name") as ei:
            make_source(f"hf://datasets/{REPO}")
    assert repr(path) in str(ei.value) or path in str(ei.value)


def test_a_tree_entry_outside_the_listed_folder_is_refused(remote, monkeypatch):
    d, _ = remote
    entries = [{**e, "path": "sub/" + e["path"]} for e in entries_for(d)]
    entries[3]["path"] = "other/shard_00003.parquet"
    with Scripted(hub_api(lambda srv, p: (entries, None))) as hub_srv:
        use_hub(monkeypatch, hub_srv, token=None)
        with pytest.raises(ConfigError, match="other/shard_00003.parquet"):
            make_source(f"hf://datasets/{REPO}/sub")
        entries[3]["path"] = "sub/shard_00003.parquet"
        assert make_source(f"hf://datasets/{REPO}/sub").dataset_shards == N


def test_a_name_listed_twice_is_refused_and_a_lookalike_is_not_a_shard(remote, monkeypatch):
    d, _ = remote
    entries = entries_for(d)
    with Scripted(hub_api(lambda srv, p: (entries, None))) as hub_srv:
        use_hub(monkeypatch, hub_srv, token=None)
        fake = {**entries[3], "size": 1, "lfs": {"oid": "ab" * 32}}
        entries.append({**fake, "path": "shard_000003.parquet"})       # not the file shard 3 is read from
        entries.append({**fake, "path": "shard_0000\u0663.parquet"})    # ARABIC-INDIC DIGIT THREE
        src = make_source(f"hf://datasets/{REPO}")
        assert src.listing[3].size == (d / shard_name(3)).stat().st_size
        assert src.listing[3].sha256 == entries[3]["lfs"]["oid"]
        entries.append(fake)                                           # shard_00003.parquet again
        with pytest.raises(ConfigError, match="shard_00003.parquet.* twice"):
            make_source(f"hf://datasets/{REPO}")


def test_object_store_and_local_names_follow_the_same_rule(remote, tmp_path):
    d, _ = remote
    info = RemoteInfo(size=10, sha256=None, etag="e")
    files = {shard_name(i): info for i in range(N)}
    assert len(shards_from_listing(files, "s3://bucket/p")) == N
    for bad in ("x/../shard_00001.parquet", "/abs", "a\\b", "", "shard_00001.parquet\x00"):
        with pytest.raises(ConfigError, match="not a plain file name"):
            shards_from_listing({**files, bad: info}, "s3://bucket/p")
    with pytest.raises(ConfigError, match="size"):
        shards_from_listing({**files, shard_name(2): RemoteInfo(size=-3, sha256=None, etag="e")}, "s3://bucket/p")
    local = tmp_path / "local"
    local.mkdir()
    for i in range(N):
        os.link(d / shard_name(i), local / shard_name(i))
    (local / "..\\shard_00002.parquet").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a plain file name"):
        make_source(str(local))


def test_an_answer_larger_than_the_cap_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(hub, "MAX_API_BYTES", 1 << 20)
    big = b"[" + b" " * (3 << 20) + b"]"
    with Scripted(hub_api(lambda srv, p: (big, None))) as hub_srv:
        use_hub(monkeypatch, hub_srv, token=None)
        with pytest.raises(ConfigError, match="larger than 1 MiB"):
            within(30, lambda: make_source(f"hf://datasets/{REPO}"))


def test_an_answer_trickling_forever_is_cut_at_the_deadline(monkeypatch):
    class Trickle(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(600):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
    monkeypatch.setattr(hub, "API_DEADLINE", 0.5)
    monkeypatch.setattr(hub, "API_ATTEMPTS", 2)
    with TinyServer(Trickle) as srv:
        use_hub(monkeypatch, srv, token=None)
        t0 = time.monotonic()
        with pytest.raises(Exception, match="0.5 s") as ei:
            within(30, lambda: make_source(f"hf://datasets/{REPO}"))
    assert type(ei.value).__name__ == "TransientFetchError" and time.monotonic() - t0 < 15


# -----------------------------------------------------------------------------
# 3. A bad source URL is a clear error before any I/O

BAD_URLS = [
    ("http://127.0.0.1:99999/x", "port"),
    ("http://127.0.0.1:0/x", "port"),
    ("https://127.0.0.1:8o/x", "port"),
    ("http://[::1/x", "not a valid URL"),
    ("http:///x", "no host"),
    ("https://:443/x", "no host"),
    ("https://exa mple.com/x", "not a host name"),
    ("https://example.com\t/x", "control characters"),
    ("s3://[bad/x", "not a valid URL"),
    ("s3:///prefix", "no bucket"),
]


@pytest.mark.parametrize("url,why", BAD_URLS)
def test_a_bad_source_url_is_a_config_error_naming_it(tmp_path, url, why):
    for make in (lambda: make_source(url), lambda: Source(url, N),
                 lambda: StreamingDownloader(2, data_dir=tmp_path / "data", source=url, progress=False)):
        with pytest.raises(ConfigError) as ei:
            make()
        msg = str(ei.value)
        assert why in msg and redact_url(url) in msg, msg
        assert "://" in msg.split(why, 1)[1], f"no expected form named: {msg}"
    assert not (tmp_path / "data").exists()


def test_a_bad_hf_endpoint_is_a_config_error_naming_it(monkeypatch):
    for endpoint in ("http://127.0.0.1:99999", "http://[::1", "http://127.0.0.1:0"):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with pytest.raises(ConfigError, match=re.escape(f"HF_ENDPOINT={endpoint!r}")):
            make_source(f"hf://datasets/{REPO}")


def _run(args, tmp_path, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SHARDSTREAM_"))}
    env["NANOCHAT_BASE_DIR"] = str(tmp_path / "base")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


CLI_URLS = ["http://127.0.0.1:99999/x", "http://[::1/x", "http://127.0.0.1:0/x"]


@pytest.mark.parametrize("url", CLI_URLS)
def test_shardstream_download_exits_2_on_a_bad_source_url(tmp_path, url):
    shardstream = str(Path(sys.executable).parent / "shardstream")
    r = _run([shardstream, "download", "-n", "1", "--source", url, "--data-dir", str(tmp_path / "data")], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert url in r.stderr and "https://HOST" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("url", CLI_URLS[:2])
def test_shardstream_ls_exits_2_on_a_bad_source_url(tmp_path, url):
    r = _run([str(Path(sys.executable).parent / "shardstream"), "ls", url], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert url in r.stderr, r.stderr


def test_the_trainer_exits_2_on_a_bad_source_url(tmp_path):
    url = "http://127.0.0.1:99999/x"
    r = _run([sys.executable, "-m", "scripts.base_train", "--streaming_mode", "--source", url, "--device", "cpu",
              "--data_dir", str(tmp_path / "data")], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out
    assert url in out and "port" in out, out


# -----------------------------------------------------------------------------
# 4. `shardstream ls http://...` says which forms work

def test_ls_of_an_http_url_says_which_forms_can_be_listed(capsys):
    assert main(["ls", "http://127.0.0.1:1/shards"]) == 2
    err = capsys.readouterr().err
    assert "cannot be listed" in err and "http://127.0.0.1:1/shards" in err
    for form in ("hf://datasets/ORG/NAME", "HF_ENDPOINT", "s3://", "gs://", "local dir"):
        assert form in err, err


# -----------------------------------------------------------------------------
# A malformed redirect: a clear error from the Hub's API and from fetch, not a crash

BAD_LOCATIONS = ["http://[::1/x", "http://127.0.0.1:99999/x", "http://127.0.0.1:0/x", "ftp://127.0.0.1/x"]


@pytest.mark.parametrize("location", BAD_LOCATIONS)
def test_a_malformed_redirect_from_the_hubs_api_is_a_clear_error(monkeypatch, location):
    with Scripted(lambda srv, path: (302, {"Location": location}, b"")) as hub_srv:
        use_hub(monkeypatch, hub_srv)
        with pytest.raises(ConfigError, match="refused a redirect") as ei:
            within(30, lambda: make_source(f"hf://datasets/{REPO}"))
        assert len(hub_srv.seen) == 1
    assert TOKEN not in str(ei.value)


@pytest.mark.parametrize("location", BAD_LOCATIONS[:3])
def test_a_malformed_redirect_location_is_a_clear_fetch_error(tmp_path, location):
    from shardstream.errors import PermanentFetchError
    with Scripted(lambda srv, path: (302, {"Location": location}, b"")) as srv:
        with pytest.raises(PermanentFetchError, match="refused a redirect to a malformed URL"):
            fetch_shard(Source(srv.url, N), 0, tmp_path / "data", FETCH)
