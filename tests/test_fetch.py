"""fetch.py against the real local ShardServer: clean fetches, every fault kind, resume (in process and
after kill -9), permanent errors, the token's reach, stop, and the per-shard lock."""
import hashlib
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rel_common import EndlessHandler, TinyServer
from shardstream.errors import (ConfigError, FetchCancelled, PermanentFetchError, TransientFetchError)
from shardstream import layout
from shardstream.fetch import FetchPolicy, fetch_shard, remote_info
from shardstream.server import Fault, ShardServer
from shardstream.source import Source

# Tiny backoffs so retries cost milliseconds; a short stall timeout for the stall fault.
FAST = FetchPolicy(connect_timeout=2.0, stall_timeout=1.0, backoff_initial=0.01, backoff_max=0.05)
SHARDS = 6
TOKEN = "hf_secretTOKEN1234567890abcdef"


def name(i):
    return f"shard_{i:05d}.parquet"


def same_as_source(srv, data_dir, i):
    return (data_dir / name(i)).read_bytes() == (srv.directory / name(i)).read_bytes()


def leftovers(data_dir, i):
    """Partial files and sidecars of shard i (beside the shards, and in the bookkeeping folder)."""
    return sorted(p.name for d in (data_dir, layout.book_dir(data_dir)) for p in d.glob(f"{name(i)}.*")
                  if not p.name.endswith(".lock"))


@pytest.fixture
def source(server):
    return Source(server.hub_url, SHARDS)


# -----------------------------------------------------------------------------
# Clean fetches

def test_clean_fetch_is_byte_identical_and_verified(server, source, tmp_path):
    data = tmp_path / "data"
    r = fetch_shard(source, 2, data, FAST)
    src = (server.directory / name(2)).read_bytes()
    assert r.path == data / name(2) and r.size == len(src)
    assert r.sha256 == hashlib.sha256(src).hexdigest()
    assert r.bytes_downloaded == len(src) and r.resumed_from == 0 and not r.already_present
    assert same_as_source(server, data, 2)
    assert leftovers(data, 2) == []
    st = server.stats(name(2))
    assert st.get_requests == 1 and st.bytes_sent == len(src)

    again = fetch_shard(source, 2, data, FAST)          # already there: no request at all
    assert again.already_present and again.bytes_downloaded == 0
    assert server.stats(name(2)).requests == st.requests


def test_remote_info_reads_the_hub_headers(server, source):
    info = remote_info(source, 1, FAST)
    data = (server.directory / name(1)).read_bytes()
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.etag


def test_plain_path_without_x_linked_headers(server, tmp_path):
    r = fetch_shard(Source(server.url, SHARDS), 0, tmp_path, FAST)
    assert same_as_source(server, tmp_path, 0) and r.size == (server.directory / name(0)).stat().st_size


# -----------------------------------------------------------------------------
# Every fault kind recovers to a byte-identical file

@pytest.mark.parametrize("fault", [
    Fault("reset", at=0.5),
    Fault("status", status=500),
    Fault("status", status=502, times=2),
    Fault("status", status=503, times=3),
    Fault("429", retry_after=0),
    Fault("stall", at=0.4, seconds=10),
    Fault("truncate", at=0.3),
    Fault("flip", at=0.7),
    Fault("wrong_length"),
    Fault("reset", at=0.0, times=3),
], ids=lambda f: f"{f.kind}-{f.status if f.kind == 'status' else f.at}-x{f.times}")
def test_fault_is_recovered_byte_identical(server, source, tmp_path, fault):
    server.add_fault(Fault(**{**fault.__dict__, "file": name(3)}))
    r = fetch_shard(source, 3, tmp_path, FAST)
    assert same_as_source(server, tmp_path, 3)
    assert leftovers(tmp_path, 3) == []
    assert server.stats(name(3)).faults == fault.times       # the fault really struck
    if fault.kind == "wrong_length":     # we stop at the size HEAD gave: the lie costs nothing
        assert r.attempts == 2 and r.bytes_downloaded == r.size
    else:
        assert r.attempts > 2            # HEAD + GET is a clean run; this took more


def test_flip_is_caught_by_sha256_and_refetched_in_full(server, source, tmp_path, caplog):
    size = (server.directory / name(1)).stat().st_size
    server.add_fault(Fault("flip", file=name(1), at=0.5))
    with caplog.at_level(logging.WARNING, logger="shardstream.fetch"):
        r = fetch_shard(source, 1, tmp_path, FAST)
    assert same_as_source(server, tmp_path, 1)
    assert server.stats(name(1)).ranges == [(0, size), (0, size)]
    assert r.bytes_downloaded == 2 * size
    assert any("corrupt" in rec.getMessage() for rec in caplog.records)


def test_429_retry_after_is_honoured(server, source, tmp_path):
    server.add_fault(Fault("429", file=name(0), retry_after=1, method="GET"))
    t0 = time.monotonic()
    fetch_shard(source, 0, tmp_path, FAST)     # FAST's own backoff is <= 0.05 s
    assert time.monotonic() - t0 >= 0.95
    assert same_as_source(server, tmp_path, 0)


def test_outage_is_ridden_out(server, source, tmp_path):
    server.outage(1.0)
    policy = FetchPolicy(connect_timeout=2, stall_timeout=2, backoff_initial=0.05, backoff_max=0.2,
                         max_attempts=None)
    fetch_shard(source, 4, tmp_path, policy)
    assert same_as_source(server, tmp_path, 4)


# -----------------------------------------------------------------------------
# Resume: what is on disk is never fetched again

def test_dropped_connection_resumes_with_range(server, source, tmp_path):
    size = (server.directory / name(2)).stat().st_size
    server.add_fault(Fault("truncate", file=name(2), at=0.5))
    r = fetch_shard(source, 2, tmp_path, FAST)
    half = int(size * 0.5)
    st = server.stats(name(2))
    assert st.ranges == [(0, half), (half, size)]
    assert st.bytes_sent == size == r.bytes_downloaded      # not one byte twice
    assert same_as_source(server, tmp_path, 2)


def _seed_partial(server, source, data_dir, i, n, *, etag=None, legacy=False):
    """A partial file holding the first n bytes of shard i, as a killed fetch would leave it."""
    info = remote_info(source, i, FAST)
    data_dir.mkdir(parents=True, exist_ok=True)
    p = data_dir / f"{name(i)}.99999-deadbeef.partial"
    p.write_bytes((server.directory / name(i)).read_bytes()[:n])
    sidecar = {"size": info.size, "sha256": info.sha256, "etag": etag or info.etag}
    side = (data_dir / (p.name + ".json")) if legacy else layout.sidecar_path(p)     # legacy: an older layout's
    side.parent.mkdir(exist_ok=True)
    side.write_text(json.dumps(sidecar))
    server.reset_stats()
    return p


@pytest.mark.parametrize("legacy", [False, True])      # True: a partial an older shardstream left, its sidecar
def test_partial_file_with_matching_sidecar_is_resumed(server, source, tmp_path, legacy):    # beside it
    size = (server.directory / name(1)).stat().st_size
    _seed_partial(server, source, tmp_path, 1, 200_000, legacy=legacy)
    r = fetch_shard(source, 1, tmp_path, FAST)
    assert r.resumed_from == 200_000 and r.bytes_downloaded == size - 200_000
    assert server.stats(name(1)).ranges == [(200_000, size)]
    assert same_as_source(server, tmp_path, 1) and leftovers(tmp_path, 1) == []
    assert not list(layout.book_dir(tmp_path).glob("*")), "the sidecar and the fetch's lock file are gone"


def test_partial_file_of_another_version_is_discarded(server, source, tmp_path):
    size = (server.directory / name(1)).stat().st_size
    stale = _seed_partial(server, source, tmp_path, 1, 200_000, etag='"some-older-version"')
    r = fetch_shard(source, 1, tmp_path, FAST)
    assert not stale.exists()
    assert r.resumed_from == 0 and server.stats(name(1)).ranges == [(0, size)]
    assert same_as_source(server, tmp_path, 1)


def test_corrupt_partial_file_is_caught_and_refetched(server, source, tmp_path):
    p = _seed_partial(server, source, tmp_path, 1, 200_000)
    with open(p, "r+b") as f:           # a byte changed on disk since it was written
        f.seek(1000)
        f.write(bytes([f.read(1)[0] ^ 1]))
    fetch_shard(source, 1, tmp_path, FAST)
    assert same_as_source(server, tmp_path, 1)
    size = (server.directory / name(1)).stat().st_size
    assert server.stats(name(1)).ranges == [(200_000, size), (0, size)]


def test_sidecars_torn_by_a_kill_are_cleaned_up(server, source, tmp_path):
    # a kill while the sidecar was written (it comes before its partial): one with no partial, one that
    # does not parse beside an empty partial
    (tmp_path / f"{name(1)}.111-aaaaaaaa.partial.json").write_text('{"size": 5')
    (tmp_path / f"{name(1)}.222-bbbbbbbb.partial.json").write_text('{"si')
    (tmp_path / f"{name(1)}.222-bbbbbbbb.partial").touch()
    r = fetch_shard(source, 1, tmp_path, FAST)
    assert r.resumed_from == 0 and same_as_source(server, tmp_path, 1)
    assert leftovers(tmp_path, 1) == []


KILLED_FETCH = """
import sys
from shardstream.fetch import FetchPolicy, fetch_shard
from shardstream.source import Source
fetch_shard(Source(sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), sys.argv[4],
            FetchPolicy(chunk_bytes=16384, backoff_initial=0.01, backoff_max=0.05))
"""


def test_partial_left_by_a_killed_process_is_resumed(server, source, tmp_path):
    size = (server.directory / name(5)).stat().st_size
    server.set_rate(0.25)               # ~2 s for the shard: time to kill it halfway
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FETCH, server.hub_url, str(SHARDS), "5", str(tmp_path)])
    try:
        deadline = time.monotonic() + 20
        partial = None
        while time.monotonic() < deadline:
            parts = list(tmp_path.glob(f"{name(5)}.*.partial"))
            if parts and parts[0].stat().st_size > size // 4:
                partial = parts[0]
                break
            assert proc.poll() is None, "the fetch process ended before it could be killed"
            time.sleep(0.02)
        assert partial is not None, "no partial file appeared"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (tmp_path / name(5)).exists()
    have = partial.stat().st_size
    assert 0 < have < size and layout.sidecar_path(partial).exists()
    server.set_rate(None)
    server.reset_stats()
    r = fetch_shard(source, 5, tmp_path, FAST)
    assert r.resumed_from == have and r.bytes_downloaded == size - have
    assert server.stats(name(5)).ranges == [(have, size)]
    assert same_as_source(server, tmp_path, 5) and leftovers(tmp_path, 5) == []


def test_server_that_ignores_range_is_restarted_cleanly(remote_dir, tmp_path):
    # The ShardServer always honours Range, so a tiny server that never does (and cuts its first reply
    # short) is the only way to reach this branch.
    body = (remote_dir / name(0)).read_bytes()
    seen = []

    class IgnoresRange(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self._reply(send=False)

        def do_GET(self):
            if not self.path.endswith(name(0)):      # the checksum file fetch looks for: not here
                self.send_error(404)
                return
            seen.append(self.headers.get("Range"))
            self._reply(send=True, cut=len(seen) == 1)

        def _reply(self, send, cut=False):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"v1"')
            self.end_headers()
            if send:
                self.wfile.write(body[: len(body) // 2] if cut else body)
            self.close_connection = True

    with TinyServer(IgnoresRange) as tiny:
        r = fetch_shard(Source(tiny.url, SHARDS), 0, tmp_path, FAST)
    assert seen[0] is None and seen[1] is not None and seen[1].startswith("bytes=")   # it did ask to resume
    assert (tmp_path / name(0)).read_bytes() == body
    assert r.bytes_downloaded == len(body) // 2 + len(body)


# -----------------------------------------------------------------------------
# Permanent failures: a clear typed error, nothing under the final name

def test_404_is_permanent_and_names_the_shard(server, tmp_path):
    (server.directory / name(3)).unlink()
    with pytest.raises(PermanentFetchError) as e:
        fetch_shard(Source(server.hub_url, SHARDS), 3, tmp_path, FAST)
    msg = str(e.value)
    assert "shard 00003" in msg and "404" in msg and name(3) in msg and server.hub_url in msg
    assert e.value.shard_id == 3 and e.value.attempts == 1
    assert not (tmp_path / name(3)).exists() and leftovers(tmp_path, 3) == []


def test_404_on_get_after_a_good_head_leaves_nothing(server, source, tmp_path):
    server.add_fault(Fault("404", file=name(2), method="GET", times=None))
    with pytest.raises(PermanentFetchError, match="404"):
        fetch_shard(source, 2, tmp_path, FAST)
    assert not (tmp_path / name(2)).exists() and leftovers(tmp_path, 2) == []


def test_checksum_that_never_matches_is_permanent(server, source, tmp_path):
    server.add_fault(Fault("flip", file=name(1), times=None))
    with pytest.raises(PermanentFetchError) as e:
        fetch_shard(source, 1, tmp_path, FAST)
    assert "sha256" in str(e.value) and "3 full downloads" in str(e.value)
    assert server.stats(name(1)).get_requests == FAST.max_full_downloads
    assert not (tmp_path / name(1)).exists() and leftovers(tmp_path, 1) == []


def test_source_file_that_is_not_parquet_is_permanent(server, source, tmp_path):
    (server.directory / name(4)).write_bytes(b"this is not a parquet file\n" * 1000)
    with pytest.raises(PermanentFetchError, match="not a valid shard"):
        fetch_shard(source, 4, tmp_path, FAST)
    assert server.stats(name(4)).get_requests == 1      # the sha256 matched: no point in refetching
    assert not (tmp_path / name(4)).exists() and leftovers(tmp_path, 4) == []


def test_endless_5xx_gives_a_transient_error_after_max_attempts(server, source, tmp_path):
    server.add_fault(Fault("status", file=name(0), status=503, times=None))
    policy = FetchPolicy(backoff_initial=0.001, backoff_max=0.01, max_attempts=3)
    with pytest.raises(TransientFetchError, match="503") as e:
        fetch_shard(source, 0, tmp_path, policy)
    assert e.value.attempts == 3 and "shard 00000" in str(e.value)


def test_size_over_the_cap_is_refused_before_any_get(server, source, tmp_path):
    with pytest.raises(PermanentFetchError, match="per-shard cap"):
        fetch_shard(source, 0, tmp_path, FetchPolicy(max_shard_bytes=1000))
    assert server.stats(name(0)).get_requests == 0


def test_unwritable_data_dir_is_a_clear_config_error(tmp_path, server, source):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = blocker / "data"
    with pytest.raises(ConfigError, match="cannot be created") as e:
        fetch_shard(source, 0, bad, FAST)
    assert str(bad) in str(e.value)
    if os.geteuid() != 0:               # root writes anywhere: the permission case needs a normal user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ConfigError, match="not writable"):
            fetch_shard(source, 0, ro, FAST)


def test_missing_token_gives_a_permanent_401(remote_dir, tmp_path):
    with ShardServer(remote_dir, token=TOKEN) as srv:
        with pytest.raises(PermanentFetchError, match="401.*HF_TOKEN"):
            fetch_shard(Source(srv.hub_url, SHARDS), 0, tmp_path, FAST)


# -----------------------------------------------------------------------------
# The token: sent to its host only, never in a log line or an error

def test_token_goes_to_its_host_and_never_into_logs_or_errors(remote_dir, tmp_path, caplog):
    with ShardServer(remote_dir, token=TOKEN) as srv:
        source = Source(srv.hub_url, SHARDS, token=TOKEN, token_host="127.0.0.1")
        srv.add_fault(Fault("status", file=name(0), status=503))
        srv.add_fault(Fault("reset", file=name(0), at=0.5))
        with caplog.at_level(logging.DEBUG):
            fetch_shard(source, 0, tmp_path, FAST)
            assert same_as_source(srv, tmp_path, 0)
            (srv.directory / name(1)).unlink()
            with pytest.raises(PermanentFetchError) as e:
                fetch_shard(source, 1, tmp_path, FAST)
        assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in srv.requests)
    assert len(caplog.records) > 3              # retries and urllib3's debug lines were logged
    for rec in caplog.records:
        assert TOKEN not in rec.getMessage() and TOKEN not in str(rec.args)
    assert "hf_" not in caplog.text
    for text in (str(e.value), repr(e.value), str(e.value.cause), repr(source)):
        assert TOKEN not in text


def _redirector(target_for, seen, linked=None):
    """A Hub stand-in: HEAD/GET on /<file> answer 302 to target_for(file), recording the headers seen,
    with linked(file) -> extra headers (X-Linked-*) on it, as the Hub sends. The ShardServer never
    redirects, so the host change needs this tiny server."""
    class Redirect(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self._redirect()

        def do_GET(self):
            self._redirect()

        def _redirect(self):
            seen.append((self.command, self.headers.get("Authorization")))
            self.send_response(302)
            self.send_header("Location", target_for(self.path.lstrip("/")))
            for k, v in (linked(self.path.lstrip("/")) if linked else {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
    return Redirect


def test_redirect_to_another_host_gets_no_authorization(server, tmp_path):
    seen = []
    # 127.0.0.1 (the token's host) redirects to localhost: the same machine, another host name.
    target = f"http://localhost:{server.port}/datasets/{server.hub_repo}/resolve/main/"
    with TinyServer(_redirector(lambda f: target + f, seen)) as tiny:
        source = Source(tiny.url, SHARDS, token=TOKEN, token_host="127.0.0.1")
        r = fetch_shard(source, 2, tmp_path, FAST)
    assert same_as_source(server, tmp_path, 2) and r.sha256
    assert seen and all(auth == f"Bearer {TOKEN}" for _, auth in seen)      # the token's host got it
    assert ("GET", f"Bearer {TOKEN}") in seen
    assert server.requests and all("Authorization" not in rec.headers for rec in server.requests)


def test_hub_style_redirect_with_x_linked_headers_on_the_302(server, tmp_path):
    # The Hub answers HEAD on resolve URLs with a 302 carrying X-Linked-Size/X-Linked-Etag: the HEAD
    # must not follow it (the CDN is only asked for the bytes).
    def linked(f):
        data = (server.directory / f).read_bytes()
        return {"X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                "ETag": '"hub-etag"'}
    seen = []
    with TinyServer(_redirector(lambda f: f"{server.url}/{f}", seen, linked)) as tiny:
        r = fetch_shard(Source(tiny.url, SHARDS), 3, tmp_path, FAST)
    assert same_as_source(server, tmp_path, 3) and r.sha256 == linked(name(3))["X-Linked-Etag"].strip('"')
    assert [m for m, _ in seen] == ["HEAD", "GET"]
    st = server.stats(name(3))
    assert st.head_requests == 0 and st.get_requests == 1


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http://example.com/x"])
def test_redirect_to_a_forbidden_target_is_refused(tmp_path, target):
    seen = []
    with TinyServer(_redirector(lambda f: target, seen)) as tiny:
        with pytest.raises(PermanentFetchError, match="refused a redirect"):
            fetch_shard(Source(tiny.url, SHARDS), 0, tmp_path, FAST)
    assert not (tmp_path / name(0)).exists()


# -----------------------------------------------------------------------------
# Stop, and two fetchers of one shard

def test_stop_is_honoured_mid_stall(server, source, tmp_path):
    server.add_fault(Fault("stall", file=name(4), at=0.5, seconds=60))
    slow = FetchPolicy(stall_timeout=60, chunk_bytes=16384)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(FetchCancelled):
        fetch_shard(source, 4, tmp_path, slow, stop=stop)
    assert time.monotonic() - t0 < 2.5
    parts = list(tmp_path.glob(f"{name(4)}.*.partial"))
    have = parts[0].stat().st_size if len(parts) == 1 else 0
    assert have > 0                                                 # left to resume
    r = fetch_shard(source, 4, tmp_path, FAST)
    assert r.resumed_from == have
    assert same_as_source(server, tmp_path, 4)


def test_stop_is_honoured_during_backoff(server, source, tmp_path):
    server.add_fault(Fault("status", file=name(0), status=503, times=None))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(FetchCancelled):
        fetch_shard(source, 0, tmp_path, FetchPolicy(backoff_initial=30, backoff_max=30), stop=stop)
    assert time.monotonic() - t0 < 2


def test_two_fetchers_of_one_shard_download_it_once(server, source, tmp_path):
    server.set_rate(1.0)                # ~0.6 s for the shard, so the two overlap
    results, errors = [], []

    def go():
        try:
            results.append(fetch_shard(source, 3, tmp_path, FAST))
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert sorted(r.already_present for r in results) == [False, True]
    assert server.stats(name(3)).get_requests == 1
    assert same_as_source(server, tmp_path, 3)


def test_on_bytes_sees_every_byte(server, source, tmp_path):
    got = []
    fetch_shard(source, 0, tmp_path, FAST, on_bytes=got.append)
    assert sum(got) == (server.directory / name(0)).stat().st_size


# -----------------------------------------------------------------------------
# A hostile or broken server, and a full disk

def test_body_without_length_that_never_ends_hits_the_size_cap(tmp_path):
    # The ShardServer always sends Content-Length; only a tiny server can stream without end.
    with TinyServer(EndlessHandler) as tiny:
        with pytest.raises(PermanentFetchError, match="per-shard cap"):
            fetch_shard(Source(tiny.url, SHARDS), 0, tmp_path, FetchPolicy(max_shard_bytes=1 << 20, backoff_initial=0.01))
    assert not (tmp_path / name(0)).exists() and leftovers(tmp_path, 0) == []


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (smaller than a sample shard); skipped where mounting is not allowed."""
    d = tmp_path / "tiny"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)


def test_disk_full_is_a_clear_error_and_leaves_no_partial(server, source, tiny_fs):
    from shardstream.errors import DiskSpaceError
    with pytest.raises(DiskSpaceError, match="disk full") as e:
        fetch_shard(source, 0, tiny_fs, FAST)
    assert "shard 00000" in str(e.value)
    assert not (tiny_fs / name(0)).exists() and leftovers(tiny_fs, 0) == []


def test_partial_file_deleted_under_a_fetch_is_started_over(server, source, tmp_path):
    size = (server.directory / name(2)).stat().st_size
    server.add_fault(Fault("truncate", file=name(2), at=0.5))

    def delete_partials(n):
        for p in tmp_path.glob(f"{name(2)}.*.partial"):
            p.unlink()
    deleted = []
    # delete the partial after the first (truncated) GET, as a careless cleaner might
    r = fetch_shard(source, 2, tmp_path, FAST,
                    on_bytes=lambda n: deleted or (deleted.append(n), delete_partials(n)))
    assert same_as_source(server, tmp_path, 2)
    assert server.stats(name(2)).ranges[-1] == (0, size)
    assert r.size == size


TWO_PROCS = """
import sys
from shardstream.fetch import FetchPolicy, fetch_shard
from shardstream.source import Source
r = fetch_shard(Source(sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), sys.argv[4], FetchPolicy(chunk_bytes=16384))
print("present" if r.already_present else "fetched")
"""


def test_two_processes_fetch_one_shard_once(server, tmp_path):
    server.set_rate(0.5)                # ~1.1 s for the shard, so the two overlap
    cmd = [sys.executable, "-c", TWO_PROCS, server.hub_url, str(SHARDS), "4", str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["fetched", "present"]
    assert server.stats(name(4)).get_requests == 1
    assert same_as_source(server, tmp_path, 4)
