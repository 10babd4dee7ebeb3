"""Never wrong, never stuck: a resume never splices two versions of a file, a shard without a checksum is
said to be one (or refused), a trickle is a stall, bytes are on disk as they arrive, and nothing is
written through a planted link or committed over a directory. Real hostile servers on 127.0.0.1
(rel_common.HostileServer), real parquet shards, real files."""
import logging
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rel_common import HostileFile, HostileServer, make_shards, until
from shardstream import layout
from shardstream.errors import CorruptShardError, PermanentFetchError, TransientFetchError, UnsafePathError
from shardstream.fetch import FetchPolicy, fetch_shard
from shardstream.shards import shard_name
from shardstream.source import Source
from shardstream.verify import check_parquet, decode_parquet

FAST = FetchPolicy(backoff_initial=0.01, backoff_max=0.05, stall_timeout=5, fsync=False)


def name(i):
    return shard_name(i)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two real shards of the same size (version A and version B of one file on the server)."""
    d = tmp_path_factory.mktemp("versions")
    make_shards(d, 2, chars=200_000)
    a, b = (d / name(0)).read_bytes(), (d / name(1)).read_bytes()
    if len(a) != len(b):                # same size, other bytes: what a replaced file looks like
        b = _same_size_shard(d, len(a))
    assert len(a) == len(b) and a != b
    return a, b


def _same_size_shard(d, size):
    """A valid shard of exactly `size` bytes, different from shard 0 (a parquet file may carry key-value
    metadata: grow it until the sizes agree)."""
    table = pq.read_table(d / name(1))
    for pad in range(0, 200_000):
        t = table.replace_schema_metadata({"pad": "x" * pad})
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink, compression="zstd", row_group_size=16)
        buf = sink.getvalue().to_pybytes()
        if len(buf) == size:
            return buf
        if len(buf) > size:
            table = table.slice(0, table.num_rows - 1)
    raise AssertionError("could not make a same-size shard")


def _source(srv, shards=2):
    return Source(srv.url, shards)


def _fetch(srv, tmp_path, policy=FAST, **kw):
    return fetch_shard(_source(srv), 0, tmp_path, policy, **kw)


# -----------------------------------------------------------------------------
# Resume never splices two versions

@pytest.mark.parametrize("validators", ["etag", "last_modified"])
def test_file_replaced_between_reset_and_resume_is_fetched_whole_from_the_new_version(versions, tmp_path, validators):
    a, b = versions
    kw = {"etag": '"v1"'} if validators == "etag" else {"last_modified": "Mon, 01 Jan 2024 00:00:00 GMT"}
    f = HostileFile(a, **kw)

    def replace_it():
        f.body = b
        if validators == "etag":
            f.etag = '"v2"'
        else:
            f.last_modified = "Tue, 02 Jan 2024 00:00:00 GMT"

    f.drop_after, f.after_drop = len(a) // 2, replace_it
    with HostileServer({name(0): f}) as srv:
        r = _fetch(srv, tmp_path)
    assert (tmp_path / name(0)).read_bytes() == b, "the final file must be one version, never a splice"
    assert r.checked == "size+footer"
    resume = f.gets[1]
    assert resume.get("Range") == f"bytes={len(a) // 2}-"
    assert resume.get("If-Range") == ('"v1"' if validators == "etag" else "Mon, 01 Jan 2024 00:00:00 GMT")


def test_server_that_ignores_if_range_and_serves_the_new_version_is_caught_by_its_etag(versions, tmp_path):
    a, b = versions
    f = HostileFile(a, etag='"v1"')
    f.honor_if_range = False            # a 206 of the new file's bytes, with the new ETag

    def replace_it():
        f.body, f.etag = b, '"v2"'

    f.drop_after, f.after_drop = len(a) // 3, replace_it
    with HostileServer({name(0): f}) as srv:
        _fetch(srv, tmp_path)
    assert (tmp_path / name(0)).read_bytes() == b
    assert [g.get("Range") for g in f.gets][-1] is None, "a changed file starts over from byte 0"


def test_no_validator_and_no_checksum_means_no_resume(versions, tmp_path):
    a, b = versions
    f = HostileFile(a)                  # no ETag, no Last-Modified, no checksum: nothing to resume against

    def replace_it():
        f.body = b

    f.drop_after, f.after_drop = len(a) // 2, replace_it
    with HostileServer({name(0): f}) as srv:
        r = _fetch(srv, tmp_path)
    assert (tmp_path / name(0)).read_bytes() == b
    assert all(g.get("Range") is None for g in f.gets), f.gets
    assert r.resumed_from == 0


def test_a_weak_etag_is_no_validator(versions, tmp_path):
    a, b = versions
    f = HostileFile(a, etag='W/"v1"')

    def replace_it():
        f.body = b

    f.drop_after, f.after_drop = len(a) // 2, replace_it
    with HostileServer({name(0): f}) as srv:
        _fetch(srv, tmp_path)
    assert (tmp_path / name(0)).read_bytes() == b
    assert all(g.get("Range") is None for g in f.gets)


def test_resume_against_an_unchanged_file_still_resumes(versions, tmp_path):
    a, _ = versions
    f = HostileFile(a, etag='"v1"')
    f.drop_after = len(a) // 2
    with HostileServer({name(0): f}) as srv:
        r = _fetch(srv, tmp_path)
    assert (tmp_path / name(0)).read_bytes() == a
    assert f.gets[1].get("Range") == f"bytes={len(a) // 2}-" and f.gets[1].get("If-Range") == '"v1"'
    assert r.bytes_downloaded == len(a)


def test_a_lying_206_without_checksum_is_caught_only_by_the_footer_and_fetched_again(versions, tmp_path):
    a, _ = versions
    f = HostileFile(a, etag='"v1"')
    f.drop_after = len(a) // 2

    def lie_once():
        f.range_shift = 1000            # the next 206 says it starts at the asked offset, but does not

    f.after_drop = lie_once
    with HostileServer({name(0): f}) as srv:
        r = _fetch(srv, tmp_path)
        f.range_shift = 0
    assert (tmp_path / name(0)).read_bytes() == a
    # The lie passed the size check; only the footer (which it garbled) caught it, so the shard was
    # fetched whole again. Without a checksum that is all anyone can say, and the result says so.
    assert [g.get("Range") for g in f.gets] == [None, f"bytes={len(a) // 2}-", None]
    assert r.checked == "size+footer"


# -----------------------------------------------------------------------------
# No silent unverified shards

def test_no_checksum_is_said_once_and_recorded_per_shard(versions, tmp_path, caplog):
    a, b = versions
    files = {name(0): HostileFile(a, etag='"a"'), name(1): HostileFile(b, etag='"b"')}
    with caplog.at_level(logging.WARNING, logger="shardstream.fetch"), HostileServer(files) as srv:
        src = Source(srv.url + "/", 2)
        rs = [fetch_shard(src, i, tmp_path, FAST) for i in (0, 1)]
    assert [r.checked for r in rs] == ["size+footer", "size+footer"]
    said = [r.getMessage() for r in caplog.records if "gives no checksum" in r.getMessage()]
    assert len(said) == 1, said
    assert "SHA256SUMS" in said[0] and "require_checksum" in said[0]


def test_require_checksum_refuses_a_shard_without_one(versions, tmp_path):
    a, _ = versions
    f = HostileFile(a, etag='"a"')
    with HostileServer({name(0): f}) as srv:
        with pytest.raises(PermanentFetchError, match="checksum is required"):
            _fetch(srv, tmp_path, FetchPolicy(require_checksum=True, fsync=False))
    assert not f.gets, "refused before any byte was asked for"
    assert not list(tmp_path.iterdir()) or not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_require_checksum_accepts_a_sha256sums_file(versions, tmp_path):
    import hashlib
    a, _ = versions
    sums = f"{hashlib.sha256(a).hexdigest()}  {name(0)}\n".encode()
    files = {name(0): HostileFile(a, etag='"a"'), "SHA256SUMS": HostileFile(sums)}
    with HostileServer(files) as srv:
        r = _fetch(srv, tmp_path, FetchPolicy(require_checksum=True, fsync=False))
    assert r.checked == "sha256"


def _checksummed_shard(tmp_path):
    """A shard written with parquet page checksums, and a copy with one byte flipped inside a data page
    (the footer still parses: only reading the pages can tell)."""
    table = pa.table({"text": [("doc %d " % i) * 200 for i in range(64)]})
    path = tmp_path / "src.parquet"
    pq.write_table(table, path, compression="zstd", row_group_size=16, write_page_checksum=True)
    good = path.read_bytes()
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    for at in range(start + col.total_compressed_size // 2, start + col.total_compressed_size):
        bad = bytearray(good)
        bad[at] ^= 0xFF
        path.write_bytes(bad)
        check_parquet(path)             # the footer is untouched: it passes
        try:
            decode_parquet(path)
        except CorruptShardError:
            return good, bytes(bad)
    raise AssertionError("no flipped byte that only decoding catches")


def test_decode_level_catches_a_flipped_byte_the_footer_cannot(tmp_path):
    good, bad = _checksummed_shard(tmp_path)
    f = HostileFile(bad, etag='"x"')
    with HostileServer({name(0): f}) as srv:
        r = _fetch(srv, tmp_path / "footer")
        assert r.checked == "size+footer"       # the flip passes size + footer: the level says so
        with pytest.raises(PermanentFetchError, match="does not decode"):
            _fetch(srv, tmp_path / "decode", FetchPolicy(verify="decode", fsync=False, backoff_initial=0.01,
                                                          backoff_max=0.05))
    assert not (tmp_path / "decode" / name(0)).exists()
    assert not [p for p in (tmp_path / "decode").iterdir() if ".partial" in p.name]
    f = HostileFile(good, etag='"y"')
    with HostileServer({name(0): f}) as srv:
        r = _fetch(srv, tmp_path / "decode", FetchPolicy(verify="decode", fsync=False))
    assert r.checked == "size+footer+decode"


def test_bad_verify_level_is_a_config_error():
    with pytest.raises(ValueError, match="verify must be one of footer, decode"):
        FetchPolicy(verify="paranoid")


# -----------------------------------------------------------------------------
# A trickle is a stall; bytes are on disk as they arrive

def _in_thread(fn):
    out = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:      # handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_trickle_is_abandoned_and_resumed_then_given_up(versions, tmp_path):
    a, _ = versions
    f = HostileFile(a, etag='"v1"')
    f.trickle = 50                      # bytes a second: far under the floor, yet never a silent socket
    policy = FetchPolicy(low_speed_limit=1000, low_speed_time=0.6, max_attempts=3, backoff_initial=0.01,
                         backoff_max=0.02, stall_timeout=30, fsync=False)
    retries = []
    with HostileServer({name(0): f}) as srv:
        t, out = _in_thread(lambda: _fetch(srv, tmp_path, policy, on_retry=retries.append))
        t.join(20)
        assert not t.is_alive(), "a trickle held the fetch (the stall timeout never trips on it)"
    assert isinstance(out.get("error"), TransientFetchError), out
    assert "too slow" in str(out["error"])
    assert len(retries) == 2 and all("too slow" in c for c in retries)
    assert any(g.get("Range") for g in f.gets[1:]), "each new connection resumes where the last one ended"


def test_a_healthy_slow_link_never_trips_the_default_floor():
    p = FetchPolicy()
    assert p.low_speed_limit <= 1024 and p.low_speed_time >= 30     # 1 KB/s for 30 s: a dead link only


def test_bytes_are_on_disk_as_they_arrive(versions, tmp_path):
    a, _ = versions
    f = HostileFile(a, etag='"v1"')
    part = len(a) // 2
    assert part < FAST.chunk_bytes
    f.hold_after = part                 # less than one 1 MiB buffer, then silence
    seen = []
    stop = threading.Event()
    with HostileServer({name(0): f}) as srv:
        t, out = _in_thread(lambda: _fetch(srv, tmp_path, stop=stop, on_bytes=seen.append))

        def partial_size():
            ps = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
            return ps and ps[0].stat().st_size

        until(lambda: partial_size() == part, timeout=10, what="the received bytes in the partial file")
        until(lambda: sum(seen) == part, timeout=5, what="on_bytes to hear of them")
        stop.set()
        f.release.set()
        t.join(10)
    assert not t.is_alive()


# -----------------------------------------------------------------------------
# The data dir is shared ground

def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(versions, tmp_path):
    a, _ = versions
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep me")
    d = tmp_path / "data"
    layout.book_dir(d).mkdir(parents=True)
    os.symlink(outside, layout.lock_path(d, 0))
    f = HostileFile(a, etag='"v1"')
    with HostileServer({name(0): f}) as srv:
        with pytest.raises(PermanentFetchError, match="symbolic link") as e:
            _fetch(srv, d)
    assert str(layout.lock_path(d, 0)) in str(e.value)
    assert outside.read_bytes() == b"keep me" and not f.gets


def test_a_planted_partial_symlink_is_never_written_through(versions, tmp_path):
    import json
    a, _ = versions
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep me")
    d = tmp_path / "data"
    d.mkdir()
    p = d / f"{name(0)}.1-deadbeef.partial"
    os.symlink(outside, p)
    (d / (p.name + ".json")).write_text(json.dumps({"size": len(a), "sha256": None, "etag": '"v1"'}))
    with HostileServer({name(0): HostileFile(a, etag='"v1"')}) as srv:
        _fetch(srv, d)
    assert outside.read_bytes() == b"keep me"
    assert (d / name(0)).read_bytes() == a


def test_a_planted_lease_symlink_is_refused(tmp_path):
    from shardstream.cache import ShardCache
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep me")
    d = tmp_path / "data"
    d.mkdir()
    (d / name(0)).write_bytes(b"x")
    layout.book_dir(d).mkdir()
    os.symlink(outside, layout.lease_path(d, 0))
    cache = ShardCache(d)
    cache.scan()
    with pytest.raises(UnsafePathError, match="symbolic link"):
        cache.lease(0, 0)
    assert outside.read_bytes() == b"keep me"


def test_a_directory_under_the_final_name_is_an_error_before_any_download(versions, tmp_path):
    a, _ = versions
    (tmp_path / name(0)).mkdir()
    f = HostileFile(a, etag='"v1"')
    with HostileServer({name(0): f}) as srv:
        with pytest.raises(PermanentFetchError, match="is a directory"):
            _fetch(srv, tmp_path)
    assert not f.gets


def test_a_failed_commit_leaves_no_verified_partial(versions, tmp_path):
    a, _ = versions

    def plant_dir(n):                   # someone makes a directory at the final name mid-download
        if not (tmp_path / name(0)).exists():
            (tmp_path / name(0)).mkdir()

    with HostileServer({name(0): HostileFile(a, etag='"v1"')}) as srv:
        with pytest.raises(PermanentFetchError, match="is a directory"):
            _fetch(srv, tmp_path, on_bytes=plant_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name(0), layout.BOOK_DIR])
    assert not list(layout.book_dir(tmp_path).iterdir())


# -----------------------------------------------------------------------------
# The same rules for an fsspec source, and the downloader's deadline for a transfer in flight

def test_an_object_changed_between_ranged_reads_is_never_committed_spliced(versions, tmp_path):
    from shardstream.listing import make_source
    a, b = versions
    src_dir = tmp_path / "store"
    src_dir.mkdir()
    (src_dir / name(0)).write_bytes(a)
    (src_dir / name(1)).write_bytes(a)
    source = make_source(str(src_dir))
    changed = []

    def change_once(n):                 # the store's object is replaced after the first block was read
        if not changed:
            changed.append(n)
            (src_dir / name(0)).write_bytes(b)
            st = os.stat(src_dir / name(0))
            os.utime(src_dir / name(0), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    policy = FetchPolicy(chunk_bytes=4096, backoff_initial=0.01, backoff_max=0.02, fsync=False)
    with pytest.raises(PermanentFetchError, match="changed since this run started"):
        fetch_shard(source, 0, tmp_path / "data", policy, on_bytes=change_once)
    assert changed and not (tmp_path / "data" / name(0)).exists()


def test_the_deadline_applies_to_a_download_in_flight_that_keeps_failing(versions, tmp_path):
    from shardstream.downloader import FailurePolicy, StreamingDownloader
    a, _ = versions
    files = {name(0): HostileFile(a, etag='"a"'), name(1): HostileFile(a, etag='"b"')}
    for f in files.values():
        f.trickle = 50                  # never silent, never done
    fetch = FetchPolicy(low_speed_limit=1000, low_speed_time=0.4, max_attempts=None, backoff_initial=0.01,
                        backoff_max=0.02, fsync=False)
    with HostileServer(files) as srv:
        dl = StreamingDownloader(1, data_dir=tmp_path / "data", source=Source(srv.url, 2), fetch_policy=fetch,
                                 failure_policy=FailurePolicy("fail", deadline=1.5, warn_every=1.0),
                                 initial_buffer=0, progress=False)
        with dl:
            t, out = _in_thread(lambda: dl.wait_for_shard(0))
            t.join(20)
            assert not t.is_alive(), "the reader waited past the deadline on a transfer that kept failing"
    e = out.get("error")
    assert isinstance(e, TransientFetchError), out
    assert "in flight" in str(e) and "too slow" in str(e)


def test_a_planted_fifo_is_refused_not_waited_on(tmp_path):
    from shardstream.safefs import fopen_nofollow
    fifo = tmp_path / "events.jsonl"
    os.mkfifo(fifo)
    t, out = _in_thread(lambda: fopen_nofollow(fifo, "a"))
    t.join(5)
    assert not t.is_alive(), "opening a planted fifo blocked"
    assert isinstance(out.get("error"), UnsafePathError) and "not a regular file" in str(out["error"])


# -----------------------------------------------------------------------------
# A source that never answered is said within seconds, not retried for minutes

def _closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]          # closed once we return: connections are refused


def test_a_source_that_never_answered_is_said_within_seconds_and_retried(tmp_path, caplog):
    from shardstream.errors import SourceUnreachable
    src = Source(f"http://127.0.0.1:{_closed_port()}/x", 3)
    seen = []
    policy = FetchPolicy(max_attempts=6, backoff_initial=1.0, backoff_max=2.0, fsync=False)
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="shardstream.fetch"):
        t, out = _in_thread(lambda: fetch_shard(src, 0, tmp_path, policy))
        until(lambda: any("has not answered once" in r.getMessage() for r in caplog.records), timeout=10,
              what="the unreachable line")
        seen.append(time.monotonic() - t0)
        t.join(30)
    said = [r.getMessage() for r in caplog.records if "has not answered once" in r.getMessage()]
    assert len(said) == 1 and seen[0] < 10
    assert "--source" in said[0] and "./run demo" in said[0] and "shardstream serve" in said[0]
    e = out.get("error")
    assert isinstance(e, SourceUnreachable) and e.attempts == 6, out      # it went on retrying, then said it again
    assert "has not answered once" in str(e)


def test_the_downloader_says_it_at_start_and_keeps_trying(tmp_path, caplog):
    from shardstream.downloader import StreamingDownloader
    dl = StreamingDownloader(2, data_dir=tmp_path / "d", source=f"http://127.0.0.1:{_closed_port()}/x",
                             dataset_shards=3, progress=False, min_free_bytes=0, warn_free_bytes=0,
                             initial_buffer=0, start_at=0)
    with caplog.at_level(logging.ERROR, logger="shardstream.fetch"), dl:
        until(lambda: any("has not answered once" in r.getMessage() for r in caplog.records), timeout=12,
              what="the unreachable line")
        assert dl.get_status().state == "running"


def test_a_host_that_answered_before_is_retried_as_a_blip(versions, tmp_path):
    from shardstream.errors import SourceUnreachable
    a, _ = versions
    files = {name(0): HostileFile(a, etag='"a"'), name(1): HostileFile(a, etag='"b"')}
    with HostileServer(files) as srv:
        src = Source(srv.url, 2)
        fetch_shard(src, 0, tmp_path, FAST)             # it answered once
    policy = FetchPolicy(max_attempts=4, backoff_initial=0.01, backoff_max=0.02, fsync=False)
    with pytest.raises(TransientFetchError) as e:       # now it is down: the usual retries, then the usual error
        fetch_shard(src, 1, tmp_path, policy)
    assert not isinstance(e.value, SourceUnreachable) and e.value.attempts == 4
