"""Split fetches: one shard over several concurrent Range requests into one preallocated partial file,
against the real ShardServer with a per-connection cap (as CDNs cap each connection). The decisions are
pure functions (plan_parts, steal_point, auto_parts) tested on their own; the transfers are checked
byte for byte and by the spans the server sent: a fault on one part resumes that part only, a file
replaced mid-fetch restarts the shard (never a splice), kill -9 then a resume fetches only the bytes the
sidecar did not record, and small shards stay one request."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from rel_common import OverlapServer, until
from shardstream import layout
from shardstream.errors import ConfigError, FetchCancelled
from shardstream.fetch import VERDICTS, FetchPolicy, fetch_shard
from shardstream.source import url_origin
from shardstream.parts import (AUTO_MEMORY, Verdict, auto_parts, judged_parts, merge_spans, missing_spans, plan_parts,
                               remembered_parts, split_point, steal_point)
from shardstream.server import Fault
from shardstream.source import Source

SHARDS = 6
MIN = 64 << 10                  # parts of the ~0.6 MB sample shards: at least 64 KiB
SPLIT = FetchPolicy(connect_timeout=2.0, stall_timeout=1.0, backoff_initial=0.01, backoff_max=0.05,
                    max_connections=4, min_part_bytes=MIN)


def name(i):
    return f"shard_{i:05d}.parquet"


def leftovers(data_dir, i):
    return sorted(p.name for d in (data_dir, layout.book_dir(data_dir)) for p in d.glob(f"{name(i)}.*")
                  if not p.name.endswith(".lock"))


@pytest.fixture
def capped(remote_dir):
    """A server capping each connection at 0.4 MB/s (the link itself uncapped), measuring overlap."""
    with OverlapServer(remote_dir, per_connection_rate=0.4) as srv:
        yield srv


# -----------------------------------------------------------------------------
# The decisions (pure)

def test_plan_parts_splits_the_gaps_into_at_most_n_parts_of_at_least_min():
    assert plan_parts(100, [], 1, 10) == [(0, 100)]
    assert plan_parts(100, [], 4, 10) == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert plan_parts(100, [], 4, 30) == [(0, 50), (50, 100)]         # 4 parts would be under 30
    assert plan_parts(100, [], 4, 60) == [(0, 100)]                   # too small to split at all
    assert plan_parts(100, [(0, 100)], 4, 10) == []
    # what is on disk is never asked for again; gaps beyond n stay whole
    assert plan_parts(100, [(10, 20), (40, 50)], 2, 10) == [(0, 10), (20, 40), (50, 100)]
    assert plan_parts(100, [(0, 50)], 2, 10) == [(50, 75), (75, 100)]
    big = plan_parts(100 << 20, [], 4, 8 << 20)
    assert [b - a for a, b in big] == [25 << 20] * 4 and all(a % (64 << 10) == 0 for a, _ in big)


def test_span_helpers():
    assert merge_spans([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]
    assert missing_spans(10, [(2, 4), (3, 6), (8, 20)]) == [(0, 2), (6, 8)]
    assert missing_spans(10, []) == [(0, 10)]
    assert split_point(0, 19, 10) is None and split_point(0, 20, 10) == 10
    assert steal_point(0, 100, 50, 30) is None            # 50 left after the read in flight: 2 x 30 do not fit
    assert steal_point(0, 100, 10, 30) == 55


def test_auto_adds_parts_only_while_they_pay():
    assert auto_parts(None, 1, 5.0, 1, 4) == 2            # first judgement: try a second connection
    assert auto_parts(5.0, 1, 9.5, 2, 4) == 4             # it nearly doubled the rate: a per-connection cap, ramp
    assert auto_parts(5.0, 1, 7.0, 2, 4) == 3             # it helped, less than in proportion: one more
    assert auto_parts(5.0, 1, 5.5, 2, 4) == 2             # it did not (+10 %): the link is the limit
    assert auto_parts(10.0, 2, 30.0, 4, 4) == 4           # never past the most
    assert auto_parts(10.0, 2, 19.0, 3, 8) == 6           # 3 vs 2 gave ~1.5x: in proportion, double


def test_policy_checks_its_split_settings():
    for bad in (0, 17, "many", True, 2.5):
        with pytest.raises(ConfigError, match="max_connections"):
            FetchPolicy(max_connections=bad)
    with pytest.raises(ConfigError, match="min_part_bytes"):
        FetchPolicy(min_part_bytes=1000)


# -----------------------------------------------------------------------------
# Split transfers

def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_split_fetch_is_byte_identical_with_concurrent_ranges(capped, tmp_path):
    src = capped.directory / name(1)
    size = src.stat().st_size
    got = []
    t0 = time.monotonic()
    r = fetch_shard(Source(capped.hub_url, SHARDS), 1, tmp_path, SPLIT, on_bytes=got.append)
    took = time.monotonic() - t0
    assert (tmp_path / name(1)).read_bytes() == src.read_bytes()
    assert r.sha256 == _sha(src) and r.checked.startswith("sha256") and r.bytes_downloaded == size
    assert sum(got) == size
    st = capped.stats(name(1))
    assert st.get_requests >= 4 and capped.max_overlap() >= 3         # several Range requests at once
    assert merge_spans(st.ranges) == [(0, size)]
    assert took < size / 0.4e6 * 0.75                                   # faster than one capped connection
    assert leftovers(tmp_path, 1) == []


def test_auto_adds_connections_under_a_per_connection_cap(capped, tmp_path):
    src = capped.directory / name(2)
    capped.set_per_connection_rate(0.15)                # one connection: ~4 s for the shard
    policy = FetchPolicy(max_connections="auto", min_part_bytes=MIN, backoff_initial=0.01)
    r = fetch_shard(Source(capped.hub_url, SHARDS), 2, tmp_path, policy)
    assert (tmp_path / name(2)).read_bytes() == src.read_bytes() and r.sha256 == _sha(src)
    assert capped.max_overlap() >= 2 and capped.stats(name(2)).get_requests >= 2


def test_auto_stays_near_one_connection_when_the_link_is_the_limit(remote_dir, tmp_path):
    with OverlapServer(remote_dir, rate=0.3) as srv:    # a shared cap only: more connections cannot help
        policy = FetchPolicy(max_connections="auto", min_part_bytes=MIN, backoff_initial=0.01)
        fetch_shard(Source(srv.hub_url, SHARDS), 2, tmp_path, policy)
        assert srv.max_overlap() <= 2                   # tried a second, saw no gain, added no third
    assert (tmp_path / name(2)).read_bytes() == (remote_dir / name(2)).read_bytes()


def test_a_judgement_is_remembered_for_a_while():
    assert judged_parts(None, 1, 5.0, 4) == 4             # the most at once, nothing to compare: keep it
    assert judged_parts(5.0, 1, 5.5, 2) == 1              # the second connection did not pay: one
    assert judged_parts(5.0, 2, 9.0, 4) == 4              # the last doubling did
    assert judged_parts(8.0, 3, 8.4, 4) == 3
    assert remembered_parts(None, 100.0) is None          # nothing judged: judge
    assert remembered_parts(Verdict(1, 100.0), 100.0 + AUTO_MEMORY - 1) == 1
    assert remembered_parts(Verdict(3, 100.0), 100.0 + AUTO_MEMORY) is None   # stale: judge again


def test_the_next_shard_from_the_origin_starts_with_what_auto_judged(remote_dir, tmp_path):
    """After a judgement, the next shard skips it: one plain request where a second part did not pay (no
    split file, no Range), or the judged parts at once under a per-connection cap."""
    policy = FetchPolicy(max_connections="auto", min_part_bytes=MIN, backoff_initial=0.01)
    with OverlapServer(remote_dir, rate=0.3) as srv:    # the link is the limit
        source = Source(srv.hub_url, SHARDS)
        fetch_shard(source, 2, tmp_path / "a", policy)
        assert VERDICTS.get(url_origin(srv.hub_url)).parts == 1
        srv.reset_stats()
        fetch_shard(source, 3, tmp_path / "a", policy)
        st = srv.stats(name(3))
        assert st.get_requests == 1 and st.ranges == [(0, (remote_dir / name(3)).stat().st_size)]
    with OverlapServer(remote_dir, per_connection_rate=0.15) as srv:
        source = Source(srv.hub_url, SHARDS)
        fetch_shard(source, 2, tmp_path / "b", policy)
        judged = VERDICTS.get(url_origin(srv.hub_url)).parts
        assert judged >= 2
        srv.reset_stats()
        fetch_shard(source, 3, tmp_path / "b", policy)
        assert srv.stats(name(3)).get_requests >= judged       # the judged parts, from the start
    for i in (2, 3):
        assert (tmp_path / "b" / name(i)).read_bytes() == (remote_dir / name(i)).read_bytes()


def test_small_shards_stay_one_request(capped, tmp_path):
    capped.set_per_connection_rate(None)
    for policy in (FetchPolicy(max_connections=4), FetchPolicy()):     # the default min part is 8 MB
        capped.reset_stats()
        fetch_shard(Source(capped.hub_url, SHARDS), 3, tmp_path, policy)
        assert capped.stats(name(3)).get_requests == 1
        (tmp_path / name(3)).unlink()


def test_reset_on_one_part_resumes_that_part_only(capped, tmp_path):
    src = capped.directory / name(1)
    size = src.stat().st_size
    parts = plan_parts(size, [], 4, MIN)
    capped.add_fault(Fault("reset", file=name(1), at=0.5))     # the first GET to arrive: one of the parts
    retries = []
    r = fetch_shard(Source(capped.hub_url, SHARDS), 1, tmp_path, SPLIT, on_retry=retries.append)
    assert (tmp_path / name(1)).read_bytes() == src.read_bytes()
    assert len(retries) == 1 and r.bytes_downloaded == size            # no byte received twice
    ranges = capped.stats(name(1)).ranges
    cut_short = [(a, b) for a, b in ranges for p0, p1 in parts if a == p0 and b < p1]
    assert len(cut_short) == 1, ranges                                 # what the reset part got before it
    assert any(a == cut_short[0][1] for a, _ in ranges)                # resumed where it stopped
    assert all(sum(1 for a, _ in ranges if a == p0) == 1 for p0, _ in parts)    # no part started over


def test_stall_on_one_part_is_ridden_out(capped, tmp_path):
    capped.add_fault(Fault("stall", file=name(4), at=0.3, seconds=3))
    r = fetch_shard(Source(capped.hub_url, SHARDS), 4, tmp_path, SPLIT)
    assert (tmp_path / name(4)).read_bytes() == (capped.directory / name(4)).read_bytes()
    assert r.bytes_downloaded == r.size


@pytest.mark.parametrize("hub", [False, True])      # plain: no sha256, the ETag alone guards; hub: both
def test_file_replaced_mid_fetch_restarts_and_never_splices(capped, tmp_path, hub):
    target = capped.directory / name(1)
    new = (capped.directory / name(3)).read_bytes()     # another valid shard: the "new version"
    capped.add_fault(Fault("reset", file=name(1), at=0.3))
    replaced = []

    def replace(cause):     # after part 0's reset, before its retry: the file changes at the source
        if not replaced:
            tmp = target.with_suffix(".new")
            tmp.write_bytes(new)
            os.replace(tmp, target)
            replaced.append(cause)
    source = Source(capped.hub_url if hub else capped.url, SHARDS)
    r = fetch_shard(source, 1, tmp_path, SPLIT, on_retry=replace)
    assert replaced
    assert (tmp_path / name(1)).read_bytes() == new and r.sha256 == hashlib.sha256(new).hexdigest()
    gets = [q for q in capped.requests if q.method == "GET" and q.path.endswith(name(1))]
    assert any("If-Range" in q.headers and q.status == 200 for q in gets)      # the part saw the change
    assert leftovers(tmp_path, 1) == []


def test_stop_mid_split_keeps_the_spans_for_a_resume(capped, tmp_path):
    capped.set_per_connection_rate(0.1)
    src = capped.directory / name(5)
    size = src.stat().st_size
    stop = threading.Event()
    seen = []

    def on_bytes(n):
        seen.append(n)
        if sum(seen) > size // 3:
            stop.set()
    t0 = time.monotonic()
    with pytest.raises(FetchCancelled):
        fetch_shard(Source(capped.hub_url, SHARDS), 5, tmp_path, SPLIT, stop=stop, on_bytes=on_bytes)
    assert time.monotonic() - t0 < 10
    partial, = tmp_path.glob(f"{name(5)}.*.partial")
    spans = json.loads(layout.sidecar_path(partial).read_text())["spans"]
    kept = sum(b - a for a, b in spans)
    assert kept >= size // 3
    capped.set_per_connection_rate(None)
    capped.reset_stats()
    r = fetch_shard(Source(capped.hub_url, SHARDS), 5, tmp_path, SPLIT)
    assert r.resumed_from == kept and r.bytes_downloaded == size - kept
    assert (tmp_path / name(5)).read_bytes() == src.read_bytes() and leftovers(tmp_path, 5) == []


KILLED_SPLIT = """
import sys
from shardstream.fetch import FetchPolicy, fetch_shard
from shardstream.source import Source
fetch_shard(Source(sys.argv[1], 6), int(sys.argv[2]), sys.argv[3],
            FetchPolicy(max_connections=4, min_part_bytes=65536, backoff_initial=0.01, backoff_max=0.05))
"""


def test_kill9_mid_split_then_resume_fetches_only_the_missing_bytes(capped, tmp_path):
    src = capped.directory / name(5)
    size = src.stat().st_size
    capped.set_per_connection_rate(0.08)        # 4 parts of ~150 KB: ~2 s, so a checkpoint lands first
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SPLIT, capped.hub_url, "5", str(tmp_path)])
    recorded = []

    def checkpointed():
        assert proc.poll() is None, "the fetch ended before it could be killed"
        for p in tmp_path.glob(f"{name(5)}.*.partial"):
            try:
                spans = json.loads(layout.sidecar_path(p).read_text()).get("spans") or []
            except (OSError, ValueError):
                continue
            if sum(b - a for a, b in spans) > 0:
                recorded[:] = [p]
                return True
        return False
    try:
        until(checkpointed, 30, "a split partial with finished spans in its sidecar")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = recorded[0]
    assert not (tmp_path / name(5)).exists()
    spans = [tuple(s) for s in json.loads(layout.sidecar_path(partial).read_text())["spans"]]
    kept = sum(b - a for a, b in spans)
    assert 0 < kept < size and partial.stat().st_size == size          # preallocated, partly filled
    capped.set_per_connection_rate(None)
    capped.reset_stats()
    r = fetch_shard(Source(capped.hub_url, SHARDS), 5, tmp_path, SPLIT)
    assert r.resumed_from == kept and r.bytes_downloaded == size - kept
    gaps = missing_spans(size, spans)
    asked = [re.match(r"bytes=(\d+)-(\d+)$", q.headers["Range"]).groups() for q in capped.requests
             if q.method == "GET" and q.path.endswith(name(5))]
    assert asked
    for a, b in ((int(a), int(b) + 1) for a, b in asked):             # nothing recorded is asked for again
        assert any(ga <= a and b <= gb for ga, gb in gaps), (a, b, gaps)
    assert (tmp_path / name(5)).read_bytes() == src.read_bytes() and leftovers(tmp_path, 5) == []
