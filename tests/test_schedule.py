"""The scheduler's rules on hand-made snapshots: no threads, no sockets, no sleeps, no clock (time is an
argument). Each table row is one situation and the decision it must give."""
import pytest

from shardstream.cache import ReadPlan
from shardstream.downloader import FailurePolicy
from shardstream.schedule import (VAL_AFTER, Evict, Failure, Fetch, JobKind, Probe, ShardState,
                                  Snapshot, ahead, failure_verdict, fetch_size, make_room, next_action, next_read,
                                  over_budget_evictions, priority, reader_pos, routine_evictions, shard_state,
                                  val_room, window_room)

PLAN = ReadPlan.sequential(10)          # train shards 0..9; the val shard is 10
MB = 1_000_000


def snap(**kw):
    base = dict(plan=PLAN, val_shard=10, window=4, initial_buffer=1, parallel=2)
    base.update(kw)
    return Snapshot(**base)


def sized(n=11, size=MB):
    return {s: size for s in range(n)}


# -----------------------------------------------------------------------------
# where the readers are

@pytest.mark.parametrize("kw, pos, window", [
    (dict(), -1, []),                                           # not anchored: no window
    (dict(start_pos=0), -1, [0, 1, 2, 3]),                      # an initial buffer anchors it at the start
    (dict(start_pos=6), 5, [6, 7, 8, 9]),                       # start_at (a resume)
    (dict(cursors={0: 3}), 3, [4, 5, 6, 7]),
    (dict(cursors={0: 3, 1: 1}), 1, [2, 3, 4, 5]),              # the slowest reader leads the window
    (dict(cursors={0: 8}), 8, [9]),                             # one epoch: the window ends with the plan
])
def test_window_follows_the_slowest_reader(kw, pos, window):
    s = snap(**kw)
    assert reader_pos(s) == pos and ahead(s) == window


def test_next_read_is_the_nearest_reader_and_none_past_the_plan():
    s = snap(cursors={0: 3, 1: 6}, plan=ReadPlan.sequential(10, epochs=2))
    assert next_read(s, 7) == 1 and next_read(s, 4) == 1 and next_read(s, 2) == 6
    assert next_read(snap(cursors={0: 3}), 2) is None           # one epoch: never read again


# -----------------------------------------------------------------------------
# priority

@pytest.mark.parametrize("kw, want", [
    # fixed window, reader at 3: the next VAL_AFTER shards, the val shard, the rest
    (dict(cursors={0: 3}, verified=1), [4, 5, 10, 6, 7]),
    # once initial_buffer + VAL_AFTER shards came, the val shard is first in line
    (dict(cursors={0: 3}, verified=1 + VAL_AFTER), [10, 4, 5, 6, 7]),
    # no reader yet: the initial buffer is not "next"
    (dict(start_pos=0, verified=0), [0, 1, 2, 10, 3]),
    # waited-for shards first, oldest wait first
    (dict(cursors={0: 3}, verified=1, demand=(8, 2)), [8, 2, 4, 5, 10, 6, 7]),
    # while start() fills the initial buffer: only its shards (and waited-for ones)
    (dict(start_pos=0, initial=(0,), demand=(10,)), [10, 0]),
    # the first window shards wait for room: the val shard (whose room is held) goes first
    (dict(cursors={0: 3}, verified=1, blocked=frozenset({5})), [10, 4, 5, 6, 7]),
    # adaptive: the val shard after the shards the rates say the reader needs
    (dict(cursors={0: 3}, adaptive=True, window=4, window_base=3), [4, 5, 6, 10, 7]),
    (dict(cursors={0: 3}, adaptive=True, window=4, window_base=None), [4, 5, 6, 7, 10]),
])
def test_priority(kw, want):
    assert priority(snap(**kw)) == want


# -----------------------------------------------------------------------------
# next action

@pytest.mark.parametrize("kw, want", [
    (dict(cursors={0: 3}, verified=1), Probe(4)),                               # size first
    (dict(cursors={0: 3}, verified=1, sizes=sized()), Fetch(4)),
    (dict(cursors={0: 3}, verified=1, sizes=sized(), files={4: MB}), Fetch(5)),
    (dict(cursors={0: 3}, verified=1, sizes=sized(), inflight=frozenset({4, 5})), None),   # 2 of 2 running
    # one of the two in flight verifies and commits: its link slot is free for the next
    (dict(cursors={0: 3}, verified=1, sizes=sized(), inflight=frozenset({4, 5}), transferring=frozenset({5})),
     Fetch(10)),
    # a reader waits for 9: one transfer beyond the limit (the spare worker)
    (dict(cursors={0: 3}, verified=1, sizes=sized(), inflight=frozenset({4, 5}), demand=(9,)), Fetch(9)),
    # its size is being asked: it keeps its turn (and its slot)
    (dict(cursors={0: 3}, verified=1, sizes=sized(), probing=frozenset({4}), parallel=1), None),
    # backing off after a failure: the next one goes
    (dict(cursors={0: 3}, verified=1, sizes=sized(), failures={4: Failure(rounds=1, retry_at=50.0, error="x")}),
     Fetch(5)),
    (dict(cursors={0: 3}, verified=1, sizes=sized(), failures={4: Failure(rounds=1, retry_at=5.0, error="x")}),
     Fetch(4)),                                                                 # backoff over at now=10
    (dict(cursors={0: 3}, verified=1, sizes=sized(), skipped=frozenset({4})), Fetch(5)),
    # everything there
    (dict(cursors={0: 8}, verified=3, sizes=sized(), files={9: MB, 10: MB}), None),
])
def test_next_action(kw, want):
    got = next_action(snap(**kw), now=10.0)
    assert got == want
    if got is not None:
        assert got.kind is (JobKind.PROBE if isinstance(got, Probe) else JobKind.FETCH)


def test_fetch_size_is_the_remote_size_else_the_largest_known():
    assert fetch_size(snap(sizes={3: 5, 4: None, 5: 9}), 3) == 5
    assert fetch_size(snap(sizes={3: 5, 4: None, 5: 9}), 4) == 9
    assert fetch_size(snap(), 4) == 0


# -----------------------------------------------------------------------------
# evictions

def test_routine_evictions_delete_consumed_beyond_retain():
    files = {0: MB, 1: MB, 2: MB, 3: MB, 10: MB}
    s = snap(cursors={0: 3}, files=files, consumed=(0, 1, 2), leased=frozenset({3}))
    assert routine_evictions(s) == [Evict(0, "consumed"), Evict(1, "consumed"), Evict(2, "consumed")]
    assert routine_evictions(snap(cursors={0: 3}, files=files, consumed=(0, 1, 2), retain=2)) == [Evict(0, "consumed")]
    assert routine_evictions(s, keep=1) == [Evict(0, "consumed"), Evict(2, "consumed")]


def test_routine_evictions_keep_what_a_later_epoch_rereads_while_a_budget_holds_it():
    two = ReadPlan.sequential(10, epochs=2)
    files = {0: MB, 1: MB}
    s = snap(plan=two, cursors={0: 3}, files=files, consumed=(0, 1))
    assert routine_evictions(s) == [Evict(0, "consumed"), Evict(1, "consumed")]     # no budget: delete behind
    assert routine_evictions(snap(plan=two, cursors={0: 3}, files=files, consumed=(0, 1), budget=8 * MB)) == []


@pytest.mark.parametrize("kw, shard, want", [
    # no budget: nothing to do
    (dict(cursors={0: 3}), 5, ([], 0)),
    # room enough
    (dict(cursors={0: 3}, budget=10 * MB, used_bytes=3 * MB, files={10: MB}), 5, ([], MB)),
    # Belady: never-again first (consumed 0), then the one read furthest away (9 before 8)
    (dict(cursors={0: 3}, window=2, budget=5 * MB, used_bytes=5 * MB, files={0: MB, 8: MB, 9: MB, 4: MB, 10: MB},
          consumed=(0,)), 5, ([Evict(0, "consumed")], MB)),
    (dict(cursors={0: 3}, window=2, budget=4 * MB, used_bytes=5 * MB, files={0: MB, 8: MB, 9: MB, 4: MB, 10: MB},
          consumed=(0,)), 5, ([Evict(0, "consumed"), Evict(9, "budget")], MB)),
    # never the window, a lease, the val shard: when nothing else frees enough, the download waits
    (dict(cursors={0: 3}, window=2, budget=3 * MB, used_bytes=3 * MB, files={4: MB, 5: MB, 10: MB}), 6, (None, MB)),
    # never a shard read before the one that needs the room (it would only cost a download)
    (dict(cursors={0: 3}, window=1, budget=2 * MB, used_bytes=2 * MB, files={5: MB, 10: MB}), 8, (None, MB)),
    # ...but a reader waiting for a shard may take room from the window
    (dict(cursors={0: 3}, window=2, budget=3 * MB, used_bytes=3 * MB, files={4: MB, 5: MB, 10: MB}, demand=(8,)), 8,
     ([Evict(5, "budget")], MB)),
])
def test_make_room(kw, shard, want):
    got = make_room(snap(**kw), shard, MB)
    assert got == want


def test_the_val_shards_room_is_kept_while_it_is_not_on_disk():
    s = snap(cursors={0: 3}, sizes={10: 2 * MB}, budget=10 * MB, used_bytes=7 * MB, files={4: MB})
    assert val_room(s, 5) == 2 * MB and val_room(s, 10) == 0
    assert make_room(s, 5, MB) == ([], 3 * MB)
    assert make_room(snap(cursors={0: 3}, sizes={10: 2 * MB}, budget=9 * MB, used_bytes=7 * MB,
                          files={4: MB}, window=1), 6, MB)[0] is None
    on_disk = snap(cursors={0: 3}, sizes={10: 2 * MB}, files={10: 2 * MB})
    assert val_room(on_disk, 5) == 0


def test_over_budget_at_start_deletes_what_is_not_needed_soon():
    s = snap(cursors={0: 3}, window=2, budget=3 * MB, used_bytes=5 * MB,
             files={1: MB, 4: MB, 5: MB, 9: MB, 10: MB})
    assert over_budget_evictions(s) == [Evict(1, "budget"), Evict(9, "budget")]
    assert over_budget_evictions(snap(budget=None, used_bytes=5 * MB)) == []


def test_window_room_counts_the_val_shard_and_leases():
    s = snap(budget=10 * MB, max_shard_bytes=MB, sizes={10: 2 * MB}, leased=frozenset({3, 4}),
             files={3: MB, 4: MB})
    assert window_room(s) == 6
    assert window_room(snap(budget=None, max_shard_bytes=MB)) is None
    assert window_room(snap(budget=10 * MB, max_shard_bytes=MB)) == 9         # val size unknown: one shard


# -----------------------------------------------------------------------------
# failures

POLICY = FailurePolicy("fail", deadline=30.0)


@pytest.mark.parametrize("kw, waited, policy, want", [
    (dict(), 100.0, POLICY, None),                                              # nothing failed
    (dict(failures={4: Failure(attempts=3, permanent=True, error="404")}), 0.0, POLICY, ("fail", False)),
    (dict(failures={4: Failure(attempts=3, error="503")}), 10.0, POLICY, None),  # transient: not yet
    (dict(failures={4: Failure(attempts=3, error="503")}), 30.0, POLICY, ("fail", False)),
    (dict(failures={4: Failure(attempts=3, error="503")}), 30.0, FailurePolicy("skip", deadline=30.0),
     ("skip", False)),
    (dict(failures={4: Failure(attempts=3, permanent=True, error="404")}), 99.0, FailurePolicy("wait"), None),
    # a download in flight whose tries keep failing meets the deadline too
    (dict(inflight=frozenset({4}), troubled={4: (5, "too slow")}), 10.0, POLICY, None),
    (dict(inflight=frozenset({4}), troubled={4: (5, "too slow")}), 30.0, POLICY, ("fail", True)),
])
def test_failure_verdict(kw, waited, policy, want):
    got = failure_verdict(snap(**kw), 4, waited, policy)
    assert (None if got is None else (got.mode, got.in_flight)) == want
    if got is not None and got.in_flight:
        assert got.failure.attempts == 5 and got.failure.error == "too slow"


# -----------------------------------------------------------------------------
# shard states

@pytest.mark.parametrize("kw, want", [
    (dict(), ShardState.ABSENT),
    (dict(probing=frozenset({4})), ShardState.PROBING),
    (dict(sizes={4: MB}), ShardState.KNOWN),
    (dict(sizes={4: MB}, inflight=frozenset({4})), ShardState.FETCHING),
    (dict(files={4: MB}), ShardState.ON_DISK),
    (dict(files={4: MB}, leased=frozenset({4})), ShardState.LEASED),
    (dict(files={4: MB}, consumed=(4,)), ShardState.CONSUMED),
    (dict(sizes={4: MB}, failures={4: Failure(rounds=1, retry_at=20.0, error="x")}), ShardState.FAILED),
    (dict(sizes={4: MB}, failures={4: Failure(rounds=1, retry_at=5.0, error="x")}), ShardState.KNOWN),
    (dict(skipped=frozenset({4})), ShardState.SKIPPED),
])
def test_shard_state(kw, want):
    assert shard_state(snap(**kw), 4, now=10.0) is want



# -----------------------------------------------------------------------------
# transfers at once (issue 17): one more is tried only while the readers have shards ready

from shardstream.prefetch import Rates  # noqa: E402
from shardstream.schedule import ready_ahead, transfer_limit  # noqa: E402

ONE_LEVEL = Rates(aggregate_bps=25 * MB, consume_spb=1 / (20 * MB), level_bps=((1, 25 * MB),))


@pytest.mark.parametrize("kw, want", [
    (dict(), 0),                                                # not anchored
    (dict(start_pos=0), 0),                                     # the initial buffer's shard is not there yet
    (dict(start_pos=0, files={0: MB}), 1),
    (dict(cursors={0: 0}, files={0: MB}), 0),                   # reads 0, the next (1) is not there
    (dict(cursors={0: 0}, files={0: MB, 1: MB}), 1),
    (dict(cursors={0: 0}, files={0: MB, 1: MB, 2: MB, 3: MB}), 3),   # counted up to the limit
    (dict(cursors={0: 0, 1: 2}, files={1: MB, 2: MB, 3: MB}), 1),    # the least covered reader counts
    (dict(cursors={0: 8}, files={9: MB}), 3),                   # the plan's end: nothing more to need
    (dict(cursors={0: 0}, files={1: MB, 2: MB}, demand=(5,)), 0),    # a reader waits now
])
def test_ready_ahead(kw, want):
    assert ready_ahead(snap(**kw), limit=3) == want


@pytest.mark.parametrize("rates, kw, workers, want", [
    (ONE_LEVEL, dict(cursors={0: 0}, files={0: MB, 1: MB}), 2, 1),            # 1 ready: k+1 = 2 would split
    (ONE_LEVEL, dict(cursors={0: 0}, files={0: MB, 1: MB, 2: MB}), 2, 2),     # 2 ready: try 2 connections
    (ONE_LEVEL, dict(cursors={0: 0}, files={0: MB, 1: MB, 2: MB}), 1, 1),     # never beyond the workers
    (ONE_LEVEL, dict(start_pos=0), 2, 1),                                     # start(): the first shard alone
    (Rates(), dict(cursors={0: 0}, files={1: MB, 2: MB}), 2, 1),              # nothing measured: one
    (Rates(aggregate_bps=10 * MB, consume_spb=1 / (20 * MB)), dict(cursors={0: 0}), 3, 3),   # behind: all
    (Rates(aggregate_bps=30 * MB, consume_spb=1 / (20 * MB), level_bps=((1, 20 * MB), (2, 30 * MB))),
     dict(cursors={0: 0}), 2, 2),                                             # 2 measured better: kept
])
def test_transfer_limit(rates, kw, workers, want):
    assert transfer_limit(snap(**kw), rates, workers) == want


# -----------------------------------------------------------------------------
# the executor's other rules (downloader.py carries them out): arguments, disk, failures, status

from shardstream import failures, report  # noqa: E402
from shardstream.errors import (ConfigError, DiskSpaceError, PermanentFetchError, ShardSkipped,  # noqa: E402
                                TransientFetchError)
from shardstream.existing import SHA_AUTO_LIMIT, hash_existing  # noqa: E402
from shardstream.policies import (DiskPolicy, WindowPolicy, budget_problem, disk_check,  # noqa: E402
                                  resolve_options, resolve_plan)
from shardstream.source import Source  # noqa: E402

SOURCE = Source("http://127.0.0.1:1", 11)        # train shards 0..9, val 10


@pytest.mark.parametrize("kw, needle", [
    (dict(window=WindowPolicy(), buffer_size=3), "not both"),
    (dict(window="big"), "WindowPolicy"),
    (dict(failure_policy="retry"), "failure policy mode"),
    (dict(failure_policy=FailurePolicy(), deadline=5), "not both"),
    (dict(disk_policy=DiskPolicy(), min_free_bytes=0), "not both"),
    (dict(prefetch="fast"), "prefetch"),
    (dict(workers=0), "workers"),
    (dict(verify_existing="md5"), "verify_existing"),
])
def test_resolve_options_refuses(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_options(**kw)


def test_resolve_options_builds_the_policies():
    o = resolve_options(buffer_size=3, failure_policy="skip", deadline=7, min_free_bytes=0, prefetch="auto")
    assert o.window.buffer_size == 3 and o.failure.mode == "skip" and o.failure.deadline == 7
    assert o.disk.min_free_bytes == 0 and o.prefetch is not None and o.workers == 2


@pytest.mark.parametrize("plan, total, window, start_at, want", [
    (None, -1, WindowPolicy(), None, (10, 0)),
    (None, 4, WindowPolicy(), None, (4, 0)),
    (None, 4, WindowPolicy(initial_buffer=0), None, (4, None)),     # not anchored until a reader asks
    (None, 4, WindowPolicy(), 2, (4, 2)),
    (ReadPlan((3, 1, 2)), -1, WindowPolicy(), 1, (3, 1)),
])
def test_resolve_plan(plan, total, window, start_at, want):
    p, n, start = resolve_plan(SOURCE, plan, total, window, start_at)
    assert (n, start) == want and p.epoch_length == n


@pytest.mark.parametrize("plan, total, window, start_at, needle", [
    (None, 11, WindowPolicy(), None, "only 10 train shards"),
    (ReadPlan((3, 10)), -1, WindowPolicy(), None, "names shard 10"),
    (ReadPlan((3, 1)), 5, WindowPolicy(), None, "disagrees"),
    (None, 2, WindowPolicy(buffer_size=3, initial_buffer=3), None, "initial_buffer=3"),
    (None, 4, WindowPolicy(), 7, "start_at"),
    ("0..3", -1, WindowPolicy(), None, "ReadPlan"),
])
def test_resolve_plan_refuses(plan, total, window, start_at, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_plan(SOURCE, plan, total, window, start_at)


@pytest.mark.parametrize("budget, val, first, ok", [
    (None, MB, MB, True), (3 * MB, MB, MB, True), (3 * MB - 1, MB, MB, False), (5 * MB, 3 * MB, MB, True),
])
def test_budget_problem(budget, val, first, ok):
    assert (budget_problem(budget, val, first) is None) == ok


@pytest.mark.parametrize("free, need, now, last_warn, want_ok, want_warn", [
    (10 * MB, 2 * MB, 100.0, 0.0, True, False),         # leaves 8 MB: above both lines
    (10 * MB, 6 * MB, 100.0, 0.0, True, True),          # leaves 4 MB: under the warning line
    (10 * MB, 6 * MB, 100.0, 50.0, True, False),        # ...warned 50 s ago: not again yet
    (10 * MB, 9.5 * MB, 100.0, 0.0, False, False),      # leaves 0.5 MB: under the floor, paused
])
def test_disk_check(free, need, now, last_warn, want_ok, want_warn):
    dp = DiskPolicy(warn_free_bytes=5 * MB, min_free_bytes=MB)
    v = disk_check(free, need, dp, now=now, last_warn=last_warn, where="/data", what="shard_00003.parquet")
    assert (v.ok, v.warn, v.after) == (want_ok, want_warn, free - need)
    assert (v.message is None) == want_ok and (want_ok or "/data" in v.message and "floor" in v.message)


@pytest.mark.parametrize("mode, error, prev, want", [
    # (gave up, attempts, rounds, retries added, failures added, delay range)
    ("fail", TransientFetchError("reset", attempts=3), None, (False, 3, 1, 3, 0, (0.5, 1.0))),
    ("fail", TransientFetchError("reset", attempts=1), Failure(3, 1, error="x"), (False, 4, 2, 1, 0, (1.0, 2.0))),
    ("fail", PermanentFetchError("404"), None, (True, 1, 1, 0, 1, None)),
    ("wait", PermanentFetchError("404"), None, (False, 1, 1, 1, 0, (5.0, 10.0))),   # "wait" retries it
])
def test_failures_record(mode, error, prev, want):
    policy = FailurePolicy(mode, retry_initial=1.0, retry_max=10.0)
    for u in (0.0, 0.999):
        r = failures.record(prev, error, policy, now=100.0, u=u)
        gave_up, attempts, rounds, retries, fails, delay = want
        assert (r.gave_up, r.failure.attempts, r.failure.rounds, r.retries, r.failures) == \
            (gave_up, attempts, rounds, retries, fails)
        assert r.failure.error is error and r.failure.permanent == isinstance(error, PermanentFetchError)
        if delay is None:
            assert r.delay is None and r.failure.retry_at == float("inf")
        else:
            assert delay[0] <= r.delay <= delay[1] and r.failure.retry_at == pytest.approx(100.0 + r.delay)


def _outcome(kw, waited, mode="fail", **extra):
    args = dict(skipped={}, blocked={}, disk_error=None, url="http://h/shard_00003.parquet")
    args.update(extra)
    return failures.reader_outcome(snap(**kw), 3, waited, FailurePolicy(mode, deadline=10), **args)


def test_reader_outcome_table():
    e = TransientFetchError("reset")
    assert _outcome({}, 100) is None                                            # nothing failed: wait
    o = _outcome({}, 0, skipped={3: "gone"})
    assert isinstance(o.error, ShardSkipped) and "gone" in str(o.error)
    assert isinstance(_outcome({}, 0, disk_error=DiskSpaceError("full")).error, DiskSpaceError)
    assert _outcome(dict(inflight=frozenset({3})), 0, disk_error=DiskSpaceError("full")) is None  # it downloads
    assert _outcome({}, 5, blocked={3: "no room"}) is None                      # before the deadline
    assert "no room" in str(_outcome({}, 10, blocked={3: "no room"}).error)
    assert _outcome(dict(failures={3: Failure(2, 1, error=e)}), 5) is None       # transient: the deadline
    o = _outcome(dict(failures={3: Failure(2, 1, error=e)}), 10)
    assert o.kind is failures.Outcome.RAISE and isinstance(o.error, TransientFetchError) and o.error.__cause__ is e
    o = _outcome(dict(failures={3: Failure(1, 1, True, error=PermanentFetchError("404"))}), 0, mode="skip")
    assert o.kind is failures.Outcome.SKIP and isinstance(o.error, ShardSkipped) and not o.counts
    o = _outcome(dict(inflight=frozenset({3}), troubled={3: (4, "stall")}), 10, mode="skip")
    assert o.kind is failures.Outcome.SKIP and o.counts and "4 attempts" in o.reason       # tries in flight
    assert _outcome(dict(failures={3: Failure(2, 1, error=e)}), 99, mode="wait") is None


@pytest.mark.parametrize("kw, needle", [
    (dict(inflight={3: (2 * MB, MB)}), "downloading, 1.0 MB of 2.0 MB"),
    (dict(inflight={3: (2 * MB, MB)}, troubled={3: (2, "reset")}), "2 tries failed, last: reset"),
    (dict(blocked={3: "full"}), "waiting for room: full"),
    (dict(failures={3: Failure(5, 2, error=TransientFetchError("503"))}), "5 failed attempts"),
    (dict(disk_error=DiskSpaceError("disk low")), "disk low"),
    (dict(), "queued"),
])
def test_why_not_ready(kw, needle):
    args = dict(inflight={}, troubled={}, blocked={}, failures={}, disk_error=None)
    args.update(kw)
    assert needle in failures.why_not_ready(3, **args)


def test_status_and_events_are_functions_of_a_snapshot_and_counts():
    c = report.Counts(retries=2, waits=1, wait_seconds=0.5)
    c.add_bytes(MB, now=10.0)
    c.add_bytes(MB, now=11.0)
    c.add_bytes(MB, now=17.0)                   # the first two fall out of the 5 s history
    assert [t for t, _ in c.rate] == [17.0] and c.downloaded_bytes == 3 * MB
    assert report.recent_mbps(((10.0, MB), (11.0, MB)), now=11.0) == pytest.approx(2.0)
    assert report.recent_mbps((), now=11.0) == 0.0
    s = snap(cursors={0: 2}, files={2: MB, 3: MB, 5: MB}, inflight=frozenset({4}), skipped=frozenset({9}),
             verified=3, budget=9 * MB)
    p = report.progress(s, c, state="running", disk_bytes=4 * MB, reserved_bytes=MB, now=17.0,
                        error=DiskSpaceError("low"))
    assert (p.ahead, p.current_shard, p.cached, p.in_flight, p.skipped) == (2, 2, (2, 3, 5), (4,), (9,))
    assert p.error == "DiskSpaceError: low" and p.window == 4 and p.retries == 2
    st = report.status(p, report.Origin(10, 10, "/d", "http://h", 1, "host"), free=None, updated=5.0)
    assert st.shards_verified == 3 and st.buffer_size == 4 and st.free_disk_bytes is None and st.updated == 5.0
    ev = report.event_record(s, "evicted", 1, disk_bytes=4 * MB, t=123.45678, reason="consumed")
    assert ev == {"t": 123.4568, "event": "evicted", "shard": 1, "bytes_on_disk": 4 * MB, "budget": 9 * MB,
                  "ahead": 2, "reader_shard": 2, "window": 4, "reason": "consumed"}


@pytest.mark.parametrize("mode, total, want", [
    ("sha256", 10 * SHA_AUTO_LIMIT, True), ("size", 1, False), ("auto", SHA_AUTO_LIMIT, True),
    ("auto", SHA_AUTO_LIMIT + 1, False),
])
def test_hash_existing(mode, total, want):
    assert hash_existing(mode, total) == want
