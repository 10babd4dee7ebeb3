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

