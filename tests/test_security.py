"""Untrusted input, end to end: shard names, and everything a server sends (redirect targets,
Content-Disposition, ETags, sizes, bodies, parquet bytes) cannot make shardstream write outside its data
dir, leak the token, or crash the process.

test_fetch.py already proves, for one bare fetch: a redirect to another host gets no Authorization, file://
and ftp:// redirects are refused, an endless body hits the size cap, the token stays out of logs and
errors. Here the same threats go through the StreamingDownloader and its reader (and the trainer, for the
token in checkpoints), plus traversal attempts, the https rule, and malformed parquet at read time.
"""
import http.server
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rel_common import EndlessHandler, TinyServer, make_shards, read_shard, tally
from shardstream import layout
from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader
from shardstream.errors import ConfigError, CorruptShardError, PermanentFetchError, ShardSkipped
from shardstream.fetch import FetchPolicy, fetch_shard
from shardstream.loader import ShardPlan, iter_doc_batches
from shardstream.server import Fault, ShardServer
from shardstream.shards import shard_name
from shardstream.source import Source
from shardstream.listing import make_source

N = 6                       # 5 train shards + val 5
TOKEN = "hf_SECRETtok3n_0123456789abcdefXYZ"
FETCH = FetchPolicy(connect_timeout=2, stall_timeout=2, max_attempts=3, backoff_initial=0.01, backoff_max=0.05)
REPO = Path(__file__).resolve().parents[1]
OURS = ("status.json", "events.jsonl")


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    d = tmp_path_factory.mktemp("security-remote")
    return d, make_shards(d, N, seed=8)


def downloader(source, data, policy="fail", **kw):
    kw.setdefault("fetch_policy", FETCH)
    return StreamingDownloader(N - 1, data_dir=data, source=source, buffer_size=2, workers=2, progress=False,
                               failure_policy=FailurePolicy(policy, deadline=10, retry_initial=0.02, retry_max=0.1),
                               disk_policy=DiskPolicy(warn_free_bytes=0, min_free_bytes=0), **kw)


def our_file(name):
    """The only names shardstream writes in a data dir (docs/ARCHITECTURE.md, layout.py): in the dir or
    in its .shardstream folder."""
    name = name.removeprefix(layout.BOOK_DIR + "/")
    if name in OURS or name.startswith(".write-test-") or name == layout.BOOK_DIR:
        return True
    if not name.startswith("shard_") or len(name) < 19 or not name[6:11].isdigit():
        return False
    rest = name[len("shard_00000.parquet"):]
    return rest in ("", ".lock", ".lease") or rest.endswith(".partial") or rest.endswith(".partial.json")


def every_file(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def _redirector(location_for, seen, extra=None):
    class Redirect(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self._go()

        def do_GET(self):
            self._go()

        def _go(self):
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            self.send_response(302)
            self.send_header("Location", location_for(self.path.rsplit("/", 1)[-1]))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
    return Redirect


# -----------------------------------------------------------------------------
# Nothing outside the data dir

@pytest.mark.parametrize("bad", ["../../etc/passwd", "shard_00001.parquet", -1, 1.0, True, None, N])
def test_a_shard_id_is_an_int_in_the_dataset_never_a_path(remote, tmp_path, bad):
    source = Source("http://127.0.0.1:9/x", N)
    with pytest.raises(ConfigError):
        fetch_shard(source, bad, tmp_path / "data", FETCH)
    dl = downloader(source, tmp_path / "data2")
    with pytest.raises(ConfigError):
        dl.wait_for_shard(bad)
    assert not (tmp_path / "data").exists() or every_file(tmp_path / "data") == []


def test_hostile_redirects_headers_and_etags_cannot_write_outside_the_data_dir(remote, tmp_path):
    d, shas = remote
    body = {i: (d / shard_name(i)).read_bytes() for i in range(N)}

    class Hostile(http.server.BaseHTTPRequestHandler):
        """/<shard> redirects to a traversal-laden path; that path serves the shard's bytes with a
        Content-Disposition, ETag and Content-Location that all try to name files elsewhere."""
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self._go(send=False)

        def do_GET(self):
            self._go(send=True)

        def _go(self, send):
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            if not self.path.startswith("/cdn/"):
                self.send_response(302)
                self.send_header("Location", f"/cdn/..%2F..%2F..%2Fevil/../{name}?filename=../../../evil.parquet")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = body[int(name[6:11])]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Disposition", 'attachment; filename="../../../evil.parquet"; '
                                                    "filename*=UTF-8''..%2F..%2F..%2Fevil2.parquet")
            self.send_header("Content-Location", "/../../../evil3.parquet")
            self.send_header("ETag", '"../../../evil4/\\x00"')
            self.end_headers()
            if send:
                self.wfile.write(data)

    root = tmp_path / "box"
    data = root / "a" / "b" / "data"
    with TinyServer(Hostile) as srv:
        with downloader(Source(srv.url, N), data) as dl:
            for i in range(N - 1):
                p = dl.wait_for_shard(i, timeout=30)
                assert read_shard(p)[0] == shas[i]
                dl.release(i)
    files = every_file(root)
    assert files and all(f.startswith("a/b/data/") for f in files), files
    assert all(our_file(Path(f).name) for f in files), files
    assert not [f for f in every_file(tmp_path) if "evil" in f]
    tally("security/traversal", faults=4 * N, bytes_verified=sum(len(b) for b in body.values()), shards_read=N - 1)


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/shard", "data:text/plain,hi",
                                    "http://127.0.0.1.evil.example/x", "http://10.1.2.3/x"])
def test_a_forbidden_redirect_reaches_the_reader_as_a_clear_error_not_a_crash(tmp_path, target):
    seen = []
    with TinyServer(_redirector(lambda f: target, seen)) as srv:
        with downloader(Source(srv.url, N), tmp_path / "data", initial_buffer=0) as dl:
            with pytest.raises(PermanentFetchError, match="refused a redirect") as ei:
                dl.wait_for_shard(0, timeout=30)
            st = dl.get_status()
    assert "shard_00000.parquet" in str(ei.value)
    assert st.state == "running" and st.failures >= 1
    assert not (tmp_path / "data" / shard_name(0)).exists()


def test_https_is_required_for_non_loopback_hosts_unless_opted_out(tmp_path, monkeypatch):
    for url in ("http://10.0.0.1/d", "http://huggingface.co/datasets/x/y/resolve/main",
                "http://127.0.0.1.nip.io/d", "http://localhost.evil.example/d"):
        with pytest.raises(ConfigError, match="https"):
            Source(url, N)
        with pytest.raises(ConfigError, match="https"):
            StreamingDownloader(N - 1, data_dir=tmp_path, source=url, dataset_shards=N)
        assert Source(url, N, allow_insecure=True).base_url == url
    monkeypatch.setenv("SHARDSTREAM_SOURCE", "http://192.168.1.5/shards")     # as the edges read it
    from shardstream.settings import read
    with pytest.raises(ConfigError, match="https"):
        make_source(read("SHARDSTREAM_SOURCE"), dataset_shards=N)
    for url in ("http://127.0.0.1:8000/d", "http://localhost:8000/d", "http://[::1]:8000/d", "https://10.0.0.1/d"):
        assert Source(url, N).base_url == url


# -----------------------------------------------------------------------------
# The token: only to its host, never written anywhere

def test_hf_token_goes_to_the_hub_host_only_never_to_its_cdn_or_another_source(remote, tmp_path, monkeypatch):
    d, shas = remote
    seen = []
    with ShardServer(d) as cdn:                     # the CDN: reached as "localhost", another host name
        target = f"http://localhost:{cdn.port}/datasets/{cdn.hub_repo}/resolve/main/"
        with TinyServer(_redirector(lambda f: target + f, seen)) as hub:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            monkeypatch.setenv("HF_TOKEN", TOKEN)
            with downloader(make_source(hub.url, dataset_shards=N), tmp_path / "data") as dl:
                for i in range(N - 1):
                    assert read_shard(dl.wait_for_shard(i, timeout=30))[0] == shas[i]
                    dl.release(i)
        assert seen and all(auth == f"Bearer {TOKEN}" for _, _, auth in seen)
        assert cdn.requests and all("Authorization" not in r.headers for r in cdn.requests)
        # a source on another host than the Hub's gets no token at all
        monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
        cdn.reset_stats()
        with downloader(make_source(cdn.url, dataset_shards=N), tmp_path / "data2") as dl:
            dl.wait_for_shard(0, timeout=30)
        assert cdn.requests and all("Authorization" not in r.headers for r in cdn.requests)


def _assert_no_token(*texts, where=""):
    for t in texts:
        assert TOKEN not in t and TOKEN[3:] not in t, f"the token leaked into {where}"


def test_the_token_never_reaches_logs_status_events_or_errors(remote, tmp_path, caplog):
    d, shas = remote
    caplog.set_level(logging.DEBUG)
    with ShardServer(d, token=TOKEN) as srv:
        source = Source(srv.hub_url, N, token=TOKEN, token_host="127.0.0.1")
        srv.add_fault(Fault("status", status=503, file=shard_name(0), method="*"))
        srv.add_fault(Fault("reset", file=shard_name(1), at=0.5))
        srv.add_fault(Fault("flip", file=shard_name(2), at=0.5))
        srv.add_fault(Fault("404", file=shard_name(3), times=None))
        data = tmp_path / "data"
        with downloader(source, data, policy="skip") as dl:
            for i in range(N - 1):
                try:
                    dl.wait_for_shard(i, timeout=30)
                except ShardSkipped as e:
                    skipped = e
                    continue
                dl.release(i)
            status = dl.get_status()
            _assert_no_token(repr(dl), status.render(), status.line(), where="status")
        with downloader(source, tmp_path / "data2", initial_buffer=0) as dl2:
            with pytest.raises(PermanentFetchError) as ei:
                dl2.wait_for_shard(3, timeout=30)
        assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in srv.requests)
    assert status.skipped == (3,)
    errors = []
    for e in (skipped, ei.value):
        while e is not None:
            errors += [str(e), repr(e), str(getattr(e, "cause", ""))]
            e = e.__cause__ or e.__context__
    _assert_no_token(*errors, where="exception text")
    assert len(caplog.records) > 20
    _assert_no_token(caplog.text, *(str(r.args) for r in caplog.records), where="log records")
    for f in [*data.rglob("*"), *(tmp_path / "data2").rglob("*")]:
        if f.is_file():
            _assert_no_token(f.read_bytes().decode("latin-1"), where=f.name)
    assert layout.status_path(data).exists() and layout.events_path(data).exists()


def test_the_token_never_reaches_the_trainers_checkpoints_or_output(remote, tmp_path):
    d, _ = remote
    with ShardServer(d, token=TOKEN) as srv:
        env = {**os.environ, "HF_ENDPOINT": srv.url, "HF_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
        flags = {"depth": 1, "max_seq_len": 32, "device_batch_size": 2, "num_iterations": 2, "vocab_size": 300,
                 "streaming_mode": "True", "streaming_buffer_size": 2, "source": srv.hub_url, "dataset_shards": N,
                 "data_dir": tmp_path / "data", "tokenizer_dir": tmp_path / "tok", "checkpoint_dir": tmp_path / "ckpt",
                 "eval_every": -1, "eval_tokens": 0, "status_every": 1, "tokenizer_threads": 1}
        r = subprocess.run([sys.executable, "-m", "scripts.base_train", *[f"--{k}={v}" for k, v in flags.items()]],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert any(rec.headers.get("Authorization") == f"Bearer {TOKEN}" for rec in srv.requests)
    ckpts = list((tmp_path / "ckpt").glob("*.pt"))
    assert ckpts, "the trainer wrote no checkpoint"
    _assert_no_token(r.stdout, r.stderr, where="trainer output")
    for f in Path(tmp_path).rglob("*"):
        if f.is_file():
            _assert_no_token(f.read_bytes().decode("latin-1"), where=str(f))


# -----------------------------------------------------------------------------
# Hostile sizes and bodies, malformed parquet

def test_a_server_that_streams_forever_is_cut_at_the_size_cap_through_the_downloader(tmp_path):
    cap = 1 << 20
    with TinyServer(EndlessHandler) as srv:
        with downloader(Source(srv.url, N), tmp_path / "data", initial_buffer=0,
                        fetch_policy=FetchPolicy(max_shard_bytes=cap, backoff_initial=0.01, max_attempts=2)) as dl:
            with pytest.raises(PermanentFetchError, match="per-shard cap"):
                dl.wait_for_shard(0, timeout=60)
            assert dl.get_status().state == "running"
    left = sum(p.stat().st_size for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert left < cap and not (tmp_path / "data" / shard_name(0)).exists()


def _bad_parquets(d):
    """Shard 1: not parquet at all. Shard 2: `text` is an int column. Shard 3: footer fine, data pages
    garbled (passes the footer check, fails when read)."""
    (d / shard_name(1)).write_bytes(b"PAR1 this is not really parquet PAR1" * 300)
    pq.write_table(pa.table({"text": pa.array(range(100))}), d / shard_name(2))
    p = d / shard_name(3)
    b = bytearray(p.read_bytes())
    col = pq.ParquetFile(p).metadata.row_group(1).column(0)
    for k in range(col.data_page_offset + 40, col.data_page_offset + col.total_compressed_size - 8):
        b[k] ^= 0x5A
    p.write_bytes(bytes(b))


def test_malformed_parquet_is_a_clear_error_never_a_crash(tmp_path):
    remote = tmp_path / "remote"
    make_shards(remote, N, seed=12)
    _bad_parquets(remote)
    with ShardServer(remote) as srv:
        # under "fail": the reader gets a PermanentFetchError naming the shard; the downloader lives on
        with downloader(Source(srv.hub_url, N), tmp_path / "data", initial_buffer=0) as dl:
            for i, needle in ((1, "not a readable parquet"), (2, "expected a string column")):
                with pytest.raises(PermanentFetchError, match="not a valid shard") as ei:
                    dl.wait_for_shard(i, timeout=30)
                assert shard_name(i) in str(ei.value) and needle in str(ei.value)
                assert not (tmp_path / "data" / shard_name(i)).exists()
            assert dl.get_status().state == "running"
        # under "skip": the loader's reader moves past 1 and 2, and shard 3's garbled page is a
        # CorruptShardError naming the shard and row group, raised to the caller (not a crash)
        with downloader(Source(srv.hub_url, N), tmp_path / "data3", policy="skip") as dl:
            plan = ShardPlan("train", downloader=dl)
            read = []
            with pytest.raises(CorruptShardError) as ei:
                for _, pos, _ in iter_doc_batches(plan, (1, 0, 0, 0), 0, 1, 8):
                    read.append(pos[1])
            assert sorted(set(read)) == [0, 3]          # shard 0 in full, shard 3's good row group 0
            msg = str(ei.value)
            assert shard_name(3) in msg and "row group 1" in msg and "corrupt" in msg
            assert dl.get_status().skipped == (1, 2)
