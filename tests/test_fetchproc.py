"""Fetches in the helper process (fetchproc.py): against the real ShardServer, with real processes and real
signals. The helper must be indistinguishable from fetch_shard in this thread (same files, result,
callbacks, error types, log lines), cancel on stop with the partial kept, turn its own death into a
retryable error that the next fetch resumes from, and never outlive the process that started it. The
decision (use_helper) is a pure function, tested on its own."""
import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from rel_common import until
from shardstream.downloader import StreamingDownloader
from shardstream.errors import ConfigError, FetchCancelled, PermanentFetchError, TransientFetchError
from shardstream.fetch import FetchPolicy, FetchResult, fetch_shard
from shardstream.fetchproc import FetchHelper, run_fetch, use_helper
from shardstream.server import Fault
from shardstream.source import Source

ROOT = Path(__file__).resolve().parent.parent
FORCED = FetchPolicy(process=True, connect_timeout=2.0, stall_timeout=2.0, backoff_initial=0.01, backoff_max=0.05,
                     max_connections=1)


def name(i):
    return f"shard_{i:05d}.parquet"


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def partials(d):
    return [p for p in Path(d).glob("*.partial")]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                # a zombie (exited, not yet reaped) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def helper():
    h = FetchHelper()
    yield h
    h.close()


# -----------------------------------------------------------------------------
# The decision (pure)

def test_use_helper_sends_big_shards_when_auto_and_follows_a_forced_choice():
    auto = FetchPolicy(min_process_bytes=100)
    assert use_helper(auto, 100) and use_helper(auto, 10**9)
    assert not use_helper(auto, 99)
    assert not use_helper(auto, None)             # size unknown: stay here
    assert use_helper(FetchPolicy(process=True), 1) and use_helper(FetchPolicy(process=True), None)
    assert not use_helper(FetchPolicy(process=False), 10**9)


@pytest.mark.parametrize("bad", [dict(process="yes"), dict(process=None), dict(min_process_bytes=-1),
                                 dict(min_process_bytes=1.5)])
def test_policy_refuses_bad_process_settings(bad):
    with pytest.raises(ConfigError, match="FetchPolicy"):
        FetchPolicy(**bad)


# -----------------------------------------------------------------------------
# Same as fetch_shard, in another process

def test_a_helper_fetch_gives_the_same_file_result_and_callbacks_as_one_here(server, tmp_path, helper):
    source = Source(server.hub_url, 6)
    got, links = [], []
    res = run_fetch(helper, source, 2, tmp_path / "a", FORCED, on_bytes=got.append, on_link=links.append)
    here = fetch_shard(source, 2, tmp_path / "b", FetchPolicy(max_connections=1))
    assert helper.pid is not None and helper.pid != os.getpid() and helper.served == 1
    assert isinstance(res, FetchResult) and res.path == tmp_path / "a" / name(2)
    assert sha(res.path) == sha(here.path) == sha(server.directory / name(2))
    assert (res.size, res.checked, res.attempts) == (here.size, here.checked, here.attempts)
    assert sum(got) == res.size == res.bytes_downloaded
    assert links[0] is True and links[-1] is False
    assert not partials(tmp_path / "a")
    # the second fetch of a shard on disk is answered without a transfer, as here
    again = run_fetch(helper, source, 2, tmp_path / "a", FORCED)
    assert again.already_present and server.stats(name(2)).get_requests == 2


def test_errors_come_back_with_their_types_and_fields(server, tmp_path, helper):
    source = Source(server.hub_url, 9)                # shard 8 is listed by the count but not served: a 404
    with pytest.raises(PermanentFetchError) as e:
        run_fetch(helper, source, 8, tmp_path, FORCED)
    assert e.value.shard_id == 8 and "404" in str(e.value) and e.value.url.endswith(name(8))
    # a transient failure exhausts its tries the same way
    server.add_fault(Fault("status", status=503, times=None, file=name(1)))
    with pytest.raises(TransientFetchError) as e:
        run_fetch(helper, source, 1, tmp_path, FetchPolicy(process=True, max_attempts=2, backoff_initial=0.01,
                                                           backoff_max=0.02))
    assert e.value.shard_id == 1 and e.value.attempts >= 2


def test_the_helpers_log_lines_reach_this_process(server, tmp_path, helper, caplog):
    server.add_fault(Fault("reset", at=0.5, file=name(3)))
    with caplog.at_level(logging.INFO, logger="shardstream"):
        res = run_fetch(helper, Source(server.hub_url, 6), 3, tmp_path, FORCED)
    assert sha(res.path) == sha(server.directory / name(3)) and res.attempts >= 2
    lines = [r for r in caplog.records if r.name == "shardstream.fetch" and "resuming at byte" in r.getMessage()]
    assert lines and lines[0].process == helper.pid != os.getpid()


# -----------------------------------------------------------------------------
# Stop, death, and the other process's death

def slow_fetch(helper, source, shard, data_dir, stop=None):
    """Start run_fetch in a thread; returns (thread, outcome dict)."""
    out = {}

    def go():
        try:
            out["result"] = run_fetch(helper, source, shard, data_dir, FORCED, stop=stop)
        except BaseException as e:          # noqa: BLE001 (the test looks at it)
            out["error"] = e
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def test_stop_cancels_a_helper_fetch_and_the_next_one_resumes_its_partial(server, tmp_path, helper):
    server.set_rate(0.3)                      # ~0.6 MB at 0.3 MB/s: two seconds
    source, stop = Source(server.hub_url, 6), threading.Event()
    t, out = slow_fetch(helper, source, 0, tmp_path, stop)
    until(lambda: any(p.stat().st_size > 0 for p in partials(tmp_path)), what="bytes in the partial")
    stop.set()
    t.join(10)
    assert not t.is_alive() and isinstance(out.get("error"), FetchCancelled), out
    assert partials(tmp_path) and not (tmp_path / name(0)).exists()
    server.set_rate(None)
    res = run_fetch(helper, source, 0, tmp_path, FORCED)
    assert res.resumed_from > 0 and sha(res.path) == sha(server.directory / name(0))


def test_a_helper_killed_mid_fetch_is_retryable_and_a_new_helper_resumes(server, tmp_path, helper):
    server.set_rate(0.3)
    source = Source(server.hub_url, 6)
    t, out = slow_fetch(helper, source, 1, tmp_path)
    until(lambda: any(p.stat().st_size > 0 for p in partials(tmp_path)), what="bytes in the partial")
    first = helper.pid
    os.kill(first, signal.SIGKILL)
    t.join(10)
    assert isinstance(out.get("error"), TransientFetchError), out
    assert "helper process" in str(out["error"]) and "-9" in str(out["error"])
    server.set_rate(None)
    res = run_fetch(helper, source, 1, tmp_path, FORCED)          # starts a new helper
    assert helper.pid not in (None, first)
    assert res.resumed_from > 0 and sha(res.path) == sha(server.directory / name(1))
    assert not partials(tmp_path)


def test_the_helper_does_not_outlive_a_parent_killed_with_sigkill(server, tmp_path):
    server.set_rate(0.05)                     # the fetch is still running when the parent dies
    script = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(ROOT)!r})
        from shardstream.fetch import FetchPolicy
        from shardstream.fetchproc import FetchHelper, run_fetch
        from shardstream.source import Source
        h = FetchHelper()
        h.available(wait=True)
        print(h.pid, flush=True)
        run_fetch(h, Source({server.hub_url!r}, 6), 4, {str(tmp_path)!r}, FetchPolicy(process=True))
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        until(lambda: partials(tmp_path), what="the helper's partial file")
        parent.kill()
        parent.wait(10)
        until(lambda: not alive(child), timeout=15, what="the helper to exit after its parent's kill -9")
    finally:
        parent.kill()
        parent.wait()
    assert not (tmp_path / name(4)).exists() and partials(tmp_path)       # kept for a resume


# -----------------------------------------------------------------------------
# Who uses it

def test_auto_starts_the_helper_only_for_shards_big_enough(server, tmp_path, helper):
    source = Source(server.hub_url, 6)
    small = FetchPolicy(min_process_bytes=1 << 30)
    res = run_fetch(helper, source, 0, tmp_path, small, info=None, size=10 << 20)
    assert res.size > 0 and helper.pid is None and helper.served == 0         # never started
    big = FetchPolicy(min_process_bytes=1)
    res = run_fetch(helper, source, 1, tmp_path, big, size=res.size)            # starts it; runs here meanwhile
    until(lambda: helper.pid is not None, what="the helper to come up")
    run_fetch(helper, source, 2, tmp_path, big, size=res.size)
    assert helper.served >= 1


def test_a_downloader_streams_every_shard_through_the_helper(server, tmp_path):
    n = 5
    with StreamingDownloader(n, data_dir=tmp_path / "data", source=Source(server.hub_url, n + 1), buffer_size=2,
                             fetch_policy=FORCED, progress=False) as dl:
        for i in range(n):
            path = dl.wait_for_shard(i, timeout=60)
            assert sha(path) == sha(server.directory / name(i))
            dl.release(i)
        helper = dl._helper                   # (our own object: how many fetches went through the process)
        pid = helper.pid
        assert pid is not None and helper.served >= n
        assert dl.get_status().downloaded_bytes >= sum((server.directory / name(i)).stat().st_size for i in range(n))
    assert not alive(pid)                     # stop() ended it


@pytest.mark.parametrize("python", ["/nonexistent/python3", "/bin/false"])
def test_a_helper_that_cannot_run_leaves_the_fetches_here(server, tmp_path, monkeypatch, caplog, python):
    # A Python that cannot be started (not there), or exits before it says "ready": both are real
    # processes failing (no stand-in): the fetches still happen, in this thread, with a warning.
    monkeypatch.setattr(sys, "executable", python)
    source, h = Source(server.hub_url, 6), FetchHelper()
    try:
        with caplog.at_level(logging.WARNING, logger="shardstream"):
            for i in range(4):
                res = run_fetch(h, source, i, tmp_path, FORCED)
                assert sha(res.path) == sha(server.directory / name(i))
        assert h.pid is None and h.served == 0
        assert any("download helper process" in r.getMessage() for r in caplog.records)
    finally:
        h.close()


def test_the_row_group_caps_set_here_hold_in_the_helper(server, tmp_path, helper):
    from shardstream.verify import configure_row_group_limits
    source = Source(server.hub_url, 6)
    configure_row_group_limits(max_rows=100)            # the sample's row groups hold 1,024 rows
    try:
        with pytest.raises(PermanentFetchError) as there:
            run_fetch(helper, source, 5, tmp_path / "a", FORCED)
        with pytest.raises(PermanentFetchError) as here:
            fetch_shard(source, 5, tmp_path / "b", FORCED)
        assert "rows" in str(there.value) and type(there.value) is type(here.value)
    finally:
        configure_row_group_limits()
    assert run_fetch(helper, source, 5, tmp_path / "a", FORCED).size > 0     # the defaults again, there too


def test_a_helper_of_another_version_refuses_and_the_fetches_stay_here(server, tmp_path, monkeypatch, caplog):
    # The parent's code and the code on disk differ (an upgrade under a running trainer): the child says
    # so and exits before serving; nothing is sent to it in a protocol it does not speak.
    import shardstream.fetchproc as fetchproc
    monkeypatch.setattr(fetchproc, "PROTOCOL", fetchproc.PROTOCOL + 1)
    h = FetchHelper()
    try:
        with caplog.at_level(logging.WARNING, logger="shardstream"):
            res = run_fetch(h, Source(server.hub_url, 6), 0, tmp_path, FORCED)
        assert sha(res.path) == sha(server.directory / name(0)) and h.served == 0 and h.pid is None
        assert any("exited with code 1" in r.getMessage() for r in caplog.records)
    finally:
        h.close()


def test_the_helper_runs_below_this_process_cpu_priority(server, tmp_path, helper):
    import shardstream.fetchproc as fetchproc
    run_fetch(helper, Source(server.hub_url, 6), 0, tmp_path, FORCED)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, helper.pid) == min(19, mine + fetchproc.NICE) > mine
