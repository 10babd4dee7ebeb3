"""The fault matrix, end to end: a real ShardServer misbehaving, a StreamingDownloader under a budget, and a
loader-style reader (wait_for_shard, read every row group, release). Each case ends with every shard the
reader read byte-identical to the source (sha256) and no error reaching the reader; the 404 cases end
with the failure policy's clear error or a recorded skip.

test_fetch.py proves each fault kind on ONE fetch; here they strike while a window of shards streams past
a reader, with retries, eviction and the budget all running. The outage case has a slow form
(`-m slow`: the server down for 45 s while the buffer lasts).
"""
import logging
import time

import pytest

from rel_common import check_final_files, faults_struck, make_shards, partial_files, read_shard, \
    shard_bytes_on_disk, tally
from shardstream.downloader import DiskPolicy, FailurePolicy, StreamingDownloader
from shardstream.errors import PermanentFetchError, ShardSkipped, ShardStreamError
from shardstream.fetch import FetchPolicy
from shardstream.server import Fault, ShardServer
from shardstream.shards import shard_name
from shardstream.source import Source
from shardstream.status import read_events, read_status

N = 13                          # 12 train shards + val shard 12
VAL = N - 1
TRAIN = list(range(VAL))
# Short timeouts and tiny backoffs: a stall is noticed in 0.5 s, a retry costs milliseconds.
FETCH = FetchPolicy(connect_timeout=2, stall_timeout=0.5, max_attempts=None, backoff_initial=0.01,
                    backoff_max=0.1, chunk_bytes=4096)
FAST_FAIL = dict(retry_initial=0.02, retry_max=0.2)
NO_FLOOR = DiskPolicy(warn_free_bytes=0, min_free_bytes=0)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix-remote")
    return d, make_shards(d, N, seed=5)


@pytest.fixture
def srv(remote):
    with ShardServer(remote[0]) as s:
        yield s


def downloader(srv, tmp_path, *, policy="fail", deadline=30.0, budget_shards=6, **kw):
    d = srv.directory
    biggest = max((d / shard_name(i)).stat().st_size for i in range(N))
    kw.setdefault("buffer_size", 3)
    kw.setdefault("workers", 2)
    return StreamingDownloader(
        len(TRAIN), data_dir=tmp_path / "data", source=Source(srv.hub_url, N), fetch_policy=FETCH,
        failure_policy=FailurePolicy(policy, deadline=deadline, warn_every=1.0, **FAST_FAIL),
        disk_policy=NO_FLOOR, max_cache_bytes=budget_shards * biggest, progress=False, **kw)


def read_all(dl, shas, order=TRAIN, *, pause=0.0, on_read=None):
    """The reader: every shard of `order` in turn, checked against the source. Returns (bytes, shards,
    skipped ids). Any error but ShardSkipped reaches the caller (and fails the test)."""
    nbytes, shards, skipped, peak = 0, 0, [], 0
    data_dir = dl.data_dir
    for i in order:
        try:
            path = dl.wait_for_shard(i, timeout=60)
        except ShardSkipped:
            skipped.append(i)
            continue
        digest, rows = read_shard(path)
        assert digest == shas[i], f"shard {i}: the reader got bytes that are not the source's"
        assert rows == 32
        nbytes += path.stat().st_size
        shards += 1
        peak = max(peak, shard_bytes_on_disk(data_dir))
        if on_read is not None:
            on_read(i)
        if pause:
            time.sleep(pause)
        dl.release(i)
    budget = dl.window.max_cache_bytes
    assert budget is None or peak <= budget, f"disk {peak} over the budget {budget}"
    return nbytes, shards, skipped


def finish(case, srv, dl, shas, nbytes, shards, *, min_faults=1, skipped=()):
    """Common end of a case: faults really struck, nothing lost, no partial left, the data dir clean."""
    struck = faults_struck(srv)
    assert struck >= min_faults, f"{case}: only {struck} faults struck"
    lost = len(TRAIN) - shards - len(skipped)
    assert lost == 0
    data = dl.data_dir
    assert partial_files(data) == []
    nbytes += check_final_files(data, shas)         # what stayed on disk is the source's too
    st = read_status(data)
    assert st.state == "stopped" and st.failures == len(skipped)
    tally(f"fault_matrix/{case}", faults=struck, bytes_verified=nbytes, shards_read=shards, lost=lost)


# -----------------------------------------------------------------------------
# Noise the run must ride out: every shard read, byte-identical, no error

NOISE = {
    "reset-mid-body": [Fault("reset", file=shard_name(1), at=0.5, times=2), Fault("reset", file=shard_name(4), at=0.1),
                       Fault("reset", file=shard_name(VAL), at=0.9)],
    "5xx-bursts": [Fault("status", status=500, times=3, method="*"), Fault("status", status=502, times=3, method="*"),
                   Fault("status", status=503, times=4, method="*")],
    "stall": [Fault("stall", file=shard_name(2), at=0.4, seconds=3), Fault("stall", file=shard_name(7), at=0.0, seconds=3)],
    "truncate": [Fault("truncate", file=shard_name(i), at=a) for i, a in ((0, 0.3), (3, 0.6), (3, 0.9), (9, 0.01))],
    "flip": [Fault("flip", file=shard_name(1), at=0.7), Fault("flip", file=shard_name(5), at=0.0),
             Fault("flip", file=shard_name(5), at=0.99)],
    "wrong-length": [Fault("wrong_length", file=shard_name(i)) for i in (0, 2, 6, VAL)],
    "mixed": [Fault("reset", file=shard_name(3), at=0.2), Fault("truncate", file=shard_name(3), at=0.5),
              Fault("flip", file=shard_name(3), at=0.8), Fault("status", status=502, file=shard_name(8), method="*"),
              Fault("stall", file=shard_name(8), at=0.5, seconds=3), Fault("wrong_length", file=shard_name(10))],
}


@pytest.mark.parametrize("case", list(NOISE))
def test_noise_is_ridden_out_and_every_read_is_the_source(srv, remote, tmp_path, case):
    shas = remote[1]
    for f in NOISE[case]:
        srv.add_fault(f)
    expected = sum(f.times for f in NOISE[case])
    with downloader(srv, tmp_path) as dl:
        nbytes, shards, skipped = read_all(dl, shas)
        st = dl.get_status()
    assert skipped == [] and shards == len(TRAIN)
    assert srv.faults == [], f"{case}: some scripted faults never struck: {srv.faults}"
    assert faults_struck(srv) == expected
    assert st.error is None and st.failures == 0
    finish(case, srv, dl, shas, nbytes, shards, min_faults=expected)


def test_429_with_retry_after_is_honoured_by_the_downloader(srv, remote, tmp_path):
    shas = remote[1]
    srv.add_fault(Fault("429", file=shard_name(2), retry_after=1, method="GET", times=2))
    t0 = time.monotonic()
    with downloader(srv, tmp_path) as dl:
        nbytes, shards, _ = read_all(dl, shas)
    # Two Retry-After: 1 in a row on shard 2: it cannot have arrived in under ~2 s (the fetch's own
    # backoff is at most 0.1 s), and it did arrive.
    assert time.monotonic() - t0 >= 1.9
    assert srv.stats(shard_name(2)).faults == 2
    finish("429-retry-after", srv, dl, shas, nbytes, shards, min_faults=2)


# -----------------------------------------------------------------------------
# The server down for a while, while the buffer lasts

def _outage_case(srv, remote, tmp_path, caplog, outage_s, case):
    """Fill a window of 10 shards, take the server down for outage_s, read on at a pace that makes the
    buffer last through it: the reader never waits, and the run goes on once the server is back."""
    shas = remote[1]
    caplog.set_level(logging.INFO, logger="shardstream.fetch")
    ahead = 10
    pace = (outage_s + 1.0) / (ahead - 1)
    with downloader(srv, tmp_path, buffer_size=ahead, initial_buffer=ahead, budget_shards=ahead + 3) as dl:
        # val shard too (priority right after the first window shard): the whole buffer is on disk now
        t_end = time.monotonic() + 20
        while dl.get_status().ahead < ahead - 1 and time.monotonic() < t_end:
            time.sleep(0.05)
        srv.outage(outage_s)
        t_down, wall_down = time.monotonic(), time.time()
        waits_before = dl.get_status().waits
        nbytes, shards, _ = read_all(dl, shas, pause=pace)
        st = dl.get_status()
    assert time.monotonic() - t_down >= outage_s               # the reader really ran through the outage
    assert st.waits == waits_before, f"the reader waited {st.waits - waits_before} times during the outage"
    # The window moved on during the outage: some download started while the server was down, failed
    # (the fetch retried it: logged by shardstream.fetch) and finished once the server was back.
    events = read_events(dl.data_dir)
    started = {e["shard"]: e["t"] for e in events if e["event"] == "download_start"}
    met = [e["shard"] for e in events if e["event"] == "downloaded" and e["shard"] in started
           and started[e["shard"]] < wall_down + outage_s <= e["t"]]
    assert met, "no download met the outage"
    retries = [r for r in caplog.records if r.name == "shardstream.fetch" and "failed" in r.getMessage()
               or "resuming at byte" in r.getMessage()]
    assert retries, "the fetch never retried during the outage"
    lost = len(TRAIN) - shards
    assert lost == 0 and partial_files(dl.data_dir) == []
    nbytes += check_final_files(dl.data_dir, shas)
    tally(f"fault_matrix/{case}", faults=1, bytes_verified=nbytes, shards_read=shards, lost=lost)    # one outage


def test_outage_while_the_buffer_lasts_quick(srv, remote, tmp_path, caplog):
    _outage_case(srv, remote, tmp_path, caplog, 3.0, "outage-3s")


@pytest.mark.slow
def test_outage_while_the_buffer_lasts_slow(srv, remote, tmp_path, caplog):
    _outage_case(srv, remote, tmp_path, caplog, 45.0, "outage-45s")


# -----------------------------------------------------------------------------
# A shard that is gone (404) under each failure policy

def test_404_under_fail_is_a_clear_error_after_the_good_shards(srv, remote, tmp_path):
    shas = remote[1]
    srv.add_fault(Fault("404", file=shard_name(5), times=None))
    read = []
    with downloader(srv, tmp_path) as dl:
        with pytest.raises(PermanentFetchError) as ei:
            read_all(dl, shas, on_read=read.append)
        st = dl.get_status()
    msg = str(ei.value)
    assert ei.value.shard_id == 5 and "shard_00005.parquet" in msg and "404" in msg and srv.hub_url in msg
    assert read == [0, 1, 2, 3, 4]                     # everything before it was read, and verified
    assert st.failures == 1 and st.state == "running"    # a permanent failure is not a crash
    # nothing of shard 5 on disk (a stop mid-transfer may leave another shard's resumable partial)
    assert not (dl.data_dir / shard_name(5)).exists()
    assert not [p for p in partial_files(dl.data_dir) if p.startswith(shard_name(5))]
    nbytes = check_final_files(dl.data_dir, shas)
    tally("fault_matrix/404-fail", faults=faults_struck(srv), bytes_verified=nbytes, shards_read=len(read))


def test_404_under_skip_is_recorded_and_the_rest_is_read(srv, remote, tmp_path, caplog):
    shas = remote[1]
    for i in (4, 9):
        srv.add_fault(Fault("404", file=shard_name(i), times=None))
    with caplog.at_level(logging.ERROR, logger="shardstream.downloader"):
        with downloader(srv, tmp_path, policy="skip") as dl:
            nbytes, shards, skipped = read_all(dl, shas)
    assert skipped == [4, 9] and shards == len(TRAIN) - 2
    assert "SKIPPING shard_00004.parquet" in caplog.text and "SKIPPING shard_00009.parquet" in caplog.text
    st = read_status(dl.data_dir)
    assert st.skipped == (4, 9)
    assert sorted(e["shard"] for e in read_events(dl.data_dir) if e["event"] == "skipped") == [4, 9]
    finish("404-skip", srv, dl, shas, nbytes, shards, min_faults=2, skipped=skipped)


def test_404_under_wait_keeps_waiting_until_the_shard_is_back(srv, remote, tmp_path, caplog):
    shas = remote[1]
    srv.add_fault(Fault("404", file=shard_name(3), times=6))
    with caplog.at_level(logging.WARNING, logger="shardstream.downloader"):
        with downloader(srv, tmp_path, policy="wait", deadline=0.1) as dl:
            nbytes, shards, skipped = read_all(dl, shas)
    assert skipped == [] and shards == len(TRAIN)
    assert srv.stats(shard_name(3)).faults == 6
    assert "shard_00003.parquet failed" in caplog.text
    finish("404-wait", srv, dl, shas, nbytes, shards, min_faults=6)


def test_no_fault_reaches_the_reader_as_anything_but_the_policys_error(srv, remote, tmp_path):
    """A sanity bound on the matrix: with every NOISE kind at once on one shard, the reader sees no
    ShardStreamError at all."""
    shas = remote[1]
    for kind in ("reset", "truncate", "flip", "stall", "wrong_length"):
        srv.add_fault(Fault(kind, file=shard_name(6), at=0.5, seconds=3))
    srv.add_fault(Fault("status", status=503, file=shard_name(6), method="*"))
    srv.add_fault(Fault("429", retry_after=0, file=shard_name(6), method="*"))
    with downloader(srv, tmp_path) as dl:
        try:
            nbytes, shards, _ = read_all(dl, shas)
        except ShardStreamError as e:       # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"an error reached the reader: {type(e).__name__}: {e}")
    assert srv.stats(shard_name(6)).faults == 7 and srv.faults == []
    finish("all-kinds-one-shard", srv, dl, shas, nbytes, shards, min_faults=7)
