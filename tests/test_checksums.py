"""Checksum files (checksums.py): a SHA256SUMS beside shards served without a sha256 header verifies them.

Parsing on hand-written text; fetching against the real local ShardServer's plain base URL (which sends an
ETag but no X-Linked-Etag, like a plain https mirror), with the file made by `make-sample --checksums`.
"""
import hashlib
import http.server
import subprocess
import sys

import pytest

from shardstream.checksums import (CHECKSUMS, ChecksumCache, ChecksumFileError, ChecksumFileUnavailable, NotAChecksumFile,
                                   parse_sha256sums,
                                   write_sha256sums)
from shardstream.errors import ConfigError, PermanentFetchError
from shardstream.fetch import FetchPolicy, fetch_shard, remote_info
from shardstream.server import Fault
from shardstream.source import Source

FAST = FetchPolicy(connect_timeout=2.0, stall_timeout=1.0, backoff_initial=0.01, backoff_max=0.05)
SHARDS = 6
A, B = "a" * 64, "B" * 64


def name(i):
    return f"shard_{i:05d}.parquet"


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def fresh_cache():
    CHECKSUMS.forget()
    yield
    CHECKSUMS.forget()


# -----------------------------------------------------------------------------
# Parsing

def test_parse_gnu_and_bsd_forms():
    text = (f"{A}  shard_00000.parquet\n{B} *./shard_00001.parquet\n\n# a comment\n"
            f"SHA256 (shard_00002.parquet) = {A}\n{A}  sub/shard_00003.parquet\n{A}  shard_00000.parquet\n")
    f = parse_sha256sums(text, "http://h/SHA256SUMS")
    assert f.sums == {"shard_00000.parquet": A, "shard_00001.parquet": B.lower(), "shard_00002.parquet": A}
    assert f.sha256("shard_00003.parquet") is None      # listed in another folder: not ours


@pytest.mark.parametrize("text, what", [
    (f"{A[:-1]}  shard_00000.parquet\n", "line 1 is not a sha256sum line"),
    (f"{A}  shard_00000.parquet\nnot a line at all\n", "line 2 is not a sha256sum line"),
    (f"{A}  shard_00000.parquet\n{B}  shard_00000.parquet\n", "lists shard_00000.parquet twice"),
 ])
def test_parse_rejects_malformed_files_naming_url_and_line(text, what):
    with pytest.raises(ChecksumFileError, match=what) as e:
        parse_sha256sums(text, "http://h/SHA256SUMS")
    assert "http://h/SHA256SUMS" in str(e.value)


@pytest.mark.parametrize("text", ["<html>oops</html>\n", "PAR1\x15\x00\x15\ufffd\n\x00"])
def test_a_reply_without_any_checksum_line_is_no_checksum_file(text):
    with pytest.raises(NotAChecksumFile, match="line 1 is not a sha256sum line.*nor is any other"):
        parse_sha256sums(text, "http://h/SHA256SUMS")
    assert ChecksumCache().get("base", lambda: ("http://h/SHA256SUMS", text)) is None


def test_cache_reads_once_retries_failures_and_remembers_a_bad_file():
    cache, calls = ChecksumCache(), []

    def load_after_one_failure():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("dropped")
        return "u", f"{A}  x\n"

    with pytest.raises(ConnectionResetError):
        cache.get("base", load_after_one_failure)
    assert cache.get("base", load_after_one_failure).sha256("x") == A
    assert cache.get("base", load_after_one_failure).sha256("x") == A
    assert len(calls) == 2                      # a failure is not remembered; a success is
    assert cache.get("none", lambda: None) is None
    bad = []
    for _ in range(2):
        with pytest.raises(ChecksumFileError):
            cache.get("bad", lambda: bad.append(1) or ("u", f"{A}  x\ngarbage\n"))
    assert len(bad) == 1                        # a malformed file is read once and its error kept


def test_cache_waits_before_asking_again_for_an_unavailable_file():
    cache, calls = ChecksumCache(retry_seconds=60), []

    def unavailable():
        calls.append(1)
        raise ChecksumFileUnavailable("cannot read u now (HTTP 503)")

    assert cache.get("base", unavailable) is None and cache.get("base", unavailable) is None
    assert len(calls) == 1
    cache.retry_seconds = 0
    cache.forget("base")
    assert cache.get("base", lambda: ("u", f"{A}  x\n")).sha256("x") == A


def test_policy_checks_the_file_name():
    with pytest.raises(ConfigError, match="checksum_file"):
        FetchPolicy(checksum_file="../SHA256SUMS")
    assert FetchPolicy(checksum_file=None).checksum_file is None


# -----------------------------------------------------------------------------
# Fetching against the real server's plain base URL (no X-Linked-Etag)

def test_make_sample_writes_a_file_sha256sum_accepts(tmp_path):
    d = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "shardstream", "make-sample", str(d), "--shards", "2",
                        "--chars-per-shard", "20000", "--checksums"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = (d / "SHA256SUMS").read_text().splitlines()
    assert lines == [f"{sha(d / name(i))}  {name(i)}" for i in range(2)]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=d, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_fetch_verifies_against_the_checksum_file_read_once(server, tmp_path):
    write_sha256sums(server.directory, sorted(server.directory.glob("shard_*.parquet")))
    source = Source(server.url, SHARDS)
    assert remote_info(source, 0, FAST).sha256 == sha(server.directory / name(0))   # from the file, not a header
    for i in (1, 2, 3):
        r = fetch_shard(source, i, tmp_path, FAST)
        assert r.sha256 == sha(server.directory / name(i))
    assert server.stats("SHA256SUMS").get_requests == 1     # one read for the whole process


def test_a_shard_that_does_not_match_its_listed_sum_is_refused(server, tmp_path):
    paths = sorted(server.directory.glob("shard_*.parquet"))
    write_sha256sums(server.directory, paths)
    sums = server.directory / "SHA256SUMS"
    good = sha(server.directory / name(2))
    sums.write_text(sums.read_text().replace(good, "0" * 64))
    data = tmp_path / "data"
    with pytest.raises(PermanentFetchError) as e:
        fetch_shard(Source(server.url, SHARDS), 2, data, FAST)
    assert "SHA256SUMS" in str(e.value) and "does not match" in str(e.value)
    assert not (data / name(2)).exists()
    assert not [p for p in data.iterdir() if p.name != ".shardstream"]        # no partial file left
    # the same file, with the check off, is fetched and verified by size and footer only
    r = fetch_shard(Source(server.url, SHARDS), 2, data, FetchPolicy(
        connect_timeout=2.0, stall_timeout=1.0, backoff_initial=0.01, backoff_max=0.05, checksum_file=None))
    assert r.sha256 == good


def test_a_malformed_checksum_file_is_a_clear_permanent_error(server, tmp_path):
    (server.directory / "SHA256SUMS").write_text(f"{sha(server.directory / name(0))}  {name(0)}\n<html>\n")
    with pytest.raises(PermanentFetchError, match=r"SHA256SUMS line 2 is not a sha256sum line.*checksum_file=None"):
        fetch_shard(Source(server.url, SHARDS), 0, tmp_path, FAST)
    assert not (tmp_path / name(0)).exists()


def test_no_checksum_file_and_a_flaky_one(server, tmp_path):
    r = fetch_shard(Source(server.url, SHARDS), 0, tmp_path, FAST)      # none there: size + footer, as before
    assert r.sha256 == sha(server.directory / name(0))                   # (the hash of what was written)
    assert server.stats("SHA256SUMS").get_requests == 1



def test_a_checksum_file_that_fails_now_holds_nothing_up_and_is_asked_for_again(server, monkeypatch):
    write_sha256sums(server.directory, sorted(server.directory.glob("shard_*.parquet")))
    server.add_fault(Fault("status", file="SHA256SUMS", status=503, times=2))
    src = Source(server.url, SHARDS)
    assert remote_info(src, 1, FAST).sha256 is None         # 503: this shard goes on without it
    assert remote_info(src, 2, FAST).sha256 is None         # not asked again within retry_seconds
    assert server.stats("SHA256SUMS").get_requests == 1
    monkeypatch.setattr(CHECKSUMS, "retry_seconds", 0.0)
    CHECKSUMS.forget(src.base_url)                          # as if the 30 s had passed
    assert remote_info(src, 2, FAST).sha256 is None         # the second 503
    assert remote_info(src, 3, FAST).sha256 == sha(server.directory / name(3))
    assert server.stats("SHA256SUMS").faults == 2 and server.stats("SHA256SUMS").get_requests == 3


def test_a_server_that_drops_the_checksum_request_still_serves_shards(remote_dir, tmp_path):
    """A tiny server that hangs up on any path but the shards (the ShardServer never does that)."""
    from rel_common import TinyServer

    class DropsOthers(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self._go(False)

        def do_GET(self):
            self._go(True)

        def _go(self, send):
            if not self.path.endswith(".parquet"):
                self.close_connection = True        # no response at all
                return
            data = (remote_dir / self.path.rsplit("/", 1)[-1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if send:
                self.wfile.write(data)

    with TinyServer(DropsOthers) as tiny:
        r = fetch_shard(Source(tiny.url, SHARDS), 0, tmp_path / "data", FAST)
    assert r.sha256 == sha(remote_dir / name(0))


def test_the_hub_path_needs_no_checksum_file(server, tmp_path):
    fetch_shard(Source(server.hub_url, SHARDS), 0, tmp_path, FAST)      # X-Linked-Etag gives the sha256
    assert server.stats("SHA256SUMS").requests == 0
